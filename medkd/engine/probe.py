"""The teacher's baseline: a linear probe on its backbones' frozen, pretrained pooled features.

A teacher is worth distilling only if it knows more than the simplest use of the same pretrained
backbones: one logistic regression per task on the standardised image and text features, with its
inverse regularisation C chosen on dev (the test split is predicted once, with that C). The probe is
written like any run (metrics.json, predictions_<split>.csv), so the report reads and resamples it
like the teacher and the students.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from medkd.config.configs import ModelConfig, TrainConfig
from medkd.data.prepared import PreparedData
from medkd.engine.trunks import TrunkRun, model_trunks
from medkd.models.backbones import build_tokenizer
from medkd.models.classifier import build_model, count_parameters
from medkd.scoring.metrics import metrics_from_predictions, predictions_frame
from medkd.util import progress
from medkd.util.environment import environment, resolve_device
from medkd.util.files import atomic_write, write_json

C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
PROBE_SPLITS = ("dev", "test")


@dataclass
class ProbeResult:
    c: float
    dev_by_c: dict[float, float]  # dev avg macro-F1 of every C tried
    metrics: dict  # as a run's metrics.json
    frames: dict[str, pd.DataFrame]  # predictions per split


def pooled_features(data: PreparedData, model_cfg: ModelConfig, cfg: TrainConfig,
                    trunk_dir: Path | None) -> tuple[dict[str, np.ndarray], int]:
    """{split: image and text pooled features side by side} of the pretrained backbones, frozen whole
    (read from, or added to, the trunk cache), and the backbones' parameter count."""
    frozen = replace(model_cfg, vision_train_blocks=0, text_train_blocks=0)
    model = build_model(frozen, data.vocab.num_classes).to(resolve_device(cfg.device))
    tokenizer = build_tokenizer(frozen.text, frozen.text_weights)
    cache = model_trunks(model, data, tokenizer, "teacher",
                         TrunkRun(resolve_device(cfg.device), False, trunk_dir, cfg.eval_batch_size))
    parts = [part for part in (cache.vision, cache.text) if part is not None]
    features = {split: torch.cat([part[split].flatten(1) for part in parts], 1).float().numpy()
                for split in ("train", *PROBE_SPLITS)}
    backbones = sum(count_parameters(m) for m in (model.vision, model.text) if m is not None)
    return features, backbones


def linear_probe(data: PreparedData, model_cfg: ModelConfig, cfg: TrainConfig, trunk_dir: Path | None = None,
                 c_grid: tuple[float, ...] = C_GRID) -> ProbeResult:
    """Fit the probe on train for every C in `c_grid`, keep the C with the best dev avg macro-F1 (the
    first such C on ties: the strongest regularisation), and predict dev and test with it."""
    if not c_grid:
        raise ValueError("linear_probe: c_grid is empty; give at least one inverse regularisation C")
    started = time.perf_counter()
    features, backbone_parameters = pooled_features(data, model_cfg, cfg, trunk_dir)
    labelled = data.labelled_train()  # the images whose labels a run may see (data.<d>.label_fraction)
    features["train"] = features["train"][labelled]
    scaler = StandardScaler().fit(features["train"])
    x = {split: scaler.transform(f) for split, f in features.items()}
    labels = {split: data.labels[split].numpy() for split in x}
    labels["train"] = labels["train"][labelled]
    image_ids = {split: [r.image_id for r in data.records[split]] for split in PROBE_SPLITS}

    def fit(c: float) -> list[LogisticRegression]:
        return [LogisticRegression(C=c, max_iter=5000).fit(x["train"], labels["train"][:, task])
                for task in range(len(data.vocab.tasks))]

    def frame(classifiers: list[LogisticRegression], split: str) -> pd.DataFrame:
        # log-probabilities as logits: the frame's softmax gives back the classifier's probabilities
        logits = [torch.from_numpy(np.log(np.clip(clf.predict_proba(x[split]), 1e-12, None))) for clf in classifiers]
        index = torch.arange(len(x[split]))
        return predictions_frame(index, logits, image_ids[split], torch.from_numpy(labels[split]), data.vocab)

    dev_by_c, best = {}, None
    for number, c in enumerate(c_grid):
        progress.update(f"logistic regression, C {c:g} ({number + 1}/{len(c_grid)})", fraction=number / len(c_grid),
                        force=True)
        classifiers = fit(c)
        dev_by_c[c] = metrics_from_predictions(frame(classifiers, "dev"), data.vocab)["avg_f1"]
        if best is None or dev_by_c[c] > dev_by_c[best[0]]:
            best = (c, classifiers)
    c, classifiers = best
    frames = {split: frame(classifiers, split) for split in PROBE_SPLITS}
    probe_parameters = sum(clf.coef_.size + clf.intercept_.size for clf in classifiers)
    metrics = {"parameters": int(backbone_parameters + probe_parameters), "trained_parameters": int(probe_parameters),
               "best_epoch": 0, "seed": None, "C": c, "dev_avg_f1_by_C": {str(k): v for k, v in dev_by_c.items()},
               "seconds": round(time.perf_counter() - started, 1), "tasks": list(data.vocab.tasks),
               **{split: metrics_from_predictions(f, data.vocab) for split, f in frames.items()},
               "environment": environment(resolve_device(cfg.device), False, "fp32")}
    return ProbeResult(c, dev_by_c, metrics, frames)


def write_probe(result: ProbeResult, out_dir: Path) -> None:
    """The probe as a run folder: metrics.json and predictions_<split>.csv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, frame in result.frames.items():
        atomic_write(out_dir / f"predictions_{split}.csv", lambda p, f=frame: f.to_csv(p, index=False))
    write_json(out_dir / "metrics.json", result.metrics)
