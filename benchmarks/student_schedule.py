"""The students' schedule (`distill.train.epochs`), chosen on dev.

Trains the primary student (`optuna.student`) alone (the `no-kd` variant: no teacher needed, so the
choice does not depend on which teacher is distilled) for each number of epochs asked, on each seed,
as full runs (the learning rate warms up and decays over the run's own epochs). Records each run's
dev avg macro-F1 after every epoch (the curve), the epoch kept and its seconds; test is never read.
The setting in params.yaml is the smallest number of epochs whose mean dev avg F1 over the seeds is
within one standard error of the best setting's (the curve and table in docs/experiments.md).

    python benchmarks/student_schedule.py --epochs 2 4 6 --seeds 42 43 44
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medkd.config.params import load_params, project_root
from medkd.config.sections import student_configs
from medkd.config.study import primary_student
from medkd.data.prepared import load_data
from medkd.engine.loop import Distillation, distill_student
from medkd.pipeline.paths import Paths
from medkd.util.environment import cpu_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 4, 6], help="the schedules compared")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--variant", default="no-kd", help="a variant that does not read the teacher")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/student_schedule.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    root = project_root()
    params = load_params(root)
    student = primary_student(params)
    data = load_data(params, params["students"][student]["dataset"], root)
    runs = []
    for epochs in args.epochs:
        for seed in args.seeds:
            model_cfg, loss_cfg, cfg = student_configs(params, student, args.variant, {"train.epochs": epochs},
                                                       source="student_schedule", seed=seed)
            if loss_cfg.uses_teacher:
                raise SystemExit(f"variant {args.variant!r} reads the teacher; the schedule is chosen on a student alone")
            with tempfile.TemporaryDirectory() as tmp:
                result = distill_student(data, Distillation(model_cfg, loss_cfg, cfg, Path(tmp),
                                                            trunk_dir=Paths(root).trunks(), evaluate_test=False))
            runs.append({"epochs": epochs, "seed": seed, "dev_avg_f1": round(result.dev["avg_f1"], 4),
                         "best_epoch": result.best_epoch, "seconds": round(result.seconds, 1),
                         "dev_by_epoch": [round(h["dev_avg_f1"], 4) for h in result.history]})
            print(f"{epochs} epochs, seed {seed}: dev {runs[-1]['dev_avg_f1']:.4f} (epoch {result.best_epoch}), "
                  f"{result.seconds:.0f} s, curve {runs[-1]['dev_by_epoch']}", flush=True)
    frame = pd.DataFrame(runs)
    table = frame.groupby("epochs").agg(dev_mean=("dev_avg_f1", "mean"), dev_std=("dev_avg_f1", "std"),
                                        seeds=("seed", "size"), seconds=("seconds", "mean")).reset_index()
    table["standard_error"] = table.dev_std / np.sqrt(table.seeds)
    best = table.loc[table.dev_mean.idxmax()]
    chosen = int(table[table.dev_mean >= best.dev_mean - best.standard_error].epochs.min())
    print(table.round(4).to_string(index=False))
    print(f"chosen: {chosen} epochs (smallest within one standard error of the best, {int(best.epochs)})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads()},
        "student": student, "variant": args.variant, "runs": runs,
        "table": table.round(4).to_dict("records"), "chosen_epochs": chosen}, indent=1) + "\n")


if __name__ == "__main__":
    main()
