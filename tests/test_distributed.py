"""Data-parallel training (torchrun, gloo on the CPU) against one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from medkd.catalog.synthetic import make_synthetic_medpix

SCRIPT = Path(__file__).with_name("ddp_run.py")
LOSS_KEYS = ("train_total", "train_ce", "train_kl", "train_mse", "train_crd")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = make_synthetic_medpix(root / "medpix", sizes=(32, 12, 12), image_size=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}
    single, double = root / "one", root / "two"
    subprocess.run([sys.executable, str(SCRIPT), str(single), str(data)], env=env, check=True,
                   capture_output=True, timeout=600)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(SCRIPT), str(double), str(data)],
        env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    return single, double


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's float weights without the attention key biases. Softmax is blind to a key bias (it
    adds one constant to every score of a query), so its gradient is zero in exact arithmetic and Adam
    turns the rounding noise of two orders of summation into steps of up to lr: coordinates that no
    output depends on, and the only ones where such runs differ by more than 1e-5."""
    state = torch.load(path, weights_only=False)["state_dict"]
    weights = {}
    for name, value in state.items():
        if not value.is_floating_point() or name.endswith("attention.self.key.bias"):
            continue
        if name.endswith("attention.in_proj_bias"):  # nn.MultiheadAttention: [query; key; value] biases
            third = len(value) // 3
            value = torch.cat([value[:third], value[2 * third:]])
        weights[name] = value
    return weights


def test_two_gloo_processes_train_as_one_on_the_same_global_batches(runs):
    """Per-epoch losses (global means), dev scores and final weights of 1 vs 2 processes.

    The two runs differ only in the order of float sums (each rank's gradient, then their mean),
    not in data, negatives or memory updates: losses agree to 1e-4 relative, scores exactly, and
    weights to 1e-4 relative + 1e-5 absolute (attention key biases aside, see `_weights`).
    """
    single, double = runs
    one, two = _load(single / "rank0.pt"), _load(double / "rank0.pt")
    for phase in ("teacher_history", "student_history"):
        assert len(one[phase]) == len(two[phase]) == 2
        for a, b in zip(one[phase], two[phase]):
            assert a["train_samples"] == b["train_samples"] == 32  # every sample once per epoch, over both ranks
            for key in LOSS_KEYS if phase == "student_history" else ("train_total",):
                assert b[key] == pytest.approx(a[key], rel=1e-4), (phase, key)
            assert b["dev_avg_f1"] == pytest.approx(a["dev_avg_f1"], abs=1e-9)
    assert two["test"]["avg_f1"] == pytest.approx(one["test"]["avg_f1"], abs=1e-9)
    for role in ("teacher", "student"):
        a, b = _weights(single / role / "model.pt"), _weights(double / role / "model.pt")
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{role} {name}")


@pytest.mark.parametrize("processes", ["one", "two"])
def test_runs_from_the_trunk_cache_are_the_live_runs_under_torchrun_too(runs, processes):
    """Teacher and student trained on cached trunk outputs vs with their frozen parts run on every batch
    (trunk_cache: false): the same losses, scores and weights, in one process and as two gloo ranks."""
    out = runs[0] if processes == "one" else runs[1]
    results = _load(out / "rank0.pt")
    for role in ("teacher", "student"):
        for cached, live in zip(results[f"{role}_history"], results[f"{role}_live_history"], strict=True):
            for key in LOSS_KEYS if role == "student" else ("train_total",):
                assert cached[key] == pytest.approx(live[key], rel=1e-5, abs=1e-6), (role, key)
            assert cached["dev_avg_f1"] == pytest.approx(live["dev_avg_f1"], abs=1e-9)
        a, b = _weights(out / role / "model.pt"), _weights(out / f"{role}-live" / "model.pt")
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=f"{role} {name}")
    assert len(list((out / "trunks").glob("*.pt"))) == 3  # teacher vision; student vision and text


def test_crd_memory_banks_are_identical_across_ranks(runs):
    single, double = runs
    state = [torch.load(double / "state" / name, weights_only=False)["loss"] for name in ("student.pt", "student.rank1.pt")]
    reference = torch.load(single / "state" / "student.pt", weights_only=False)["loss"]
    banks = [key for key in reference if key.endswith(("memory_s", "memory_t", "z_norm"))]
    assert len(banks) == 3
    for key in banks:
        assert torch.equal(state[0][key], state[1][key]), key  # bit-identical on both ranks
        torch.testing.assert_close(state[0][key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


def test_only_rank_zero_writes_the_outputs(runs):
    _, double = runs
    assert (double / "student" / "metrics.json").exists() and (double / "teacher" / "model.pt").exists()
    assert (double / "rank1.pt").exists()  # the second rank ran to the end
    assert sorted(p.name for p in (double / "student").iterdir()) == sorted(
        p.name for p in (runs[0] / "student").iterdir())
