"""The pipeline's own commands: DVC's `check` stage runs `python -m medkd.cli check-params`; the
notebook stages run `python -m medkd.stages.runner` (`run-stage` here too), which skips this
module's schema imports and their torch (the full `medkd` command is `medkd/commands.py`).

    medkd check-params [--params params.yaml] [--stamp FILE]
    medkd run-stage NOTEBOOK OUTPUT [-p NAME VALUE]...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from medkd.environment import precision_problem, resolve_device
from medkd.files import write_text
from medkd.stages.runner import add_arguments, run_from_arguments
from medkd.stages.schema import check_params, train_config

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
    try:
        problem = precision_problem(resolve_device(runtime.device), runtime.precision)
    except RuntimeError as err:
        problem = f"runtime.device: {err}"
    if problem:
        print(f"  {problem}", file=sys.stderr)
        print(f"{params_file}: fits the schema, but not this machine; nothing was run", file=sys.stderr)
        return 2
    if stamp is not None:
        write_text(stamp, STAMP_TEXT)  # constant: stages that depend on it re-run only for their own params
    print(f"{params_file}: OK")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser with this module's commands, and its subparsers for more."""
    parser = argparse.ArgumentParser(prog="medkd", description="medkd: multimodal knowledge distillation study")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-params", help="check params.yaml against the schema (all problems at once)")
    check.add_argument("--params", type=Path, default=Path("params.yaml"))
    check.add_argument("--stamp", type=Path, default=None, help="write this file when the params are valid")
    add_arguments(sub.add_parser("run-stage", help="run a stage notebook with papermill (DVC runs it as "
                                                   "`python -m medkd.stages.runner`)"))
    return parser, sub


def run_command(args: argparse.Namespace) -> int:
    """Run `check-params` or `run-stage`."""
    if args.command == "check-params":
        return check_params_command(args.params, args.stamp)
    return run_from_arguments(args)


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
