import os
import stat

import pytest

from medkd.config.params import get_path
from medkd.config.problems import ParamsError
from medkd.config.stage_settings import flatten_search_space
from medkd.util.files import atomic_write, replace_dir, sha256_file, write_json


def test_atomic_write_gives_normal_modes_and_leaves_nothing_on_failure(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o027)
        write_json(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
        replace_dir(tmp_path / "folder", lambda d: (d / "f").write_text("x"))
        assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o750
    finally:
        os.umask(old)

    def broken(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.json", broken)
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "folder"]


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib
    data = os.urandom(5 << 20)  # more than one 4 MiB chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_key_paths():
    tree = {"loss": {"kl": {"weight": 0.5, "temperature": 2.0}}, "train": {}}
    assert get_path(tree, "loss.kl.weight") == 0.5
    assert get_path(tree, "loss.crd.weight", None) is None
    with pytest.raises(KeyError, match="no key 'crd' under loss"):
        get_path(tree, "loss.crd.weight")


def test_search_space_flattens_to_key_paths_in_order():
    space = {"loss.kl.weight": {"type": "float", "low": 0.1, "high": 2.0},
             "loss": {"kl": {"temperature": {"type": "float", "low": 1, "high": 6}}},
             "train": {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
             "model.fusion_dim": {"type": "categorical", "choices": [256, 384]}}
    assert list(flatten_search_space(space)) == ["loss.kl.weight", "loss.kl.temperature", "train.lr",
                                                 "model.fusion_dim"]
    with pytest.raises(ParamsError, match="optuna.search_space.loss.kl.temperature: expected a mapping"):
        flatten_search_space({"loss": {"kl": {"temperature": 3.0}}})
