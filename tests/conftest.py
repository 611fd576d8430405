import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

# Tests never reach a model hub: any accidental download fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite runs in two pytest-xdist workers (pyproject addopts): one thread each, so that the
# workers and the stages they start (which inherit this) do not spin against each other on the cores.
# Tiny models gain nothing from a second thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import yaml

from medkd.catalog.synthetic import make_synthetic_medpix
from medkd.config.configs import DataConfig
from medkd.config.loss_terms import LossConfig
from medkd.data.prepared import PreparedData
from medkd.models.backbones import build_tokenizer
from medkd.models.classifier import ModelConfig, build_model
from medkd.stages.teacher import teacher_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDKD_CACHE", str(tmp_path_factory.getbasetemp() / "medkd-cache"))


@pytest.fixture
def tiny_batch():
    torch.manual_seed(0)
    tokenizer = build_tokenizer("tiny-bert")
    texts = ["ct of the chest shows a mass", "mr of the brain", "axial view of the spine", "pelvis"]
    enc = tokenizer(texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    return {
        "pixel_values": torch.rand(4, 3, 32, 32),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([[0, 0], [1, 1], [0, 2], [1, 3]]),
        "index": torch.tensor([0, 3, 5, 7]),
    }


def tiny_model(fusion_dim=16, fusion_layers=1, heads=2, num_classes=(2, 5), dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=fusion_dim, fusion_layers=fusion_layers,
                      fusion_heads=heads, dropout=dropout)
    return build_model(cfg, num_classes)


# --------------------------------------------------------------------------- a throwaway PostgreSQL server


STUDY_WEIGHTS = {"ce": 1.0, "kl": 0.518, "mse": 112.4, "crd": 10.0}
TERM_OF_KEY = {"class_weights": "ce", "temperature": "kl", "projection": "mse", "feat_dim": "crd", "nce_k": "crd",
               "nce_t": "crd", "nce_m": "crd"}


def medpix_data(folder, sizes=(32, 12, 12), image_size=32, max_length=32) -> PreparedData:
    """A synthetic MedPix-2.0 in `folder`, loaded."""
    root = make_synthetic_medpix(folder, sizes=sizes, image_size=image_size)
    return PreparedData.load(DataConfig("medpix", str(root), image_size=image_size, max_length=max_length))


def loss_config(weights=None, **keys) -> LossConfig:
    """A LossConfig from weights and term keys by name (`temperature` goes to kl, `nce_k` to crd, ...)."""
    sections = {name: {"weight": w} for name, w in (STUDY_WEIGHTS if weights is None else weights).items()}
    for key, value in keys.items():
        sections.setdefault(TERM_OF_KEY[key], {"weight": 0.0})[key] = value
    return LossConfig.from_dict(sections)


def _postgres_binaries() -> dict[str, str] | None:
    """initdb/pg_ctl/createdb from PATH, else from Debian's /usr/lib/postgresql/<version>/bin."""
    folders = [None, *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in folders:
        found = {name: shutil.which(name, path=folder) for name in ("initdb", "pg_ctl", "createdb")}
        if all(found.values()):
            return found
    return None


def free_port() -> int:
    """A local TCP port nobody listens on now (a test server's, a torchrun rendezvous')."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of its own in a temporary folder, on a free local port; removed afterwards.

    PostgreSQL refuses to run as root: as root the server runs as the unprivileged `postgres`
    user (Debian's package creates it), else as the current user.
    """
    binaries = _postgres_binaries()
    if binaries is None and os.environ.get("MEDKD_REQUIRE_POSTGRES") == "1":  # CI: the image has them
        pytest.fail("MEDKD_REQUIRE_POSTGRES=1 but no PostgreSQL binaries (initdb, pg_ctl, createdb) were found")
    if binaries is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl, createdb) on PATH or in /usr/lib/postgresql/*/bin: "
                    "the shared-study test needs a real server")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="medkd-postgres-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"

    def run(*command):
        subprocess.run([*as_user, *command], check=True, capture_output=True, text=True)

    try:
        run(binaries["initdb"], "-D", str(data), "-U", "medkd", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(binaries["pg_ctl"], "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        run(binaries["createdb"], "-h", "127.0.0.1", "-p", str(port), "-U", "medkd", "optuna")
        yield f"postgresql+psycopg://medkd@127.0.0.1:{port}/optuna"
    except subprocess.CalledProcessError as err:
        log = folder / "server.log"
        raise RuntimeError(f"{' '.join(err.cmd)} failed:\n{err.stderr}\n"
                           f"{log.read_text() if log.exists() else ''}") from None
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, binaries["pg_ctl"], "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- a tiny project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The CI configuration, MedPix only, with its teacher stage run: (root, params)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    del params["data"]["wound"], params["teachers"]["wound"], params["students"]["tiny-c"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_synthetic_medpix(root / "data" / "medpix-2.0", sizes=(32, 12, 12), image_size=32)
    teacher_stage(params, "medpix", root)
    return root, params
