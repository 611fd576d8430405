"""Stage `teacher@<dataset>`: train the teacher, run it once over the training split (the cache), and
fit its baseline, the linear probe on its frozen pretrained backbones (`medkd.engine.probe`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import pandas as pd
import torch

from medkd.config.params import project_root
from medkd.config.sections import teacher_configs, teacher_loss_config, teacher_plan
from medkd.data.prepared import load_data
from medkd.engine.ensemble import train_teacher_ensemble
from medkd.engine.loop import train_teacher
from medkd.engine.probe import linear_probe, write_probe
from medkd.engine.teacher_cache import load_or_build_teacher_cache
from medkd.models.classifier import TASK_LOGITS
from medkd.pipeline.paths import Paths
from medkd.scoring.metrics import headline_metrics
from medkd.util import progress
from medkd.util.distributed import barrier, is_main
from medkd.util.files import atomic_write, reset_dir, write_json


def teacher_stage(params: Mapping, dataset: str, root: Path | None = None) -> dict:
    root = root or project_root()
    paths = Paths(root)
    model_cfg, cfg = teacher_configs(params, dataset)
    plan = teacher_plan(params, dataset)
    with progress.span("loading the data", 0.0, 0.05):
        data = load_data(params, dataset, root).at_image_size(plan.image_size)
    report_dir = paths.teacher_report(dataset)
    if is_main():  # data-parallel (torchrun): rank 0 alone writes
        reset_dir(report_dir)
    barrier()
    train = dict(checkpoint_path=paths.teacher_checkpoint(dataset), resume_path=paths.resume(f"teacher-{dataset}"),
                 trunk_dir=paths.trunks(), loss_cfg=teacher_loss_config(params, dataset))
    with progress.span("training the teacher", 0.05, 0.8):
        if len(plan.seeds) > 1:
            result = train_teacher_ensemble(data, model_cfg, cfg, plan.seeds, report_dir, **train)
        else:
            result = train_teacher(data, model_cfg, dataclasses.replace(cfg, seed=plan.seeds[0]), report_dir, **train)
    if not is_main():
        return {"result": result}
    with progress.span("the teacher cache", 0.8, 0.85):
        cache = load_or_build_teacher_cache(result.checkpoint, data, cfg, paths.teacher_cache(dataset),
                                            all_ranks=False, trunk_dir=paths.trunks())
    paths.clear_resume(f"teacher-{dataset}")  # the stage is done: nothing left to resume
    with progress.span("the linear probe", 0.85, 1.0):
        probe = linear_probe(data, model_cfg, cfg, trunk_dir=paths.trunks())
    write_probe(probe, paths.probe_report(dataset))
    sure = confidence(cache, pd.read_csv(report_dir / "predictions_dev.csv"), data)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    write_json(report_dir / "metrics.json", {**metrics, "confidence": sure})
    write_json(paths.metrics(f"teacher-{dataset}"),
               {**headline_metrics(metrics), "confidence": sure,
                "probe": {"C": probe.c, **headline_metrics(probe.metrics)}})
    history = pd.DataFrame(result.history)
    atomic_write(paths.plot(f"teacher-{dataset}"), lambda p: history.to_csv(p, index=False))
    return {"result": result, "metrics": metrics, "history": history, "vocab": data.vocab, "probe": probe,
            "confidence": sure, "dev_by_epoch": dev_by_epoch(history)}


def confidence(cache: dict, dev: pd.DataFrame, data) -> dict:
    """How sure the teacher is: its mean top-class probability per task (T = 1) on the training images,
    which are all that distillation reads (from its cache), and on dev. Near 1 on train and lower on dev:
    it has memorised what it teaches."""
    train = {task: round(float(torch.softmax(cache["outputs"][key], dim=1).max(dim=1).values.mean()), 4)
             for task, key in zip(data.vocab.tasks, TASK_LOGITS)}
    held_out = {task: round(float(dev[[f"{task}_prob_{c}" for c in classes]].to_numpy().max(axis=1).mean()), 4)
                for task, classes in zip(data.vocab.tasks, data.vocab.classes)}
    return {"train": train, "dev": held_out}


def dev_by_epoch(history: pd.DataFrame) -> pd.DataFrame:
    """Dev avg F1 per epoch: one column per ensemble member (its seed), or the teacher's."""
    if "member" in history:
        return history.pivot_table(index="epoch", columns="member", values="dev_avg_f1").add_prefix("member seed ")
    return history.set_index("epoch")[["dev_avg_f1"]].rename(columns={"dev_avg_f1": "teacher"})
