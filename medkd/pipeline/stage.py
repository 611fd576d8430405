"""What every stage notebook shares: its set-up (`open_stage`) and the summary of a variant's seeds.

params.yaml is checked whole by the `check` stage, which every other stage waits for (dvc.yaml), so a
stage reads only its own sections here; each is validated as it is built (`medkd.config.sections`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd

from medkd.config.params import load_params, project_root
from medkd.pipeline.lifecycle import die_with_parent
from medkd.pipeline.paths import Paths


@dataclass(frozen=True)
class Stage:
    """A stage notebook's context: the project root, its params.yaml and its output paths."""

    root: Path
    params: dict
    paths: Paths


def open_stage(root: Path | None = None) -> Stage:
    """The first call of every stage notebook: finds the project and reads its params.yaml.

    The notebook's kernel is also told to exit with the process that runs it (no orphan keeps
    training after `dvc` or the stage runner is killed).
    """
    die_with_parent()
    # Plain-text progress bars are intended in rendered notebooks (no ipywidgets).
    warnings.filterwarnings("ignore", message="IProgress not found")
    root = root or project_root()
    return Stage(root, load_params(root), Paths(root))


SUMMARY_METRICS = ("dev_avg_f1", "test_avg_f1")  # what `dvc metrics show` / `dvc exp show` compare per variant


def seed_summary(headline: Mapping) -> dict:
    """{variant: {dev_avg_f1, test_avg_f1: means over its seeds, their _std (several seeds), seeds}}: the
    lean DVC metrics of a stage's runs (each run's own metrics.json keeps its tasks, seeds and environment)."""
    summary: dict = {}
    for variant in dict.fromkeys(run.variant for run in headline):
        frame = pd.DataFrame([values for run, values in headline.items() if run.variant == variant])
        entry = {metric: round(float(frame[metric].mean()), 4) for metric in SUMMARY_METRICS}
        if len(frame) > 1:
            entry.update({f"{metric}_std": round(float(frame[metric].std(ddof=1)), 4) for metric in SUMMARY_METRICS})
        entry["seeds"] = len(frame)
        summary[variant] = entry
    return summary
