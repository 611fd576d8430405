"""Paired bootstrap intervals: the resampled macro-F1 against scikit-learn, and hand-checkable cases."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from medkd.scoring.stats import macro_f1_resampled, paired_intervals, resample_weights


def _frame(true, pred, ids=None):
    ids = ids if ids is not None else [f"img{i:03d}" for i in range(len(true))]
    return pd.DataFrame({"image_id": ids, "t_true": true, "t_pred": pred})


def test_resampled_macro_f1_equals_scikit_learn_on_each_resample():
    rng = np.random.default_rng(3)
    y_true = rng.choice(["CT", "MR", "US"], size=40, p=[0.6, 0.35, 0.05])
    y_pred = np.where(rng.random(40) < 0.7, y_true, rng.choice(["CT", "MR", "US"], size=40))
    weights = resample_weights(40, n_resamples=50, seed=1)
    fast = macro_f1_resampled(y_true, y_pred, weights)
    for r in range(50):  # the resample written out: each image repeated as often as it was drawn
        drawn = np.repeat(np.arange(40), weights[r])
        assert fast[r] == pytest.approx(f1_score(y_true[drawn], y_pred[drawn], average="macro"), abs=1e-12)
    assert macro_f1_resampled(y_true, y_pred, np.ones((1, 40)))[0] == pytest.approx(
        f1_score(y_true, y_pred, average="macro"), abs=1e-12)


def test_resample_weights_draw_n_with_replacement_reproducibly():
    weights = resample_weights(7, n_resamples=300, seed=5)
    assert weights.shape == (300, 7) and (weights.sum(axis=1) == 7).all()
    assert np.array_equal(weights, resample_weights(7, n_resamples=300, seed=5))
    assert abs(weights.mean() - 1.0) < 0.05


def test_hand_checkable_intervals():
    # 10 images, 5 of each class. `perfect` is always right; `half` says "a" to everything:
    # class a: TP 5, true 5, predicted 10 -> F1 2/3; class b: F1 0 -> macro-F1 1/3.
    true = ["a"] * 5 + ["b"] * 5
    frames = {"perfect": _frame(true, true), "copy": _frame(true, true), "half": _frame(true, ["a"] * 10)}
    table = paired_intervals(frames, ["t"], [("perfect", "copy"), ("perfect", "half")], n_resamples=500, seed=0)
    rows = table.set_index("name")
    assert rows.loc["perfect", ["estimate", "low", "high"]].tolist() == [1.0, 1.0, 1.0]
    assert rows.loc["half", "estimate"] == pytest.approx(1 / 3)
    # Identical predictions: the paired difference is 0 on every resample, not detectable.
    assert rows.loc["perfect − copy", ["estimate", "low", "high"]].tolist() == [0.0, 0.0, 0.0]
    assert not rows.loc["perfect − copy", "detectable"]
    # A resample with k draws of class a (and some of b) scores `half` at (2k/(k + 10) + 0)/2, so the
    # difference is 10/(k + 10) >= 0.5 for k < 10; k = 10 has probability 0.5^10. On all images: 2/3.
    assert rows.loc["perfect − half", "estimate"] == pytest.approx(2 / 3)
    assert rows.loc["perfect − half", "low"] >= 0.5 and rows.loc["perfect − half", "detectable"]


def test_frames_are_paired_by_image_not_by_row_order():
    true = ["a", "b", "a", "b", "a", "b"]
    pred = ["a", "a", "a", "b", "b", "b"]
    frame = _frame(true, pred)
    shuffled = frame.iloc[[3, 0, 5, 1, 4, 2]]
    table = paired_intervals({"x": frame, "y": shuffled}, ["t"], [("x", "y")], n_resamples=200)
    assert table.set_index("name").loc["x − y", ["low", "high"]].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="not on the same test images"):
        paired_intervals({"x": frame, "z": _frame(true, pred, ids=list("uvwxyz"))}, ["t"])


def test_several_seeds_are_resampled_with_the_images():
    """A model's seeds are drawn with replacement on every resample: its interval covers which seeds
    were trained as well as which images were tested, so one lucky seed cannot make a verdict."""
    true = ["a"] * 5 + ["b"] * 5
    perfect, half = _frame(true, true), _frame(true, ["a"] * 10)
    table = paired_intervals({"two seeds": [perfect, half], "perfect": perfect, "half": half}, ["t"],
                             [("perfect", "two seeds")], n_resamples=400, seed=2).set_index("name")
    # On all images and both seeds: (1 + 1/3) / 2.
    assert table.loc["two seeds", "estimate"] == pytest.approx(2 / 3)
    assert table.loc["two seeds", "seeds"] == 2 and table.loc["perfect", "seeds"] == 1
    assert table.loc["perfect − two seeds", "estimate"] == pytest.approx(1 / 3)
    # A quarter of the resamples draw the perfect seed twice (difference 0), a quarter the other one
    # twice (difference perfect − half, at least 0.5, see above): the interval spans both.
    assert table.loc["perfect − two seeds", "low"] == 0.0 and table.loc["perfect − two seeds", "high"] >= 0.5
    assert not table.loc["perfect − two seeds", "detectable"]
    # Averaging the seeds on every resample instead would have called it detectable (low >= 0.25).
    both = paired_intervals({"a": [perfect, perfect], "b": [half, half]}, ["t"], [("a", "b")], n_resamples=400,
                            seed=2).set_index("name")
    alone = paired_intervals({"a": perfect, "b": half}, ["t"], [("a", "b")], n_resamples=400, seed=2)
    assert both.loc["a − b", ["low", "high"]].tolist() == alone.set_index("name").loc["a − b", ["low", "high"]].tolist()
