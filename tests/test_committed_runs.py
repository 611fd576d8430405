"""The committed runs (the default run in reports/ and the full preset's snapshot in reports/full-preset/)
say nothing their files cannot back: every F1 recomputes from the per-image predictions committed beside
it, and the snapshot holds a run for every student, variant and seed its own params.yaml asks for."""
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medkd.catalog.dataset_specs import Vocab
from medkd.scoring.metrics import metrics_from_predictions

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "reports" / "full-preset"


def committed(pattern: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", pattern], capture_output=True, text=True, cwd=REPO).stdout.split()
    return [REPO / name for name in listed]


def vocab_of(frame: pd.DataFrame, tasks: list[str]) -> Vocab:
    """The class names of a predictions file, from its per-class probability columns."""
    return Vocab(tuple(tasks), tuple(tuple(c.split("_prob_", 1)[1] for c in frame.columns
                                           if c.startswith(f"{task}_prob_")) for task in tasks))


RUNS = [p.parent for p in committed("reports/**/metrics.json")
        if (p.parent / "predictions_test.csv").exists()]


def test_both_committed_runs_are_found():
    assert any(SNAPSHOT not in run.parents for run in RUNS)
    assert any(SNAPSHOT in run.parents for run in RUNS)


@pytest.mark.parametrize("run", RUNS, ids=[str(r.relative_to(REPO / "reports")) for r in RUNS])
def test_every_committed_f1_recomputes_from_its_predictions(run):
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("dev", "test"):
        frame = pd.read_csv(run / f"predictions_{split}.csv")
        recomputed = metrics_from_predictions(frame, vocab_of(frame, metrics["tasks"]))
        assert recomputed["n"] == metrics[split]["n"], split
        assert recomputed["avg_f1"] == pytest.approx(metrics[split]["avg_f1"], abs=1e-12), split
        for task in metrics["tasks"]:
            assert recomputed[task]["f1_macro"] == pytest.approx(metrics[split][task]["f1_macro"], abs=1e-12)


EXPORTS = [p.parent for p in committed("reports/**/deployment.json")
           if (p.parent / "predictions_test_int8.csv").exists()]


@pytest.mark.parametrize("export", EXPORTS, ids=[str(e.relative_to(REPO / "reports")) for e in EXPORTS])
def test_every_committed_export_f1_recomputes_from_its_predictions(export):
    deployment = json.loads((export / "deployment.json").read_text())
    for precision in ("fp32", "int8"):
        frame = pd.read_csv(export / f"predictions_test_{precision}.csv")
        tasks = [c[:-len("_true")] for c in frame.columns if c.endswith("_true")]
        recomputed = metrics_from_predictions(frame, vocab_of(frame, tasks))
        assert recomputed["n"] == deployment["n_test"]
        assert recomputed["avg_f1"] == pytest.approx(deployment[precision]["avg_f1"], abs=5e-5), precision


def test_the_full_preset_snapshot_holds_every_run_its_params_ask_for():
    from medkd.config.study import student_runs
    params = yaml.safe_load((SNAPSHOT / "params.yaml").read_text())
    assert params["preset"] == "full"
    expected = {f"students/{student}/{run.name}" for student in params["students"]
                for run in student_runs(params, student)}
    found = {str(run.relative_to(SNAPSHOT)) for run in RUNS if SNAPSHOT / "students" in run.parents}
    assert expected and expected <= found, sorted(expected - found)
    for dataset in params["teachers"]:
        assert (SNAPSHOT / "teachers" / dataset / "predictions_test.csv").exists(), dataset
    environment = json.loads((SNAPSHOT / "teachers" / "medpix" / "metrics.json").read_text())["environment"]
    assert {"cpu", "cpu_isa", "precision", "versions"} <= set(environment)
    assert (SNAPSHOT / "dvc.lock").exists() and (SNAPSHOT / "results" / "results.md").exists()


def test_the_snapshots_stage_times_in_the_docs_are_its_notebooks():
    """docs/reproducibility.md's table of the snapshot: each stage that ran, as papermill timed its notebook."""
    section = (REPO / "docs" / "reproducibility.md").read_text().split("## The full preset's snapshot", 1)[1]
    table = section.split("| stage | seconds | what |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    rows = [[cell.strip() for cell in line.split("|")[1:3]] for line in table]
    stated = {name: int(seconds.replace(",", "")) for name, seconds in rows[:-1]}
    timed = {name: round(json.loads((SNAPSHOT / "notebooks" / f"{name.replace('@', '-')}.ipynb").read_text())
                         ["metadata"]["papermill"]["duration"]) for name in stated}
    assert len(stated) == 21 and stated == timed
    assert rows[-1][1].startswith(f"**{sum(stated.values()):,} (")
