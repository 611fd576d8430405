"""Stage functions in-process on a tiny project: resume state and the Optuna study outlive a killed stage."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import free_port

import medkd.stages.search as tune_module
from medkd.catalog.dataset_specs import DataError
from medkd.catalog.synthetic import make_synthetic_medpix
from medkd.config.problems import ParamsError
from medkd.config.study import student_runs
from medkd.engine.loop import TrainingInterrupted
from medkd.pipeline.stage import Paths, open_stage
from medkd.stages.distill import distill_stage
from medkd.stages.prepare import prepare_stage
from medkd.stages.report import read_deployments
from medkd.stages.search import search_stage

REPO = Path(__file__).resolve().parents[1]


def test_a_stage_names_a_bad_value_of_the_sections_it_reads(project):
    """The check stage checks params.yaml whole before any other stage (dvc.yaml); a stage run by itself
    still refuses a bad value in a section it reads, by its key path, before it trains."""
    root, params = project
    bad = yaml.safe_load(yaml.safe_dump(params))
    bad["distill"]["tuned"]["train"]["lr"] = "fast"
    with pytest.raises(ParamsError, match=r"1 problem\n  distill.tuned.train.lr: Input should be a valid number"):
        distill_stage(bad, "tiny-a", root)
    assert open_stage(root).params == params


def test_teacher_stage_leaves_no_resume_state(project):
    root, _ = project
    assert not Paths(root).resume("teacher-medpix").exists()
    assert Paths(root).teacher_cache("medpix").exists()


def test_distill_stage_resumes_a_killed_variant_and_keeps_the_finished_one(project, monkeypatch):
    root, params = project
    paths = Paths(root)
    reference = distill_stage(params, "tiny-a", root)["summary"]
    import medkd.stages.distill as distill_module
    real = distill_module.distill_student
    calls = []

    def interrupt_baseline(data, run):
        calls.append(run.resume_path.name)
        if "baseline" in calls[-1] and calls.count(calls[-1]) == 1:  # the first baseline run, once
            run = dataclasses.replace(run, report_epoch=lambda epoch, score: (_ for _ in ()).throw(KeyboardInterrupt))
        return real(data, run)

    monkeypatch.setattr(distill_module, "distill_student", interrupt_baseline)
    with pytest.raises(TrainingInterrupted, match="interrupted at epoch 2 of 2: epochs 1-1 are saved"):
        distill_stage(params, "tiny-a", root)
    # Both tuned seeds finished before the baseline run was killed; all three left their state.
    assert [paths.resume(f"distill-tiny-a-{run}").exists() for run in ("tuned-seed42", "tuned-seed7",
                                                                       "baseline-seed42")] == [True] * 3
    resumed = distill_stage(params, "tiny-a", root)["summary"]
    for variant in ("tuned", "baseline"):
        for key in ("test_avg_f1", "dev_avg_f1", "seeds"):
            assert resumed[variant][key] == reference[variant][key]
    assert not list((paths.state() / "resume").glob("distill-tiny-a-*"))  # cleared when the stage finished


def test_a_killed_search_stage_continues_with_the_remaining_trials(project, monkeypatch):
    root, params = project
    params = yaml.safe_load(yaml.safe_dump(params))
    params["optuna"]["retrain_best"] = False
    real = tune_module.distill_student
    calls = []

    def killed_in_second_trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "distill_student", killed_in_second_trial)
    with pytest.raises(KeyboardInterrupt):
        search_stage(params, root)
    monkeypatch.setattr(tune_module, "distill_student", real)
    run = search_stage(params, root)
    states = [t.state for t in run["study"].trials]
    assert states[0] == optuna.trial.TrialState.COMPLETE  # the first trial's result was kept, not re-run
    assert states[1] == optuna.trial.TrialState.FAIL  # the interrupted one is recorded as such
    done = [s for s in states if s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == params["optuna"]["n_trials"]
    first_values = run["study"].trials[0].params
    assert all(t.params != first_values for t in run["study"].trials[2:])  # no start-up value drawn twice
    # Another search space is another study: its trials never mix with these.
    params["optuna"]["search_space"]["loss.kl.temperature"]["high"] = 5.0
    other = search_stage(params, root)
    assert other["study"].study_name != run["study"].study_name
    assert len(other["study"].trials) == params["optuna"]["n_trials"]


def test_prepare_writes_its_report_whole_or_not_at_all(project, tmp_path):
    _, params = project
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    make_synthetic_medpix(tmp_path / "data" / "medpix-2.0", sizes=(16, 6, 6), image_size=16)
    prepared = prepare_stage(params, "medpix", tmp_path)
    before = {p.name: p.read_bytes() for p in prepared["out"].iterdir()}
    assert {"manifest_train.csv", "vocab.json", "data_report.md", "examples.png"} <= set(before)
    broken = next((tmp_path / "data" / "medpix-2.0" / "images").glob("*.png"))
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(DataError, match=f"unreadable image .*{broken.name}"):
        prepare_stage(params, "medpix", tmp_path)
    assert {p.name: p.read_bytes() for p in prepared["out"].iterdir()} == before
    assert [p.name for p in prepared["out"].parent.iterdir()] == ["medpix"]  # no half-written folder beside it


def test_distill_stages_run_side_by_side(project):
    """Two students' distill stages at once (two processes, as two queue workers or devices would):
    no file is written by both and each result is byte-identical to its run alone."""
    root, params = project
    paths = Paths(root)
    students = ["tiny-a", "tiny-b"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

    def start(student):
        return subprocess.Popen([sys.executable, "-m", "medkd", "train", "student", student, "--root", str(root)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(runs):
        outputs = [run.communicate(timeout=600)[0] for run in runs]
        assert [run.returncode for run in runs] == [0] * len(runs), outputs

    alone = {}
    for student in students:
        finish([start(student)])
        alone[student] = _stage_outputs(paths, student)
    finish([start(student) for student in students])
    together = {student: _stage_outputs(paths, student) for student in students}
    assert not set(together["tiny-a"]) & set(together["tiny-b"])
    assert together == alone and all(alone.values())


def _stage_outputs(paths: Paths, student: str) -> dict[str, bytes]:
    """The results a distill stage writes (predictions, metrics), without timings."""
    files = [*paths.student_report(student).rglob("*"), paths.metrics(f"distill-{student}")]
    return {str(f.relative_to(paths.root)): _without_timings(f) for f in files
            if f.is_file() and f.suffix in (".csv", ".json") and f.name != "history.csv"}


def _without_timings(path: Path) -> bytes:
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return json.dumps(_drop_seconds(data), sort_keys=True).encode()
    return path.read_bytes()


def _drop_seconds(node):
    if isinstance(node, dict):
        return {k: _drop_seconds(v) for k, v in node.items() if "seconds" not in k}
    return node


def test_a_distill_stage_runs_data_parallel_under_torchrun(project, tmp_path):
    """`torchrun --nproc_per_node 2 -m medkd train student`: both ranks train, rank 0 alone writes the
    stage's outputs (the same files a one-process run writes) and no rank's resume state is left."""
    root, params = project
    paths = Paths(root)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    port = free_port()
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), "-m", "medkd", "train", "student", "tiny-b",
                          "--root", str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = _stage_outputs(paths, "tiny-b")
    assert sorted(written) == sorted(
        [f"reports/students/tiny-b/{run.name}/{f}" for run in student_runs(params, "tiny-b") for f in
         ("metrics.json", "predictions_dev.csv", "predictions_test.csv", "loss_terms.csv")]
        + ["reports/metrics/distill-tiny-b.json"])
    assert all((root / name).stat().st_mtime >= started for name in written)  # written by this run
    assert not list((paths.state() / "resume").glob("distill-tiny-b-*"))


def test_the_report_reads_the_exports_of_the_models_params_names_only(tmp_path):
    # A renamed student's export folder stays on disk (DVC does not delete a dropped stage's outputs).
    paths = Paths(tmp_path)
    for model in ("old-student", "s-b", "teacher-medpix", "teacher-gone"):
        folder = paths.export_report(model)
        folder.mkdir(parents=True)
        (folder / "deployment.json").write_text(json.dumps({"model": model}))
    params = {"teachers": {"medpix": {}, "wound": {}}, "students": {"s-b": {}, "s-a": {}}}
    assert [d["model"] for d in read_deployments(params, paths)] == ["teacher-medpix", "s-b"]
