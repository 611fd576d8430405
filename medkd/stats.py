"""How sure a number is: paired bootstrap intervals over test images, from per-sample predictions.

All models of a data set are scored on the same resamples of its test images (paired), so an
interval of a difference (student − teacher, tuned − baseline) reflects only how the two models
differ on the images, not which images happened to be drawn. Resample r draws n images with
replacement; `weights[r, i]` counts how often image i was drawn, and each task's macro-F1 of
resample r is computed from weighted per-class counts in one matrix product for all resamples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

N_RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate on all test images and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def resample_weights(n: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(n_resamples, n) draw counts: row r is one resample of n items drawn with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples)


def macro_f1_resampled(y_true: Sequence, y_pred: Sequence, weights: np.ndarray) -> np.ndarray:
    """Macro-F1 of each resample (row of `weights`), as scikit-learn's `f1_score(average="macro")`
    would give on that resample: F1_c = 2·TP_c / (true_c + predicted_c), averaged over the classes
    that occur in the resample's labels or predictions."""
    classes = np.unique(np.concatenate([np.asarray(y_true), np.asarray(y_pred)]))
    true = np.asarray(y_true)[:, None] == classes[None, :]  # (n, C) one-hot
    pred = np.asarray(y_pred)[:, None] == classes[None, :]
    weights = np.asarray(weights, dtype=np.float64)
    tp = weights @ (true & pred)  # (R, C) weighted counts
    denominator = weights @ true + weights @ pred
    present = denominator > 0
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=present)
    return f1.sum(axis=1) / present.sum(axis=1)


def avg_f1_resampled(frame: pd.DataFrame, tasks: Sequence[str], weights: np.ndarray) -> np.ndarray:
    """The study's average of the tasks' macro-F1, per resample."""
    return np.mean([macro_f1_resampled(frame[f"{t}_true"], frame[f"{t}_pred"], weights) for t in tasks], axis=0)


def percentile_interval(estimate: float, samples: np.ndarray, level: float = LEVEL) -> Interval:
    low, high = np.percentile(samples, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return Interval(float(estimate), float(low), float(high))


def align(frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The prediction frames in one image order; every frame must hold the same test images."""
    names = list(frames)
    reference = set(frames[names[0]]["image_id"])
    for name in names[1:]:
        if set(frames[name]["image_id"]) != reference:
            raise ValueError(f"predictions of {name!r} and {names[0]!r} are not on the same test images")
    return {name: frame.sort_values("image_id", kind="stable").reset_index(drop=True) for name, frame in frames.items()}


def paired_intervals(frames: Mapping[str, pd.DataFrame], tasks: Sequence[str],
                     differences: Sequence[tuple[str, str]] = (), n_resamples: int = N_RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> pd.DataFrame:
    """Average macro-F1 of each model and of each difference `a − b`, with paired bootstrap intervals.

    One row per model, then one per difference: `name`, `estimate`, `low`, `high`, and for
    differences `detectable` (the interval excludes 0).
    """
    frames = align(frames)
    n = len(next(iter(frames.values())))
    weights = resample_weights(n, n_resamples, seed)
    full = np.ones((1, n))
    samples = {name: avg_f1_resampled(frame, tasks, weights) for name, frame in frames.items()}
    estimates = {name: float(avg_f1_resampled(frame, tasks, full)[0]) for name, frame in frames.items()}
    rows = [{"name": name, "kind": "model", **vars(percentile_interval(estimates[name], samples[name], level))}
            for name in frames]
    for a, b in differences:
        interval = percentile_interval(estimates[a] - estimates[b], samples[a] - samples[b], level)
        rows.append({"name": f"{a} − {b}", "kind": "difference", **vars(interval),
                     "detectable": interval.excludes_zero})
    return pd.DataFrame(rows)
