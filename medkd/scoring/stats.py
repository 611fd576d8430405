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
    """`estimate` with the central `level` percentile interval of its bootstrap `samples`: the one
    interval every bootstrap of the study uses (F1 over test images, speed-ups over timed pairs)."""
    low, high = np.percentile(samples, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return Interval(float(estimate), float(low), float(high))


def align(frames: Mapping[str, pd.DataFrame | Sequence[pd.DataFrame]]) -> dict[str, list[pd.DataFrame]]:
    """Each model's prediction frames (one per seed) in one image order; all must hold the same test images."""
    runs = {name: [value] if isinstance(value, pd.DataFrame) else list(value) for name, value in frames.items()}
    names = list(runs)
    reference = set(runs[names[0]][0]["image_id"])
    for name in names:
        if not runs[name]:
            raise ValueError(f"no predictions for {name!r}")
        for frame in runs[name]:
            if set(frame["image_id"]) != reference:
                raise ValueError(f"predictions of {name!r} and {names[0]!r} are not on the same test images")
    return {name: [frame.sort_values("image_id", kind="stable").reset_index(drop=True) for frame in seeds]
            for name, seeds in runs.items()}


def paired_intervals(frames: Mapping[str, pd.DataFrame | Sequence[pd.DataFrame]], tasks: Sequence[str],
                     differences: Sequence[tuple[str, str]] = (), n_resamples: int = N_RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> pd.DataFrame:
    """Average macro-F1 of each model and of each difference `a − b`, with paired bootstrap intervals.

    A model given several prediction frames (one per training seed) is scored by the mean of its
    seeds' F1. Each resample draws the test images (the same draw for every model: paired) and, for
    each model, its seeds with replacement (independently per model): the interval covers both
    which images were tested and which seeds were trained, so a verdict does not rest on one lucky
    seed. A model with one seed has no seed spread to draw from: its interval covers the images only.
    One row per model, then one per difference: `name`, `estimate`, `low`, `high`, `seeds`, and for
    differences `detectable` (the interval excludes 0).
    """
    runs = align(frames)
    n = len(next(iter(runs.values()))[0])
    weights = resample_weights(n, n_resamples, seed)
    full = np.ones((1, n))
    seed_draws = np.random.default_rng(seed + 1)

    def seed_resampled(seeds: list[pd.DataFrame]) -> np.ndarray:
        per_seed = np.stack([avg_f1_resampled(frame, tasks, weights) for frame in seeds])  # (S, R)
        drawn = seed_draws.integers(0, len(seeds), size=(len(seeds), weights.shape[0]))  # (S, R) seed indices
        return np.take_along_axis(per_seed, drawn, axis=0).mean(axis=0)

    samples = {name: seed_resampled(seeds) for name, seeds in runs.items()}
    estimates = {name: float(np.mean([avg_f1_resampled(frame, tasks, full)[0] for frame in seeds]))
                 for name, seeds in runs.items()}
    rows = [{"name": name, "kind": "model", "seeds": len(runs[name]),
             **vars(percentile_interval(estimates[name], samples[name], level))} for name in runs]
    for a, b in differences:
        interval = percentile_interval(estimates[a] - estimates[b], samples[a] - samples[b], level)
        rows.append({"name": f"{a} − {b}", "kind": "difference", "seeds": min(len(runs[a]), len(runs[b])),
                     **vars(interval), "detectable": interval.excludes_zero})
    return pd.DataFrame(rows)
