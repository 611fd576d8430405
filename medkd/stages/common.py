"""What every stage shares: where outputs go, the notebook set-up, and the data a stage reads."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd

from medkd.data import PreparedData
from medkd.datasets import DataError
from medkd.params import load_params, project_root
from medkd.stages.lifecycle import die_with_parent
from medkd.stages.schema import data_config, validate_params


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

    def probe_report(self, dataset: str) -> Path:
        """The teacher's baseline, the linear probe on its frozen backbones (`medkd.probe`): a run folder."""
        return self.teacher_report(dataset) / "probe"

    def student_checkpoint(self, student: str, variant: str) -> Path:
        return self.root / "models" / "students" / student / f"{variant}.pt"

    def student_report(self, student: str) -> Path:
        return self.root / "reports" / "students" / student

    def metrics(self, name: str) -> Path:
        return self.root / "reports" / "metrics" / f"{name}.json"

    def plot(self, name: str) -> Path:
        return self.root / "reports" / "plots" / f"{name}.csv"

    def export_model(self, model: str) -> Path:
        return self.root / "models" / "export" / model

    def export_reports(self) -> Path:
        return self.root / "reports" / "export"

    def export_report(self, model: str) -> Path:
        return self.export_reports() / model

    def optuna_report(self) -> Path:
        return self.root / "reports" / "optuna"

    def optuna_models(self) -> Path:
        return self.root / "models" / "optuna"

    def results(self) -> Path:
        return self.root / "reports" / "results"

    # Not DVC outputs: DVC deletes a stage's outputs before re-running it, and these must survive that.
    def state(self) -> Path:
        return self.root / ".medkd"

    def resume(self, run: str) -> Path:
        """Per-epoch state of an unfinished training run (`run`: e.g. teacher-medpix)."""
        return self.state() / "resume" / f"{run}.pt"

    def clear_resume(self, run: str) -> None:
        """Remove a finished run's state, with the other ranks' files of a data-parallel run."""
        path = self.resume(run)
        for file in [path, *path.parent.glob(f"{path.stem}.rank*{path.suffix}")]:
            file.unlink(missing_ok=True)

    def trunks(self) -> Path:
        """The trunk cache (medkd.trunks): content-addressed, shared by every stage and run."""
        return self.state() / "trunks"

    def optuna_storage(self) -> Path:
        return self.state() / "optuna" / "studies.db"


@dataclass(frozen=True)
class Stage:
    """A stage notebook's context: the project root, its params.yaml and its output paths."""

    root: Path
    params: dict
    paths: Paths


def open_stage(root: Path | None = None) -> Stage:
    """The first call of every stage notebook: finds the project, checks all of params.yaml.

    The notebook's kernel is also told to exit with the process that runs it (no orphan keeps
    training after `dvc` or the stage runner is killed).
    """
    die_with_parent()
    # Plain-text progress bars are intended in rendered notebooks (no ipywidgets).
    warnings.filterwarnings("ignore", message="IProgress not found")
    root = root or project_root()
    params = load_params(root)
    validate_params(params, str(root / "params.yaml"))
    return Stage(root, params, Paths(root))


def load_data(params: Mapping, dataset: str, root: Path) -> PreparedData:
    cfg = data_config(params, dataset, root)
    if not (Path(cfg.root) / cfg.spec.marker).exists():
        raise DataError(
            f"data set {dataset!r} is not at {cfg.root}: run `make data` (copies it from the local "
            "mirror in $MEDKD_DATA_MIRROR, default ../shared/data, or downloads it from its public "
            "source), then `dvc repro`"
        )
    return PreparedData.load(cfg)


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
