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


def seed_summary(headline: Mapping) -> dict:
    """{variant: {<metric>: mean over seeds, <metric>_std (several seeds), seed-<s>: {<metric>: value}}}."""
    summary: dict = {}
    for variant in dict.fromkeys(run.variant for run in headline):
        per_seed = {run.seed: values for run, values in headline.items() if run.variant == variant}
        frame = pd.DataFrame(per_seed.values())
        entry = {}
        for metric in frame.columns:
            entry[metric] = round(float(frame[metric].mean()), 4)
            if len(frame) > 1 and metric.endswith("_f1"):
                entry[f"{metric}_std"] = round(float(frame[metric].std(ddof=1)), 4)
        if len(per_seed) > 1:
            entry.update({f"seed-{seed}": values for seed, values in per_seed.items()})
        entry["seeds"] = len(per_seed)
        summary[variant] = entry
    return summary
