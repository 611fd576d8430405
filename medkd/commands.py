"""The `medkd` command (also `python -m medkd`): the pipeline's commands (`medkd/cli.py`) and those
that run the engine outside DVC.

    medkd check-params [--params params.yaml] [--stamp FILE]
    medkd run-stage NOTEBOOK OUTPUT [-p NAME VALUE]...
    medkd optuna-worker [--storage URL] [--root DIR]
    torchrun --nproc_per_node N -m medkd train {teacher DATASET | student STUDENT}
    medkd predict MODEL {--image PATH --text CAPTION | --csv FILE} [--out FILE]
    medkd preset {show | overrides | run} PRESET
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed

from medkd.cli import build_parser, run_command
from medkd.distributed import init_from_env, is_distributed
from medkd.params import load_params, project_root
from medkd.predict import main as predict_main
from medkd.presets import main as preset_main
from medkd.stages.distill import distill_stage
from medkd.stages.lifecycle import die_with_parent
from medkd.stages.schema import ParamsError, validate_params
from medkd.stages.teacher import teacher_stage
from medkd.stages.tune import Search, counted_trials, run_worker
from medkd.train import resolve_device


def _project(root: Path | None) -> tuple[Path, dict] | None:
    """The project folder and its checked params.yaml; None (after saying why) when they do not fit."""
    root = (root or project_root()).resolve()
    params = load_params(root)
    try:
        validate_params(params, str(root / "params.yaml"))
    except ParamsError as err:
        print(err, file=sys.stderr)
        return None
    return root, params


def optuna_worker_command(root: Path | None, storage: str | None, worker: int, shared: bool,
                          with_parent: bool) -> int:
    """Join the study of `optuna:` in ROOT/params.yaml at `storage` and run trials until it has
    `optuna.n_trials`. Needs the project's data and teacher stage outputs (`dvc repro teacher`)."""
    if with_parent:
        die_with_parent()
    project = _project(root)
    if project is None:
        return 2
    root, params = project
    search = Search.open(params, root, storage)
    ran = run_worker(search, worker, shared=shared)
    print(f"optuna worker {worker}: ran {ran} trial{'s' * (ran != 1)}; study {search.study_name} at "
          f"{search.storage_url} holds {counted_trials(search.study(worker, shared))} of {search.section.n_trials}")
    return 0


def train_command(kind: str, name: str, root: Path | None) -> int:
    """The teacher or distill stage's training as a plain process: under `torchrun` one of N
    data-parallel processes (NCCL on GPUs, gloo on CPUs); rank 0 writes the stage's outputs."""
    project = _project(root)
    if project is None:
        return 2
    root, params = project
    init_from_env(resolve_device((params.get("runtime") or {}).get("device", "auto")).type)
    try:
        if kind == "teacher":
            teacher_stage(params, name, root)
        else:
            distill_stage(params, name, root)
    finally:
        if is_distributed():
            torch.distributed.destroy_process_group()
    return 0


def build_command_parser() -> argparse.ArgumentParser:
    """The `medkd` command's parser (`predict` and `preset` parse their own arguments)."""
    parser, sub = build_parser()
    sub.add_parser("predict", add_help=False, help="predictions of an exported model (or a checkpoint) for your "
                                                   "own images and captions; `medkd predict --help`")
    sub.add_parser("preset", add_help=False, help="a preset (configs/*.yaml, an overlay on params.yaml) shown, or "
                                                  "run as a DVC experiment; `medkd preset --help`")
    worker = sub.add_parser("optuna-worker", help="join the Optuna study of params.yaml and run trials until it has "
                                                  "optuna.n_trials (one or several machines on one storage)")
    worker.add_argument("--storage", default=None,
                        help="Optuna storage URL (postgresql+psycopg://..., journal:PATH, sqlite:///PATH); "
                             "default: optuna.storage of params.yaml")
    worker.add_argument("--root", type=Path, default=None, help="project folder (default: the one holding the cwd)")
    worker.add_argument("--worker", type=int, default=1, help="this worker's number: its sampler seed offset")
    worker.add_argument("--shared", action=argparse.BooleanOptionalAction, default=True,
                        help="other workers run at the same time (TPE: constant liar)")
    worker.add_argument("--with-parent", action="store_true", help=argparse.SUPPRESS)
    train = sub.add_parser("train", help="a teacher or student stage's training outside DVC; "
                                         "under torchrun: data-parallel over the processes")
    train.add_argument("kind", choices=["teacher", "student"])
    train.add_argument("name", help="the data set (teacher) or student name of params.yaml")
    train.add_argument("--root", type=Path, default=None, help="project folder (default: the one holding the cwd)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:  # its own parser (`medkd predict --help`), also `python -m medkd.predict`
        return predict_main(argv[1:])
    if argv[:1] == ["preset"]:  # its own parser, also `python -m medkd.presets`
        return preset_main(argv[1:])
    args = build_command_parser().parse_args(argv)
    if args.command == "optuna-worker":
        return optuna_worker_command(args.root, args.storage, args.worker, args.shared, args.with_parent)
    if args.command == "train":
        return train_command(args.kind, args.name, args.root)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
