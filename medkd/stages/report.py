"""Stage `report`: collect every finished run (F1s recomputed from its prediction files) into the
study's tables and figures under reports/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import pandas as pd

from medkd.config.configs import data_config
from medkd.config.params import project_root
from medkd.config.sections import teacher_plan
from medkd.config.stage_settings import export_section, optuna_section
from medkd.config.study import OPTUNA_BEST, backbones_of, exported_models, primary_student, student_runs, variant_bases
from medkd.pipeline.paths import Paths
from medkd.reporting import figures, page, tables
from medkd.scoring.metrics import fidelity, load_run
from medkd.util.files import atomic_write, reset_dir, write_text


def collect_runs(params: Mapping, paths: Paths) -> pd.DataFrame:
    """One row per finished run: teachers, students (each variant and seed), the Optuna best (each seed)."""
    rows = []
    for dataset in params.get("teachers", {}):
        run, plan, model = load_run(paths.teacher_report(dataset)), teacher_plan(params, dataset), \
            params["teachers"][dataset]["model"]
        facts = {"members": len(plan.seeds), "image_size": plan.image_size or data_config(params, dataset).image_size}
        rows.append({**run_row(dataset, "Teacher", "teacher", plan.seeds[0], run, model), **facts})
        for seed in plan.seeds if len(plan.seeds) > 1 else ():  # an ensemble's members, each measured alone
            member = load_run(paths.teacher_report(dataset) / f"member-{seed}")
            rows.append({**run_row(dataset, "Teacher", tables.TEACHER_MEMBER, seed, member, model), **facts,
                         "members": 1})
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
    best_seeds = sorted(int(d.name.removeprefix("seed-")) for d in (paths.search_report() / "best").glob("seed-*"))
    for seed in best_seeds:
        spec = params["students"][student]
        rows.append(run_row(spec["dataset"], student, OPTUNA_BEST, seed,
                         load_run(paths.search_report() / "best" / f"seed-{seed}"), spec))
    return with_fidelity(pd.DataFrame(rows))


def with_fidelity(runs: pd.DataFrame) -> pd.DataFrame:
    """Each student run with its agreement with its data set's teacher and its dev KL to it
    (`medkd.scoring.metrics.fidelity`); teachers and probes get none."""
    teachers = {r.dataset: {"dev": r.dev_predictions, "test": r.predictions}
                for r in runs.itertuples() if r.variant == "teacher"}
    rows = []
    for r in runs.itertuples():
        teacher = teachers.get(r.dataset) if r.variant not in tables.REFERENCES else None
        found = fidelity({"dev": r.dev_predictions, "test": r.predictions}, teacher, [r.task1, r.task2]) \
            if teacher else {}
        rows.append({k.replace(f"_{r.task1}", "_task1").replace(f"_{r.task2}", "_task2"): v for k, v in found.items()})
    return pd.concat([runs.reset_index(drop=True), pd.DataFrame(rows, index=range(len(runs)))], axis=1)


def run_row(dataset: str, name: str, variant: str, seed: int, run: Mapping, spec: Mapping) -> dict:
    """One run (`load_run`) as a row of the frame the report tables read."""
    tasks = run["metrics"]["tasks"]
    test = run["test"]
    return {
        "dataset": dataset, "model": name, "variant": variant, "seed": seed,
        "backbones": backbones_of(spec),
        "parameters": run["metrics"]["parameters"],
        "task1": tasks[0], "task2": tasks[1],
        "task1_f1": test[tasks[0]]["f1_macro"], "task2_f1": test[tasks[1]]["f1_macro"],
        "avg_f1": test["avg_f1"], "task1_acc": test[tasks[0]]["accuracy"], "task2_acc": test[tasks[1]]["accuracy"],
        "dev_avg_f1": run["metrics"]["dev"]["avg_f1"], "best_epoch": run["metrics"]["best_epoch"],
        "seconds": run["metrics"]["seconds"], "n_test": test["n"],
        "confusion1": test[tasks[0]]["confusion"], "confusion2": test[tasks[1]]["confusion"],
        "classes1": run["vocab"].classes[0], "classes2": run["vocab"].classes[1],
        "history": run["history"], "predictions": run["predictions"], "dev_predictions": run["dev_predictions"],
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


DISTILLED = (tables.KL_ONLY, "tuned")  # the claim students' distilled runs the figures show beside the shipped ones


def shown_runs(params: Mapping, runs: pd.DataFrame, deployments: list[dict]) -> pd.DataFrame:
    """The runs the confusion matrices and curves show: each teacher, each student's shipped run (the one its
    export stage picked; without exports its no-KD variant's first seed), and the distilled runs (Hinton KD
    and the combined loss, first seed) of every student read as a claim; `role` says which."""
    shipped = {d["model"]: d["run"] for d in deployments if d.get("run") not in (None, "teacher")}
    claimed = claim_students(params)
    picked = []
    for _, r in runs.iterrows():
        run = f"{r.variant}/seed-{r.seed}"
        if r.variant == "teacher":
            picked.append((r, ""))
        elif shipped.get(r.model) == run or (r.model not in shipped and r.variant == tables.NO_KD):
            picked.append((r, " (shipped)" if r.model in shipped else ""))
        elif r.model in claimed and r.variant in DISTILLED:
            picked.append((r, " (distilled)"))
    frame = pd.DataFrame([{**r.to_dict(), "role": role} for r, role in picked])
    return frame.drop_duplicates(["dataset", "model", "variant"]) if len(frame) else frame


def _write_csv(out: Path, name: str, table: pd.DataFrame) -> None:
    atomic_write(out / f"{name}.csv", lambda p: table.to_csv(p, index=False))


def claim_students(params: Mapping) -> list[str]:
    """The students whose distillation is read as a claim: the primary student, then every student marked
    `seeds: primary` (the positive controls)."""
    primary = primary_student(params)
    marked = [name for name, spec in params.get("students", {}).items() if spec.get("seeds") == "primary"]
    return list(dict.fromkeys([*([primary] if primary else []), *marked]))


def _dataset_tables(params: Mapping, runs: pd.DataFrame, out: Path, shipped: Mapping[str, str]) -> dict[str, dict]:
    """Per data set: the paired intervals, the study table, ablations, claims, fidelity and the teacher's
    checks (dev and test, and its lead goal); each written as CSV."""
    seed, bases = params.get("seed", 42), variant_bases(params)
    found: dict[str, dict] = {key: {} for key in ("tables", "intervals", "ablations", "claims", "teacher",
                                                  "fidelity", "lead")}
    for dataset in runs.dataset.unique():
        intervals = found["intervals"][dataset] = tables.interval_table(runs, dataset, seed=seed, bases=bases)
        _write_csv(out, f"intervals_{dataset}", intervals)
        found["tables"][dataset] = tables.study_table(runs, dataset, intervals, shipped)
        _write_csv(out, f"table_{dataset}", found["tables"][dataset])
        found["ablations"][dataset] = tables.ablation_table(intervals, bases)
        students = [s for s in claim_students(params) if params["students"][s]["dataset"] == dataset]
        found["claims"][dataset] = tables.claims_table(intervals, students)
        if len(found["claims"][dataset]):
            _write_csv(out, f"claims_{dataset}", found["claims"][dataset])
        found["fidelity"][dataset] = tables.fidelity_table(runs, dataset)
        if len(found["fidelity"][dataset]):
            _write_csv(out, f"fidelity_{dataset}", found["fidelity"][dataset])
        dev = tables.teacher_comparisons(runs, dataset, "dev", seed=seed)
        found["teacher"][dataset] = tables.teacher_table(tables.teacher_comparisons(runs, dataset, "test", seed=seed),
                                                         dev)
        found["lead"][dataset] = tables.teacher_lead(runs, dev, dataset)
        if len(found["teacher"][dataset]):
            _write_csv(out, f"teacher_{dataset}", found["teacher"][dataset])
    return found


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def report_stage(params: Mapping, root: Path | None = None) -> dict:
    root = root or project_root()
    paths = Paths(root)
    out = reset_dir(paths.results())
    runs = collect_runs(params, paths)
    search_metrics = _read_json(paths.metrics("search"))
    hyper = tables.hyperparameter_table(params, _read_json(paths.search_report() / "best_params.json"))
    deployments = read_deployments(params, paths)
    shipped = {d["model"]: d["run"].split("/")[0] for d in deployments if d.get("run") not in (None, "teacher")}
    found = _dataset_tables(params, runs, out, shipped)
    masking = tables.masking_table(runs, masked_pairs(params), seed=params.get("seed", 42))
    if len(masking):
        _write_csv(out, "masking", masking)
    _write_csv(out, "all_runs", tables.all_runs_table(runs))
    _write_csv(out, "hyperparameters", hyper)
    per_class = tables.per_class_table(runs)
    _write_csv(out, "per_class", per_class)
    probes = loss_term_probes(params, paths)
    drivers = tables.loss_driver_summary(probes) if probes else None
    if probes:
        figures.plot_loss_drivers(probes, out / "loss_drivers.png")
        _write_csv(out, "loss_drivers", drivers)
    deployment = tables.deployment_table(deployments) if deployments else None
    section = export_section(params)
    goals = tables.deployment_goals(deployments, section.speedup_goal, section.int8_max_f1_drop) if deployments else []
    if deployments:
        _write_csv(out, "deployment", deployment)
        figures.plot_latency_vs_f1(deployments, out / "latency_vs_f1.png")
    if (paths.search_report() / "trials.csv").exists():
        figures.plot_search(pd.read_csv(paths.search_report() / "trials.csv"),
                            _read_json(paths.search_report() / "importances.json"), out,
                            n_startup_trials=optuna_section(params).n_startup_trials)
    figures.plot_f1_per_model(runs, out / "f1_per_model.png")
    figures.plot_per_class_f1(per_class, out / "per_class_f1.png")
    figures.plot_params_vs_f1(runs, out / "params_vs_f1.png")
    shown = shown_runs(params, runs, deployments)
    figures.plot_confusions(shown, out / "confusion_matrices.png")
    figures.plot_training_curves(shown, out / "training_curves.png")
    write_text(out / "results.md", page.results_markdown(page.StudyReport(
        runs, hyper, search_metrics, found["intervals"], found["ablations"], masking, drivers, deployment, goals,
        found["claims"], found["teacher"], found["fidelity"], found["lead"], found["tables"])))
    return {"runs": runs, **found, "masking": masking, "drivers": drivers, "deployment": deployment, "goals": goals,
            "hyper": hyper, "out": out}
