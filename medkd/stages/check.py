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
from typing import Any

import yaml

from medkd.config.configs import data_config
from medkd.config.problems import Problem
from medkd.config.schema import check_params
from medkd.config.sections import train_config
from medkd.util.environment import machine_problem
from medkd.util.files import write_text

STAMP_TEXT = "params.yaml fits the medkd schema (written by `medkd check-params`)\n"


def read_params(params_file: Path) -> tuple[Any, str | None]:
    """(the parsed file, None) or (None, one line saying why it cannot be read: file, line and column)."""
    try:
        text = Path(params_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"{params_file}: no such file"
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{params_file}:{mark.line + 1}:{mark.column + 1}" if mark else str(params_file)
        what = ": ".join(str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
        return None, f"{where}: not valid YAML: {what or err}"
    if params is None:
        return None, f"{params_file}: the file is empty; expected params.yaml's sections (data:, teachers:, students:, ...)"
    return params, None


def data_problems(params: dict, root: Path) -> list[Problem]:
    """Every data set's folder, where it must be before a stage reads it (relative to the project)."""
    problems = []
    for dataset, section in (params.get("data") or {}).items():
        cfg = data_config(params, dataset, root)
        folder, given = Path(cfg.root), section.get("root")
        if not folder.is_dir():
            problems.append(Problem(f"data.{dataset}.root", f"folder {given!r} does not exist ({folder}); run "
                                                            "`make data`, or set root to the data set's folder"))
        elif not (folder / cfg.spec.marker).exists():
            problems.append(Problem(f"data.{dataset}.root", f"{given!r} holds no {cfg.spec.marker}: not a "
                                                            f"{cfg.spec.title} folder (`make data` fetches one)"))
    return problems


def check_params_command(params_file: Path, stamp: Path | None) -> int:
    params, unreadable = read_params(params_file)
    if unreadable:
        print(unreadable, file=sys.stderr)
        return 2
    problems = check_params(params) or data_problems(params, Path(params_file).resolve().parent)
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
