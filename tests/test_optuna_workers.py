"""Several workers, one Optuna study: on a real PostgreSQL server and in a journal file.

Workers are separate processes (`medkd optuna-worker`), as on separate machines; together they
must run exactly `optuna.n_trials` trials, and the stage then collects the finished study.
"""

import subprocess
import sys
import time

import optuna
import pytest
import yaml

import medkd.stages.search as tune_module
from medkd.stages.search import TRIAL_ERROR_ATTR, Search, search_stage

N_TRIALS = 6


def _with_storage(project, storage):
    root, params = project
    params = yaml.safe_load(yaml.safe_dump(params))
    params["optuna"].update(n_trials=N_TRIALS, storage=storage, retrain_best=False)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root, params


def _two_workers_share_one_study(project, storage):
    root, params = _with_storage(project, storage)
    command = [sys.executable, "-m", "medkd", "optuna-worker", "--root", str(root)]
    workers = [subprocess.Popen([*command, "--worker", str(k)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for k in (1, 2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[-3000:] for o in outputs]
    trials = Search.open(params, root).study().trials
    assert len(trials) == N_TRIALS, outputs
    assert sorted(t.number for t in trials) == list(range(N_TRIALS))
    states = optuna.trial.TrialState
    assert all(t.state in (states.COMPLETE, states.PRUNED) for t in trials)
    ran_by = {t.user_attrs["worker"] for t in trials}
    assert ran_by == {1, 2}, f"one worker ran every trial: {outputs}"
    # The two workers' trials overlapped in time: they really ran side by side.
    first, second = ([t for t in trials if t.user_attrs["worker"] == k] for k in (1, 2))
    assert any(a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
               for a in first for b in second)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == N_TRIALS  # no two trials drew the same values
    # The stage finds the study done, runs nothing more and reports the best of all recorded values.
    run = search_stage(params, root)
    assert len(run["study"].trials) == N_TRIALS
    complete = [t for t in run["study"].trials if t.state == states.COMPLETE]
    assert run["best"].value == max(t.value for t in complete)
    assert run["metrics"]["n_trials"] == N_TRIALS


def test_two_workers_share_one_study_on_postgresql(project, postgres_url):
    _two_workers_share_one_study(project, postgres_url)


def test_two_workers_share_one_study_in_a_journal_file(project, tmp_path):
    _two_workers_share_one_study(project, f"journal:{tmp_path / 'optuna.journal'}")


def test_a_failing_trial_is_recorded_as_failed_and_counts(project, tmp_path, monkeypatch):
    root, params = _with_storage(project, f"journal:{tmp_path / 'failing.journal'}")
    real = tune_module.distill_student
    calls = []

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("the second trial breaks")
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "distill_student", fails_second)
    run = search_stage(params, root)
    trials = run["study"].trials
    assert len(trials) == N_TRIALS and len(calls) == N_TRIALS
    assert trials[1].state == optuna.trial.TrialState.FAIL
    assert trials[1].user_attrs[TRIAL_ERROR_ATTR] == "ValueError: the second trial breaks"
    assert run["metrics"]["n_failed"] == 1


def test_stage_workers_run_beside_it_on_this_machine(project, tmp_path, monkeypatch):
    """`optuna.workers: 2`: the stage starts one more worker process and both share the budget.

    The stage's own trials are slowed down (3 s each) so that the second process, which needs a
    few seconds to start, finds trials left to run.
    """
    root, params = _with_storage(project, f"journal:{tmp_path / 'stage.journal'}")
    params["optuna"]["workers"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    real = tune_module.distill_student

    def slow(*args, **kwargs):
        time.sleep(3)
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "distill_student", slow)
    run = search_stage(params, root)
    trials = run["study"].trials
    assert len(trials) == N_TRIALS
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}


def test_a_storage_without_a_shared_lock_is_refused(project):
    root, params = project
    with pytest.raises(ValueError, match="shared studies need PostgreSQL"):
        with tune_module.study_lock("mysql://host/db", "study"):
            pass
