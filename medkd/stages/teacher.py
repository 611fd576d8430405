"""Stage `teacher@<dataset>`: train the teacher, run it once over the training split (the cache), and
fit its baseline, the linear probe on its frozen pretrained backbones (`medkd.engine.probe`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import pandas as pd

from medkd.config.params import project_root
from medkd.config.sections import teacher_configs, teacher_loss_config
from medkd.data.prepared import load_data
from medkd.engine.loop import train_teacher
from medkd.engine.probe import linear_probe, write_probe
from medkd.engine.teacher_cache import load_or_build_teacher_cache
from medkd.pipeline.paths import Paths
from medkd.scoring.metrics import headline_metrics
from medkd.util import progress
from medkd.util.distributed import barrier, is_main
from medkd.util.files import atomic_write, reset_dir, write_json


def teacher_stage(params: Mapping, dataset: str, root: Path | None = None) -> dict:
    root = root or project_root()
    paths = Paths(root)
    with progress.span("loading the data", 0.0, 0.05):
        data = load_data(params, dataset, root)
    model_cfg, cfg = teacher_configs(params, dataset)
    report_dir = paths.teacher_report(dataset)
    if is_main():  # data-parallel (torchrun): rank 0 alone writes
        reset_dir(report_dir)
    barrier()
    with progress.span("training the teacher", 0.05, 0.8):
        result = train_teacher(data, model_cfg, cfg, report_dir, checkpoint_path=paths.teacher_checkpoint(dataset),
                               resume_path=paths.resume(f"teacher-{dataset}"), trunk_dir=paths.trunks(),
                               loss_cfg=teacher_loss_config(params, dataset))
    if not is_main():
        return {"result": result}
    with progress.span("the teacher cache", 0.8, 0.85):
        load_or_build_teacher_cache(result.checkpoint, data, cfg, paths.teacher_cache(dataset), all_ranks=False,
                                    trunk_dir=paths.trunks())
    paths.clear_resume(f"teacher-{dataset}")  # the stage is done: nothing left to resume
    with progress.span("the linear probe", 0.85, 1.0):
        probe = linear_probe(data, model_cfg, cfg, trunk_dir=paths.trunks())
    write_probe(probe, paths.probe_report(dataset))
    metrics = json.loads((report_dir / "metrics.json").read_text())
    write_json(paths.metrics(f"teacher-{dataset}"),
               {**headline_metrics(metrics), "probe": {"C": probe.c, **headline_metrics(probe.metrics)}})
    history = pd.DataFrame(result.history)
    atomic_write(paths.plot(f"teacher-{dataset}"), lambda p: history.to_csv(p, index=False))
    return {"result": result, "metrics": metrics, "history": history, "vocab": data.vocab, "probe": probe}
