"""Stage `distill@<student>`: one student config, trained with each variant's hyperparameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import pandas as pd

from medkd.distributed import barrier, is_main
from medkd.files import atomic_write, reset_dir, write_json
from medkd.metrics import headline_metrics
from medkd.params import project_root
from medkd.stages.common import Paths, load_data
from medkd.stages.schema import student_configs, variants
from medkd.train import distill_student


def distill_stage(params: Mapping, student: str, root: Path | None = None) -> dict:
    root = root or project_root()
    paths = Paths(root)
    dataset = params["students"][student]["dataset"]
    data = load_data(params, dataset, root)
    report_dir = paths.student_report(student)
    if is_main():  # data-parallel (torchrun): rank 0 alone writes
        reset_dir(report_dir)
    barrier()
    results, histories, summary = {}, {}, {}
    for variant in variants(params):
        model_cfg, loss_cfg, cfg = student_configs(params, student, variant)
        print(f"--- variant {variant!r}: {student}")
        result = distill_student(
            data, paths.teacher_checkpoint(dataset), model_cfg, loss_cfg, cfg, report_dir / variant,
            cache_path=paths.teacher_cache(dataset), checkpoint_path=paths.student_checkpoint(student, variant),
            rebuild_stale_cache=False, resume_path=paths.resume(f"distill-{student}-{variant}"),
        )
        results[variant] = result
        if not is_main():
            continue
        summary[variant] = headline_metrics(json.loads((report_dir / variant / "metrics.json").read_text()))
        histories[variant] = pd.DataFrame(result.history).set_index("epoch")
    if not is_main():
        return {"results": results}
    tuned, base = summary["tuned"]["test_avg_f1"], summary["baseline"]["test_avg_f1"]
    summary["improvement_vs_baseline_pct"] = round(100 * (tuned - base) / base, 2) if base else None
    write_json(paths.metrics(f"distill-{student}"), summary)
    for variant, history in histories.items():
        atomic_write(paths.plot(f"distill-{student}/{variant}"), lambda p, h=history: h.reset_index().to_csv(p, index=False))
    for variant in variants(params):  # the stage is done: nothing left to resume
        paths.clear_resume(f"distill-{student}-{variant}")
    curves = pd.concat({v: h[["dev_avg_f1", "train_total"]] for v, h in histories.items()}, axis=1)
    curves.columns = [f"{v}_{c}" for v, c in curves.columns]
    return {"results": results, "summary": summary, "curves": curves}
