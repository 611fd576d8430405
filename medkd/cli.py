"""The `medkd` command (also `python -m medkd`): the pipeline's commands and those that run the study's
code outside DVC.

    medkd check-params [--params params.yaml] [--stamp FILE]
    medkd run-stage NOTEBOOK OUTPUT [-p NAME VALUE]...
    medkd predict MODEL {--image PATH --text CAPTION | --csv FILE} [--out FILE]
    medkd preset {show | overrides | run} PRESET
    medkd demo                     (a small real student trained, exported and tried in a few minutes)
    medkd experiments [--all]      (DVC experiments side by side, in 100 columns)
    medkd findings                 (README's findings, rewritten from the results page)
    medkd optuna-worker [--storage URL] [--root DIR]
    torchrun --nproc_per_node N -m medkd train {teacher DATASET | student STUDENT}

Parsing needs nothing but argparse: each command's code is imported by the function that runs it, so
`medkd --help` answers at once and `medkd check-params` loads no torch. (This is the one module whose
functions import medkd modules; it is no stage's command, so no DVC dependency hides behind it.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _check_params(args: argparse.Namespace) -> int:
    from medkd.stages.check import check_params_command

    return check_params_command(args.params, args.stamp)


def _run_stage(argv: list[str]) -> int:
    from medkd.pipeline.runner import main

    return main(argv)


def _project(root: Path | None) -> tuple[Path, dict] | None:
    """The project folder and its checked params.yaml; None (after saying why) when they do not fit."""
    from medkd.config.params import load_params, project_root
    from medkd.config.schema import ParamsError, validate_params

    root = (root or project_root()).resolve()
    params = load_params(root)
    try:
        validate_params(params, str(root / "params.yaml"))
    except ParamsError as err:
        print(err, file=sys.stderr)
        return None
    return root, params


def _optuna_worker(args: argparse.Namespace) -> int:
    """Join the study of `optuna:` in ROOT/params.yaml at `storage` and run trials until it has
    `optuna.n_trials`. Needs the project's data and teacher stage outputs (`dvc repro teacher`)."""
    from medkd.pipeline.lifecycle import die_with_parent
    from medkd.stages.search import Search, counted_trials, run_worker

    if args.with_parent:
        die_with_parent()
    project = _project(args.root)
    if project is None:
        return 2
    root, params = project
    search = Search.open(params, root, args.storage)
    ran = run_worker(search, args.worker, shared=args.shared)
    print(f"optuna worker {args.worker}: ran {ran} trial{'s' * (ran != 1)}; study {search.study_name} at "
          f"{search.storage_url} holds {counted_trials(search.study(args.worker, args.shared))} of "
          f"{search.section.n_trials}")
    return 0


def _train(args: argparse.Namespace) -> int:
    """The teacher or distill stage's training as a plain process: under `torchrun` one of N
    data-parallel processes (NCCL on GPUs, gloo on CPUs); rank 0 writes the stage's outputs."""
    import torch.distributed

    from medkd.stages.distill import distill_stage
    from medkd.stages.teacher import teacher_stage
    from medkd.util.distributed import init_from_env, is_distributed
    from medkd.util.environment import resolve_device

    project = _project(args.root)
    if project is None:
        return 2
    root, params = project
    init_from_env(resolve_device((params.get("runtime") or {}).get("device", "auto")).type)
    try:
        (teacher_stage if args.kind == "teacher" else distill_stage)(params, args.name, root)
    finally:
        if is_distributed():
            torch.distributed.destroy_process_group()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from medkd.demo import demo

    return demo(args.root, args.images)


def _experiments(argv: list[str]) -> int:
    from medkd.experiments import main

    return main(argv)


def _findings(args: argparse.Namespace) -> int:
    """README's findings, rewritten from reports/results/results.md (after a run of the study)."""
    from medkd.config.params import project_root
    from medkd.reporting.page import with_findings

    root = project_root()
    readme = root / "README.md"
    updated = with_findings(readme.read_text(), (root / "reports" / "results" / "results.md").read_text())
    changed = updated != readme.read_text()
    readme.write_text(updated)
    print(f"README.md: findings {'rewritten from' if changed else 'already equal to'} reports/results/results.md")
    return 0


def _predict(argv: list[str]) -> int:
    from medkd.deploy.predictor import main

    return main(argv)


def _preset(argv: list[str]) -> int:
    from medkd.config.presets import main

    return main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medkd", description="medkd: multimodal knowledge distillation study")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-params", help="check params.yaml against the schema (all problems at once)")
    check.add_argument("--params", type=Path, default=Path("params.yaml"))
    check.add_argument("--stamp", type=Path, default=None, help="write this file when the params are valid")
    check.set_defaults(run=_check_params)
    sub.add_parser("run-stage", add_help=False, help="run a stage notebook with papermill (DVC runs it as "
                                                     "`python -m medkd.pipeline.runner`)")
    sub.add_parser("predict", add_help=False, help="predictions of an exported model (or a checkpoint) for your "
                                                   "own images and captions; `medkd predict --help`")
    sub.add_parser("experiments", add_help=False, help="DVC experiments side by side in 100 columns: the params "
                                                       "that differ, the headline F1s; `medkd experiments --help`")
    sub.add_parser("preset", add_help=False, help="a preset (configs/*.yaml, an overlay on params.yaml) shown, or "
                                                  "run as a DVC experiment; `medkd preset --help`")
    demo = sub.add_parser("demo", help="a small real student (the primary student's heads on frozen backbones) "
                                        "trained, exported and tried on a few test images, in a few minutes")
    demo.add_argument("--root", type=Path, default=None, help="project folder (default: the one holding the cwd)")
    demo.add_argument("--images", type=int, default=6, help="test images to classify (default 6)")
    demo.set_defaults(run=_demo)
    sub.add_parser("findings", help="rewrite README.md's findings from reports/results/results.md "
                                    "(after a run)").set_defaults(run=_findings)
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
    worker.set_defaults(run=_optuna_worker)
    train = sub.add_parser("train", help="a teacher or student stage's training outside DVC; "
                                         "under torchrun: data-parallel over the processes")
    train.add_argument("kind", choices=["teacher", "student"])
    train.add_argument("name", help="the data set (teacher) or student name of params.yaml")
    train.add_argument("--root", type=Path, default=None, help="project folder (default: the one holding the cwd)")
    train.set_defaults(run=_train)
    return parser


# Commands that parse their own arguments (`medkd predict --help` shows them).
OWN_PARSERS = {"predict": _predict, "preset": _preset, "run-stage": _run_stage, "experiments": _experiments}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in OWN_PARSERS:
        return OWN_PARSERS[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
