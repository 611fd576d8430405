"""Stage `report`: collect every finished run (F1s recomputed from its prediction files) into the
study's tables and figures under reports/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import pandas as pd

from medkd import report
from medkd.files import atomic_write, reset_dir, write_text
from medkd.metrics import load_run
from medkd.params import project_root
from medkd.stages.common import Paths
from medkd.stages.schema import variants


def collect_runs(params: Mapping, paths: Paths) -> pd.DataFrame:
    """One row per finished run: teachers, students (each variant), the Optuna best."""
    rows = []
    for dataset in params.get("teachers", {}):
        run = load_run(paths.teacher_report(dataset))
        rows.append(_row(dataset, "Teacher", "teacher", run, params["teachers"][dataset]["model"]))
    for student, spec in params.get("students", {}).items():
        for variant in variants(params):
            run_dir = paths.student_report(student) / variant
            if run_dir.exists():
                rows.append(_row(spec["dataset"], student, variant, load_run(run_dir), spec))
    best_dir = paths.optuna_report() / "best"
    if best_dir.exists():
        student = params["optuna"]["student"]
        spec = params["students"][student]
        rows.append(_row(spec["dataset"], student, "optuna-best", load_run(best_dir), spec))
    return pd.DataFrame(rows)


def _row(dataset: str, name: str, variant: str, run: Mapping, spec: Mapping) -> dict:
    tasks = run["metrics"]["tasks"]
    test = run["test"]
    return {
        "dataset": dataset, "model": name, "variant": variant,
        "backbones": f"{spec['vision']} + {spec['text']}",
        "parameters": run["metrics"]["parameters"],
        "task1": tasks[0], "task2": tasks[1],
        "task1_f1": test[tasks[0]]["f1_macro"], "task2_f1": test[tasks[1]]["f1_macro"],
        "avg_f1": test["avg_f1"], "task1_acc": test[tasks[0]]["accuracy"], "task2_acc": test[tasks[1]]["accuracy"],
        "dev_avg_f1": run["metrics"]["dev"]["avg_f1"], "best_epoch": run["metrics"]["best_epoch"],
        "seconds": run["metrics"]["seconds"], "n_test": test["n"],
        "confusion1": test[tasks[0]]["confusion"], "confusion2": test[tasks[1]]["confusion"],
        "classes1": run["vocab"].classes[0], "classes2": run["vocab"].classes[1],
        "history": run["history"], "predictions": run["predictions"],
        "environment": run["metrics"].get("environment"),
    }


def report_stage(params: Mapping, root: Path | None = None) -> dict:
    root = root or project_root()
    paths = Paths(root)
    out = reset_dir(paths.results())
    runs = collect_runs(params, paths)
    best_file = paths.optuna_report() / "best_params.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else None
    optuna_file = paths.metrics("optuna")
    optuna_metrics = json.loads(optuna_file.read_text()) if optuna_file.exists() else None
    hyper = report.hyperparameter_table(params, best)
    tables = {}
    intervals = {}
    for dataset in runs.dataset.unique():
        tables[dataset] = report.study_table(runs, dataset)
        atomic_write(out / f"table_{dataset}.csv", lambda p, t=tables[dataset]: t.to_csv(p, index=False))
        intervals[dataset] = report.interval_table(runs, dataset, seed=params.get("seed", 42))
        atomic_write(out / f"intervals_{dataset}.csv", lambda p, t=intervals[dataset]: t.to_csv(p, index=False))
    all_runs = report.all_runs_table(runs)
    atomic_write(out / "all_runs.csv", lambda p: all_runs.to_csv(p, index=False))
    atomic_write(out / "hyperparameters.csv", lambda p: hyper.to_csv(p, index=False))
    per_class = report.per_class_table(runs)
    atomic_write(out / "per_class.csv", lambda p: per_class.to_csv(p, index=False))
    report.plot_f1_per_model(runs, out / "f1_per_model.png")
    report.plot_per_class_f1(per_class, out / "per_class_f1.png")
    report.plot_params_vs_f1(runs, out / "params_vs_f1.png")
    report.plot_confusions(runs, out / "confusion_matrices.png")
    report.plot_training_curves(runs, out / "training_curves.png")
    write_text(out / "results.md", report.results_markdown(runs, params, hyper, optuna_metrics, intervals))
    return {"runs": runs, "tables": tables, "intervals": intervals, "hyper": hyper, "out": out}
