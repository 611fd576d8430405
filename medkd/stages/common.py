"""What every stage shares: where outputs go, the notebook set-up, and the data a stage reads."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from medkd.data import DataConfig, PreparedData
from medkd.datasets import DataError
from medkd.params import load_params, project_root

# The hyperparameter sets each student is trained with (sections of `distill:` in params.yaml).
VARIANTS = ("tuned", "baseline")


class Paths:
    """Where each stage writes; dvc.yaml declares the same paths."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def data_report(self, dataset: str) -> Path:
        return self.root / "reports" / "data" / dataset

    def teacher_checkpoint(self, dataset: str) -> Path:
        return self.root / "models" / dataset / "teacher.pt"

    def teacher_cache(self, dataset: str) -> Path:
        return self.root / "models" / dataset / "teacher_cache.pt"

    def teacher_report(self, dataset: str) -> Path:
        return self.root / "reports" / "teachers" / dataset

    def student_checkpoint(self, student: str, variant: str) -> Path:
        return self.root / "models" / "students" / student / f"{variant}.pt"

    def student_report(self, student: str) -> Path:
        return self.root / "reports" / "students" / student

    def metrics(self, name: str) -> Path:
        return self.root / "reports" / "metrics" / f"{name}.json"

    def plot(self, name: str) -> Path:
        return self.root / "reports" / "plots" / f"{name}.csv"

    def optuna_report(self) -> Path:
        return self.root / "reports" / "optuna"

    def optuna_models(self) -> Path:
        return self.root / "models" / "optuna"

    def results(self) -> Path:
        return self.root / "reports" / "results"


@dataclass(frozen=True)
class Stage:
    """A stage notebook's context: the project root, its params.yaml and its output paths."""

    root: Path
    params: dict
    paths: Paths


def open_stage(root: Path | None = None) -> Stage:
    """The first call of every stage notebook."""
    # Plain-text progress bars are intended in rendered notebooks (no ipywidgets).
    warnings.filterwarnings("ignore", message="IProgress not found")
    root = root or project_root()
    return Stage(root, load_params(root), Paths(root))


def data_config(params: Mapping, dataset: str, root: Path) -> DataConfig:
    try:
        section = dict(params["data"][dataset])
    except KeyError:
        raise DataError(f"params.yaml: no data set {dataset!r} under `data:`") from None
    section.setdefault("name", dataset)
    if not os.path.isabs(section["root"]):
        section["root"] = str((root / section["root"]).resolve())
    return DataConfig.from_dict(section)


def load_data(params: Mapping, dataset: str, root: Path) -> PreparedData:
    cfg = data_config(params, dataset, root)
    if not (Path(cfg.root) / cfg.spec.marker).exists():
        raise DataError(
            f"data set {dataset!r} is not at {cfg.root}: run `make data` (copies it from the local "
            "mirror in $MEDKD_DATA_MIRROR, default ../shared/data, or downloads it from its public "
            "source), then `dvc repro`"
        )
    return PreparedData.load(cfg)
