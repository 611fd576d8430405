"""Stage `report`: collect every finished run (F1s recomputed from its prediction files) into the
study's tables and figures under reports/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import pandas as pd

from medkd.files import atomic_write, reset_dir, write_text
from medkd.metrics import load_run
from medkd.params import project_root
from medkd.report import figures, page, tables
from medkd.stages.common import Paths
from medkd.stages.runs import exported_models, primary_student, student_runs, variant_bases
from medkd.stages.schema import data_config, export_section


def collect_runs(params: Mapping, paths: Paths) -> pd.DataFrame:
    """One row per finished run: teachers, students (each variant and seed), the Optuna best (each seed)."""
    rows = []
    for dataset in params.get("teachers", {}):
        run = load_run(paths.teacher_report(dataset))
        rows.append(run_row(dataset, "Teacher", "teacher", params.get("seed", 42), run,
                         params["teachers"][dataset]["model"]))
        probe_dir = paths.probe_report(dataset)
        if probe_dir.exists():
            rows.append(run_row(dataset, "Linear probe", tables.PROBE, params.get("seed", 42), load_run(probe_dir),
                             params["teachers"][dataset]["model"]))
    for student, spec in params.get("students", {}).items():
        for planned in student_runs(params, student):
            run_dir = paths.student_report(student) / planned.name
            if run_dir.exists():
                rows.append(run_row(spec["dataset"], student, planned.variant, planned.seed, load_run(run_dir), spec))
    student = primary_student(params)
    best_seeds = sorted(int(d.name.removeprefix("seed-")) for d in (paths.optuna_report() / "best").glob("seed-*"))
    for seed in best_seeds:
        spec = params["students"][student]
        rows.append(run_row(spec["dataset"], student, tables.OPTUNA_BEST, seed,
                         load_run(paths.optuna_report() / "best" / f"seed-{seed}"), spec))
    return pd.DataFrame(rows)


def run_row(dataset: str, name: str, variant: str, seed: int, run: Mapping, spec: Mapping) -> dict:
    """One run (`load_run`) as a row of the frame the report tables read."""
    tasks = run["metrics"]["tasks"]
    test = run["test"]
    return {
        "dataset": dataset, "model": name, "variant": variant, "seed": seed,
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


def masked_pairs(params: Mapping) -> dict[str, str]:
    """{data set with `mask_terms`: the data set with the same files unmasked}, where both are listed."""
    configs = {name: data_config(params, name) for name in params.get("data", {})}
    pairs = {}
    for name, cfg in configs.items():
        if cfg.mask_terms:
            twin = next((other for other, c in configs.items() if not c.mask_terms and c.name == cfg.name
                         and c.root == cfg.root and c.text_fields == cfg.text_fields), None)
            if twin:
                pairs[name] = twin
    return pairs


def loss_term_probes(params: Mapping, paths: Paths, variants: tuple[str, ...] = ("tuned", "baseline")) -> dict:
    """{"<student> [<variant>]": its loss-term probes} for the primary student's first seed of each variant."""
    student = primary_student(params)
    probes = {}
    for planned in student_runs(params, student) if student else []:
        name = f"{student} [{planned.variant}]"
        file = paths.student_report(student) / planned.name / "loss_terms.csv"
        if planned.variant in variants and name not in probes and file.exists():
            probes[name] = pd.read_csv(file)
    return probes


def read_deployments(params: Mapping, paths: Paths) -> list[dict]:
    """The export stages' deployment.json of the models `params` exports, in its order. Folders of models
    no longer in params (a student renamed or dropped) stay on disk, as DVC leaves them: they are not read."""
    files = [paths.export_report(model) / "deployment.json" for model in exported_models(params)]
    return [json.loads(file.read_text()) for file in files if file.exists()]


