"""Stage `distill@<student>`: one student config, trained with each variant's hyperparameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import pandas as pd

from medkd.config.params import project_root
from medkd.config.sections import student_configs
from medkd.config.study import student_runs
from medkd.data.prepared import load_data
from medkd.engine.loop import Distillation, TeacherSource, distill_student
from medkd.pipeline.paths import Paths, rebuild_teacher
from medkd.pipeline.stage import seed_summary
from medkd.scoring.metrics import headline_metrics
from medkd.util import progress
from medkd.util.distributed import barrier, is_main
from medkd.util.files import atomic_write, reset_dir, write_json


def distill_stage(params: Mapping, student: str, root: Path | None = None) -> dict:
    """Train every run of one student (`student_runs`: its variants × their seeds); rank 0 writes
    each run's report under reports/students/<student>/<variant>/seed-<seed>/ and the stage's lean
    DVC metrics (test F1s per run, and their mean ± std over seeds per variant)."""
    root = root or project_root()
    paths = Paths(root)
    dataset = params["students"][student]["dataset"]
    data = load_data(params, dataset, root)
    report_dir = paths.student_report(student)
    if is_main():  # data-parallel (torchrun): rank 0 alone writes
        reset_dir(report_dir)
    barrier()
    runs = student_runs(params, student)
    # The teacher stage's cache: read, never rewritten here (it is that stage's output).
    teacher = TeacherSource(paths.teacher_checkpoint(dataset), cache_path=paths.teacher_cache(dataset),
                            rebuild_stale=False, rebuild_with=rebuild_teacher(paths, dataset))
    results, histories, headline = {}, {}, {}
    for number, run in enumerate(runs, 1):
        model_cfg, loss_cfg, cfg = student_configs(params, student, run.variant, seed=run.seed)
        print(f"--- run {number}/{len(runs)}: {student}, variant {run.variant!r}, seed {run.seed}")
        with progress.span(f"run {number}/{len(runs)}: {run.variant}, seed {run.seed}", (number - 1) / len(runs),
                           number / len(runs)):
            result = distill_student(data, Distillation(
                model_cfg, loss_cfg, cfg, report_dir / run.name, teacher,
                checkpoint_path=paths.student_checkpoint(student, run.name),
                resume_path=paths.resume(f"distill-{student}-{run.slug}"), trunk_dir=paths.trunks()))
        results[run] = result
        if not is_main():
            continue
        headline[run] = headline_metrics(json.loads((report_dir / run.name / "metrics.json").read_text()))
        histories[run] = pd.DataFrame(result.history).set_index("epoch")
    if not is_main():
        return {"results": results}
    summary = seed_summary(headline)
    write_json(paths.metrics(f"distill-{student}"), summary)
    for run, history in histories.items():
        atomic_write(paths.plot(f"distill-{student}/{run.slug}"),
                     lambda p, h=history: h.reset_index().to_csv(p, index=False))
    for run in runs:  # the stage is done: nothing left to resume
        paths.clear_resume(f"distill-{student}-{run.slug}")
    return {"results": results, "summary": summary, "histories": histories,
            "table": run_table(headline)}


def run_table(headline: Mapping) -> pd.DataFrame:
    """One row per run (variant, seed) with its headline metrics: what the notebook shows."""
    return pd.DataFrame([{"variant": run.variant, "seed": run.seed, **values} for run, values in headline.items()])
