"""Interrupts through the real `dvc repro`: Ctrl-C and a killed dvc stop training cleanly, leave no
process behind, and the next `dvc repro` resumes from the last complete epoch to the same result."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_pipeline import BIN, REPO, _project, _run

from medkd.catalog.synthetic import make_synthetic_medpix

EPOCHS = 4


def _env():
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1"}


def _make(root: Path) -> Path:
    root.mkdir(parents=True)
    _project(root, REPO / "configs" / "ci.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["teachers"]["medpix"]["train"]["epochs"] = EPOCHS
    for dataset in ("wound", "medpix-masked"):  # MedPix only: the check stage wants every listed data set's files
        del params["data"][dataset], params["teachers"][dataset]
    params["students"] = {name: spec for name, spec in params["students"].items() if spec["dataset"] == "medpix"}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_synthetic_medpix(root / "data" / "medpix-2.0", sizes=(320, 12, 12), image_size=32)
    _run(["dvc", "add", "-q", "data"], root)
    return root


def _start(root: Path) -> subprocess.Popen:
    # A session of its own: the test can signal dvc's whole process group, as Ctrl-C in a terminal does.
    return subprocess.Popen(["dvc", "repro", "teacher@medpix"], cwd=root, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _saved_epoch(root: Path) -> int:
    path = root / ".medkd" / "resume" / "teacher-medpix.pt"
    try:
        return torch.load(path, weights_only=False)["epoch"] if path.exists() else 0
    except (EOFError, RuntimeError):  # replaced while being read
        return 0


def _wait_for_epoch(root: Path, proc: subprocess.Popen, epoch: int, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        saved = _saved_epoch(root)
        if saved >= epoch:
            return saved
        if proc.poll() is not None:
            pytest.fail(f"dvc ended before epoch {epoch} was saved:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no epoch {epoch} within {timeout} s")


def _processes_in(root: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(root):
                found.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:120])
        except OSError:
            continue
    return found


def _wait_until_gone(root: Path, timeout: float = 30) -> list[str]:
    deadline = time.time() + timeout
    while (left := _processes_in(root)) and time.time() < deadline:
        time.sleep(0.3)
    return left


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find leftover processes")
def test_interrupts_stop_cleanly_and_repro_resumes_to_the_same_result(tmp_path):
    root = _make(tmp_path / "cut")
    proc = _start(root)
    _wait_for_epoch(root, proc, 1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert "stage interrupted: teacher interrupted at epoch" in out and "re-run to resume from epoch" in out, out
    assert "Traceback" not in out
    assert _wait_until_gone(root) == []
    first = _saved_epoch(root)
    assert 1 <= first < EPOCHS

    proc = _start(root)  # resumes; then dvc itself is killed outright
    _wait_for_epoch(root, proc, first + 1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _wait_until_gone(root) == []  # neither the runner nor the kernel trains on as an orphan
    second = _saved_epoch(root)
    assert second > first

    done = subprocess.run(["dvc", "repro", "teacher@medpix"], cwd=root, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    notebook = (root / "reports" / "notebooks" / "teacher-medpix.ipynb").read_text()
    assert f"resuming after epoch {second} of {EPOCHS}" in notebook
    assert not (root / ".medkd" / "resume" / "teacher-medpix.pt").exists()

    reference = _make(tmp_path / "whole")
    _run(["dvc", "repro", "teacher@medpix"], reference)
    for name in ("predictions_dev.csv", "predictions_test.csv"):
        assert (root / "reports" / "teachers" / "medpix" / name).read_bytes() == \
            (reference / "reports" / "teachers" / "medpix" / name).read_bytes()
