"""Where each stage writes (dvc.yaml declares the same paths), and what outlives a re-run stage
(`.medkd/`: resume state, the Optuna study, the trunk cache)."""

from __future__ import annotations

from pathlib import Path


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
        """The teacher's baseline, the linear probe on its frozen backbones (`medkd.engine.probe`): a run folder."""
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

    def search_report(self) -> Path:
        return self.root / "reports" / "search"

    def search_models(self) -> Path:
        return self.root / "models" / "search"

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
        """The trunk cache (medkd.engine.trunks): content-addressed, shared by every stage and run."""
        return self.state() / "trunks"

    def optuna_storage(self) -> Path:
        return self.state() / "optuna" / "studies.db"


def restore_or_rerun(root: Path, output: Path, stage: str) -> str:
    """What brings back another stage's output that is missing or damaged: DVC's copy, else the stage."""
    return f"`dvc checkout {Path(output).relative_to(root)}` (DVC's own copy) or `dvc repro -f {stage}`"


def rebuild_teacher(paths: Paths, dataset: str) -> str:
    return restore_or_rerun(paths.root, paths.teacher_cache(dataset), f"teacher@{dataset}")
