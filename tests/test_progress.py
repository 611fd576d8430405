"""A run a person can watch: progress events from the stages, and the runner's terminal lines."""

import io
import json

import pytest

from medkd.pipeline.runner import HEARTBEAT, PRINT_EVERY, Watch, clock
from medkd.util import progress


@pytest.fixture
def events(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(progress.ENV, str(path))
    monkeypatch.setattr(progress, "_last_written", 0.0)
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_spans_nest_into_the_stages_fraction_done(events):
    with progress.span("run 2/4: tuned, seed 42", 0.25, 0.5):
        progress.update("student epoch 1/2 done", fraction=0.5, dev=0.81)
        with progress.span("", 0.5, 1.0):  # an unlabelled part: its label is left out
            progress.update("eval dev", fraction=0.5, force=True)
    progress.update("after", force=True)  # routine updates closer than MIN_INTERVAL are dropped, forced ones not
    found = read(events)
    assert [e["doing"] for e in found] == ["run 2/4: tuned, seed 42", "run 2/4: tuned, seed 42 · student epoch 1/2 done",
                                           "run 2/4: tuned, seed 42", "run 2/4: tuned, seed 42 · eval dev", "after"]
    assert found[1]["fraction"] == pytest.approx(0.25 + 0.25 * 0.5) and found[1]["dev"] == 0.81
    assert found[3]["fraction"] == pytest.approx(0.25 + 0.25 * (0.5 + 0.5 * 0.5))
    progress.update("routine")  # within MIN_INTERVAL of the last one: not written
    assert len(read(events)) == 5


def test_without_the_runner_updates_go_nowhere(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    with progress.span("x", 0, 1):
        progress.update("y", fraction=0.5, dev=0.9)
    assert list(tmp_path.iterdir()) == []


def test_the_terminal_shows_each_step_a_new_dev_score_at_once_and_a_heartbeat(tmp_path):
    path, out = tmp_path / "events.jsonl", io.StringIO()
    watch = Watch(path, "teacher-medpix", out, started=1000.0)

    def event(at, doing, fraction, dev=None):
        with open(path, "a") as f:
            f.write(json.dumps({"time": at, "doing": doing, "fraction": fraction, "dev": dev}) + "\n")

    watch.tick(1005.0)
    assert out.getvalue() == ""  # nothing to say yet, and no minute of silence
    watch.tick(1000.0 + HEARTBEAT)
    assert out.getvalue().splitlines() == ["  teacher-medpix 00:30 · starting the notebook's kernel"]
    event(1032.0, "training the teacher · teacher epoch 1/6, step 3/104", 0.01)
    watch.tick(1033.0)  # less than PRINT_EVERY after the last line: kept for later
    watch.tick(1030.0 + PRINT_EVERY)
    event(1041.0, "training the teacher · teacher epoch 1/6, step 30/104", 0.1)
    watch.tick(1042.0)  # 2 s after the last line: not yet
    event(1043.0, "training the teacher · teacher epoch 1/6 done", 0.125, dev=0.8365)
    watch.tick(1044.0)  # a new dev score is shown at once
    event(1050.0, "training the teacher · teacher epoch 2/6, step 13/104", 0.15)
    with open(path, "a") as f:
        f.write('{"time": 1055.0, "doing": "half')  # a line being written is read when it is whole
    watch.tick(1054.0 + PRINT_EVERY)
    lines = out.getvalue().splitlines()
    assert lines[1] == "  teacher-medpix 00:40 · training the teacher · teacher epoch 1/6, step 3/104"  # below 2 %: no estimate
    assert lines[2] == ("  teacher-medpix 00:44 · training the teacher · teacher epoch 1/6 done · dev avg F1 0.837 · "
                        "12%, ~05:08 left")
    assert lines[3] == ("  teacher-medpix 01:04 · training the teacher · teacher epoch 2/6, step 13/104 · dev avg F1 0.837 · "
                        "15%, ~06:02 left")
    assert len(lines) == 4
    watch.tick(1064.0 + HEARTBEAT)  # nothing new for HEARTBEAT seconds: the last step again, with the time
    assert out.getvalue().splitlines()[-1].startswith("  teacher-medpix 01:34 · training the teacher · teacher epoch 2/6")


def test_clock():
    assert (clock(59), clock(61), clock(3725)) == ("00:59", "01:01", "1:02:05")



def test_what_came_in_the_last_second_is_still_said_when_the_stage_ends(tmp_path):
    path, out = tmp_path / "events.jsonl", io.StringIO()
    watch = Watch(path, "distill-tiny-a", out, started=0.0)
    with open(path, "a") as f:
        f.write(json.dumps({"time": 1.0, "note": "trunk cache file x.pt cannot be read; computed again"}) + "\n")
        f.write(json.dumps({"time": 2.0, "doing": "run 1/1 · student epoch 2/2 done", "fraction": 1.0,
                            "dev": 0.5}) + "\n")
    watch.stopped.set()  # never started: stop() only reads what is left
    watch.join = lambda timeout=None: None
    watch.stop()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("· trunk cache file x.pt cannot be read; computed again")
    assert "student epoch 2/2 done · dev avg F1 0.500" in lines[1]
