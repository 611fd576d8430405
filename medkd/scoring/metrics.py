"""Metrics: macro-F1, accuracy and confusion per task, per-sample prediction frames, run files.

Every reported number can be recomputed from a run's `predictions_<split>.csv` with
`metrics_from_predictions`; the engine writes those files and the report reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from medkd.catalog.dataset_specs import Vocab


def task_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    return {
        "f1_macro": float(f1_score(y_true, y_pred, average="macro")),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "confusion": confusion_matrix(y_true, y_pred, labels=list(range(n_classes))).tolist(),
    }


def predictions_frame(index: torch.Tensor, logits: Sequence[torch.Tensor], image_ids: Sequence[str],
                      labels: torch.Tensor, vocab: Vocab) -> pd.DataFrame:
    """Per-sample predictions: index, image id, true and predicted class, class probabilities.

    `logits`: (task 1, task 2) logits of the samples `index`, positions in the split's
    `image_ids` / `labels`.
    """
    index = index.numpy()
    frame = {"index": index, "image_id": [image_ids[i] for i in index]}
    true = labels[index].numpy()
    for t, task_logits in enumerate(logits):
        task, classes = vocab.tasks[t], vocab.classes[t]
        probs = torch.softmax(task_logits, dim=1).numpy()
        frame[f"{task}_true"] = [classes[i] for i in true[:, t]]
        frame[f"{task}_pred"] = [classes[i] for i in probs.argmax(1)]
        for c, name in enumerate(classes):
            frame[f"{task}_prob_{name}"] = probs[:, c]
    return pd.DataFrame(frame)


def metrics_from_predictions(frame: pd.DataFrame, vocab: Vocab) -> dict:
    """The metrics of a predictions file: every reported number can be recomputed from it."""
    result = {}
    for t, task in enumerate(vocab.tasks):
        lookup = {c: i for i, c in enumerate(vocab.classes[t])}
        y_true = frame[f"{task}_true"].map(lookup).to_numpy()
        y_pred = frame[f"{task}_pred"].map(lookup).to_numpy()
        result[task] = task_metrics(y_true, y_pred, len(vocab.classes[t]))
    result["avg_f1"] = float(np.mean([result[t]["f1_macro"] for t in vocab.tasks]))
    result["n"] = int(len(frame))
    return result


def headline_metrics(result: Mapping) -> dict:
    """The numbers a person compares, from a run's metrics.json, for `dvc metrics show/diff`: F1s and
    size. Timings, confusion matrices and the environment stay in the run's own metrics.json (a diff
    of two reproductions would otherwise be all seconds)."""
    out = {"parameters": result["parameters"]}
    for split in ("dev", "test"):
        if split in result:
            out[f"{split}_avg_f1"] = round(result[split]["avg_f1"], 4)
            for task in result["tasks"]:
                out[f"{split}_{task}_f1"] = round(result[split][task]["f1_macro"], 4)
    return out


def vocab_of_predictions(frame: pd.DataFrame, tasks: Sequence[str]) -> Vocab:
    """The class names of each task, read from a predictions file's probability columns."""
    classes = tuple(tuple(sorted(c.removeprefix(f"{t}_prob_") for c in frame.columns if c.startswith(f"{t}_prob_")))
                    for t in tasks)
    return Vocab(tuple(tasks), classes)


def load_run(run_dir: Path) -> dict:
    """A finished run's metrics.json plus its test metrics recomputed from predictions_test.csv (kept
    as `predictions` for the paired bootstrap)."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    frame = pd.read_csv(run_dir / "predictions_test.csv")
    vocab = vocab_of_predictions(frame, metrics["tasks"])
    history = pd.read_csv(run_dir / "history.csv") if (run_dir / "history.csv").exists() else None
    dev = pd.read_csv(run_dir / "predictions_dev.csv") if (run_dir / "predictions_dev.csv").exists() else None
    return {"metrics": metrics, "test": metrics_from_predictions(frame, vocab), "vocab": vocab, "history": history,
            "predictions": frame, "dev_predictions": dev}


def fidelity(student: Mapping[str, pd.DataFrame], teacher: Mapping[str, pd.DataFrame], tasks: Sequence[str]) -> dict:
    """How closely a student follows its teacher (Stanton et al. 2021), from both runs' prediction frames
    per split ({"dev": frame, "test": frame}): per split and task the share of images on which their
    predicted classes match (`agree_<split>_<task>`), and per task the mean KL(teacher || student) of their
    class probabilities on dev (`kl_dev_<task>`, nats, at T = 1) and the two tasks' mean (`kl_dev`)."""
    out = {}
    for split in ("dev", "test"):
        s, t = student.get(split), teacher.get(split)
        if s is None or t is None:
            continue
        t = t.set_index("image_id").loc[s.image_id]  # the same images in the same order
        for task in tasks:
            out[f"agree_{split}_{task}"] = float(np.mean(s[f"{task}_pred"].to_numpy() == t[f"{task}_pred"].to_numpy()))
            if split == "dev":
                columns = [c for c in s.columns if c.startswith(f"{task}_prob_")]
                p_t = np.clip(t[columns].to_numpy(dtype=float), 1e-12, None)
                p_s = np.clip(s[columns].to_numpy(dtype=float), 1e-12, None)
                out[f"kl_dev_{task}"] = float(np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)))
    if all(f"kl_dev_{task}" in out for task in tasks):
        out["kl_dev"] = float(np.mean([out[f"kl_dev_{task}"] for task in tasks]))
    return out
