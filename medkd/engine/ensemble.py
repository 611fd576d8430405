"""An ensemble teacher (Hinton et al.): one teacher trained once per seed, the members answering as one
(`medkd.models.classifier.EnsembleClassifier`: logits averaged). Every member reads the same trunk
caches, so a member costs its fusion and heads' training; members with frozen pretrained backbones
share them in the ensemble's checkpoint and export."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from medkd.config.configs import ModelConfig, TrainConfig
from medkd.config.loss_terms import LossConfig
from medkd.data.prepared import PreparedData
from medkd.engine.evaluation import evaluate, training_device
from medkd.engine.loop import RunResult, train_teacher
from medkd.engine.trunks import TrunkRun, model_trunks
from medkd.models.backbones import build_tokenizer
from medkd.models.checkpoint import load_checkpoint, save_checkpoint
from medkd.models.classifier import EnsembleClassifier, count_parameters
from medkd.util import progress
from medkd.util.environment import environment
from medkd.util.files import atomic_write, write_json


def train_teacher_ensemble(data: PreparedData, model_cfg: ModelConfig, cfg: TrainConfig, seeds: Sequence[int],
                           out_dir: Path, checkpoint_path: Path, resume_path: Path | None = None,
                           trunk_dir: Path | None = None, loss_cfg: LossConfig | None = None) -> RunResult:
    """Train one teacher per seed (each `out_dir/member-<seed>/`: its metrics, dev/test predictions,
    history), then save and evaluate their ensemble: `checkpoint_path`, and in `out_dir` the ensemble's
    metrics.json, predictions and the members' histories (a `member` column) as history.csv."""
    started = time.perf_counter()
    out_dir, checkpoint_path = Path(out_dir), Path(checkpoint_path)
    members, results = [], []
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=checkpoint_path.parent, prefix=".members-") as tmp:
        for number, seed in enumerate(seeds):
            with progress.span(f"member {number + 1} of {len(seeds)} (seed {seed})", number / len(seeds),
                               (number + 1) / len(seeds)):
                member_resume = member_resume_path(resume_path, seed) if resume_path else None
                result = train_teacher(data, model_cfg, dataclasses.replace(cfg, seed=seed),
                                       out_dir / f"member-{seed}", checkpoint_path=Path(tmp) / f"seed-{seed}.pt",
                                       resume_path=member_resume, trunk_dir=trunk_dir, loss_cfg=loss_cfg)
            results.append(result)
            members.append(load_checkpoint(result.checkpoint)[0])
        ensemble = EnsembleClassifier(members)
        save_checkpoint(checkpoint_path, ensemble, model_cfg, data.vocab, data.config,
                        {"member_seeds": list(seeds), "member_best_epochs": [r.best_epoch for r in results]})
    device, bf16 = training_device(cfg)
    ensemble = ensemble.to(device)
    tokenizer = build_tokenizer(model_cfg.text, model_cfg.text_weights)
    trunks = model_trunks(ensemble, data, tokenizer, "teacher",
                          TrunkRun(device, bf16, trunk_dir, cfg.eval_batch_size, cfg.channels_last)) \
        if cfg.trunk_cache else None
    scores = {}
    for split in ("dev", "test"):
        scores[split], frame = evaluate(ensemble, data, split, tokenizer, "teacher", cfg, device, bf16, trunks)
        atomic_write(out_dir / f"predictions_{split}.csv", lambda p, f=frame: f.to_csv(p, index=False))
    history = [{"member": seed, **row} for seed, r in zip(seeds, results) for row in r.history]
    seconds = time.perf_counter() - started
    write_json(out_dir / "metrics.json", {
        "parameters": count_parameters(ensemble), "members": list(seeds),
        "member_dev_avg_f1": [round(r.dev["avg_f1"], 6) for r in results],
        "member_best_epochs": [r.best_epoch for r in results],
        "best_epoch": max(r.best_epoch for r in results),  # the latest epoch a member kept
        "seconds": round(seconds, 1),
        "tasks": list(data.vocab.tasks), **scores,
        "environment": environment(device, bf16, cfg.precision)})
    atomic_write(out_dir / "history.csv", lambda p: pd.DataFrame(history).to_csv(p, index=False))
    for seed in seeds if resume_path else ():  # the ensemble is saved: nothing left to resume
        member_resume_path(resume_path, seed).unlink(missing_ok=True)
    return RunResult(checkpoint_path, max(r.best_epoch for r in results), scores["dev"], scores["test"], history,
                     count_parameters(ensemble), seconds)


def member_resume_path(resume_path: Path, seed: int) -> Path:
    """A member's per-epoch state beside the ensemble's (an interrupted ensemble resumes member by member)."""
    path = Path(resume_path)
    return path.with_name(f"{path.stem}-seed{seed}{path.suffix}")
