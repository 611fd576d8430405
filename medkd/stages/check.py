"""Stage `check`: all of params.yaml against the schema, and against this machine, before any other
stage runs (every stage depends on the stamp it writes, whose text never changes, so a bad value stops
`dvc repro` before DVC deletes an output, and a good edit re-runs only the stages whose params changed).

    python -m medkd.stages.check [--params params.yaml] [--stamp FILE]     (also: medkd check-params)

Imports no torch: the default settings (fp32 on the CPU or whatever `auto` finds) are answered without it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from medkd.config.schema import check_params
from medkd.config.sections import train_config
from medkd.util.environment import machine_problem
from medkd.util.files import write_text

STAMP_TEXT = "params.yaml fits the medkd schema (written by `medkd check-params`)\n"


def check_params_command(params_file: Path, stamp: Path | None) -> int:
    try:
        params = yaml.safe_load(Path(params_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"{params_file}: no such file", file=sys.stderr)
        return 2
    except yaml.YAMLError as err:
        print(f"{params_file}: not valid YAML: {err}", file=sys.stderr)
        return 2
    problems = check_params(params)
    if problems:
        for problem in problems:
            print(f"  {problem.path}: {problem.message}", file=sys.stderr)
        print(f"{params_file}: {len(problems)} problem{'s' if len(problems) > 1 else ''}; nothing was run",
              file=sys.stderr)
        return 2
    runtime = train_config(params)  # this machine, before any stage runs: a GPU it lacks, bf16 its CPU emulates
    problem = machine_problem(runtime.device, runtime.precision)
    if problem:
        print(f"  {problem}", file=sys.stderr)
        print(f"{params_file}: fits the schema, but not this machine; nothing was run", file=sys.stderr)
        return 2
    if stamp is not None:
        write_text(stamp, STAMP_TEXT)  # constant: stages that depend on it re-run only for their own params
    print(f"{params_file}: OK")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--stamp", type=Path, default=None, help="write this file when the params are valid")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m medkd.stages.check", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    return check_params_command(args.params, args.stamp)


if __name__ == "__main__":
    sys.exit(main())
