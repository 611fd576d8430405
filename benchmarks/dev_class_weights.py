"""The dev-set decision on class-weighted cross-entropy (`loss.ce.class_weights`: none | balanced).

Trains the primary student (`optuna.student`) without the teacher (the `no-kd` variant: the class
weights act on the cross-entropy alone, so no teacher is needed) once per setting and seed, and
prints dev F1s only: the test split is not looked at. The default in params.yaml follows the dev
average macro-F1 averaged over the seeds.

    python benchmarks/dev_class_weights.py [--seeds 42 43] [--out benchmarks/results/class_weights.json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from medkd.config.params import load_params, project_root
from medkd.config.sections import student_configs
from medkd.config.study import primary_student
from medkd.data.prepared import load_data
from medkd.engine.loop import Distillation, TeacherSource, distill_student
from medkd.util.files import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/class_weights.json"))
    args = parser.parse_args()
    root = project_root()
    params = load_params(root)
    student = primary_student(params)
    data = load_data(params, params["students"][student]["dataset"], root)
    rows = []
    for setting in ("none", "balanced"):
        for seed in args.seeds:
            model_cfg, loss_cfg, cfg = student_configs(params, student, "no-kd", {"loss.ce.class_weights": setting},
                                                       source="dev_class_weights", seed=seed)
            with tempfile.TemporaryDirectory() as tmp:
                result = distill_student(data, Distillation(model_cfg, loss_cfg, cfg, Path(tmp),
                                                            TeacherSource(Path(tmp) / "no-teacher.pt"),
                                                            evaluate_test=False))
            dev = result.dev
            rows.append({"class_weights": setting, "seed": seed, "dev_avg_f1": dev["avg_f1"],
                         **{f"dev_{t}_f1": dev[t]["f1_macro"] for t in data.vocab.tasks}})
    table = pd.DataFrame(rows)
    print(table.round(4).to_string(index=False))
    means = table.groupby("class_weights").dev_avg_f1.mean()
    print(means.round(4).to_string())
    write_json(args.out, {"student": student, "variant": "no-kd", "seeds": args.seeds, "runs": rows,
                          "mean_dev_avg_f1": means.round(4).to_dict(), "choice": means.idxmax()})


if __name__ == "__main__":
    main()