def report_stage(params: Mapping, root: Path | None = None) -> dict:
    root = root or project_root()
    paths = Paths(root)
    out = reset_dir(paths.results())
    runs = collect_runs(params, paths)
    best_file = paths.optuna_report() / "best_params.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else None
    optuna_file = paths.metrics("optuna")
    optuna_metrics = json.loads(optuna_file.read_text()) if optuna_file.exists() else None
    seed = params.get("seed", 42)
    bases = variant_bases(params)
    hyper = tables.hyperparameter_table(params, best)
    study_tables, intervals, ablations, claims, teacher_checks = {}, {}, {}, {}, {}
    student = primary_student(params)
    for dataset in runs.dataset.unique():
        intervals[dataset] = tables.interval_table(runs, dataset, seed=seed, bases=bases)
        atomic_write(out / f"intervals_{dataset}.csv", lambda p, t=intervals[dataset]: t.to_csv(p, index=False))
        study_tables[dataset] = tables.study_table(runs, dataset, intervals[dataset])
        atomic_write(out / f"table_{dataset}.csv", lambda p, t=study_tables[dataset]: t.to_csv(p, index=False))
        ablations[dataset] = tables.ablation_table(intervals[dataset], bases)
        if student is not None and params["students"][student]["dataset"] == dataset:
            claims[dataset] = tables.claims_table(intervals[dataset], student)
            atomic_write(out / f"claims_{dataset}.csv", lambda p, t=claims[dataset]: t.to_csv(p, index=False))
        students = [name for name, spec in params.get("students", {}).items() if spec["dataset"] == dataset]
        teacher_checks[dataset] = tables.teacher_table(intervals[dataset], students)
        if len(teacher_checks[dataset]):
            atomic_write(out / f"teacher_{dataset}.csv", lambda p, t=teacher_checks[dataset]: t.to_csv(p, index=False))
    masking = tables.masking_table(runs, masked_pairs(params), seed=seed)
    if len(masking):
        atomic_write(out / "masking.csv", lambda p: masking.to_csv(p, index=False))
    all_runs = tables.all_runs_table(runs)
    atomic_write(out / "all_runs.csv", lambda p: all_runs.to_csv(p, index=False))
    atomic_write(out / "hyperparameters.csv", lambda p: hyper.to_csv(p, index=False))
    per_class = tables.per_class_table(runs)
    atomic_write(out / "per_class.csv", lambda p: per_class.to_csv(p, index=False))
    probes = loss_term_probes(params, paths)
    drivers = tables.loss_driver_summary(probes) if probes else None
    if probes:
        figures.plot_loss_drivers(probes, out / "loss_drivers.png")
        atomic_write(out / "loss_drivers.csv", lambda p: drivers.to_csv(p, index=False))
    deployments = read_deployments(params, paths)
    deployment = tables.deployment_table(deployments) if deployments else None
    section = export_section(params)
    goals = tables.deployment_goals(deployments, section.speedup_goal, section.int8_max_f1_drop) if deployments else []
    if deployments:
        atomic_write(out / "deployment.csv", lambda p: deployment.to_csv(p, index=False))
        figures.plot_latency_vs_f1(deployments, out / "latency_vs_f1.png")
    figures.plot_f1_per_model(runs, out / "f1_per_model.png")
    figures.plot_per_class_f1(per_class, out / "per_class_f1.png")
    figures.plot_params_vs_f1(runs, out / "params_vs_f1.png")
    figures.plot_confusions(runs, out / "confusion_matrices.png")
    figures.plot_training_curves(runs, out / "training_curves.png")
    write_text(out / "results.md", page.results_markdown(page.StudyReport(
        runs, hyper, optuna_metrics, intervals, ablations, masking, drivers, deployment, goals, claims,
        teacher_checks)))
    return {"runs": runs, "tables": study_tables, "intervals": intervals, "ablations": ablations, "masking": masking,
            "claims": claims, "teacher": teacher_checks,
            "drivers": drivers, "deployment": deployment, "goals": goals, "hyper": hyper,
            "out": out}
