import os
import stat

import pytest

from medkd.files import atomic_write, replace_dir, sha256_file, write_json
from medkd.params import get_path, with_values
from medkd.stages.schema import ParamsError, flatten_search_space


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
    tree = {"loss": {"weights": {"kl": 0.5}, "temperature": 2.0}, "train": {}}
    assert get_path(tree, "loss.weights.kl") == 0.5
    assert get_path(tree, "loss.weights.crd", None) is None
    with pytest.raises(KeyError, match="no key 'crd' under loss.weights"):
        get_path(tree, "loss.weights.crd")
    changed = with_values(tree, {"loss.weights.kl": 0.3, "train.lr": 1e-3, "model.fusion_dim": 256})
    assert changed == {"loss": {"weights": {"kl": 0.3}, "temperature": 2.0}, "train": {"lr": 1e-3},
                       "model": {"fusion_dim": 256}}
    assert tree["loss"]["weights"]["kl"] == 0.5  # the original is untouched


def test_search_space_flattens_to_key_paths_in_order():
    space = {"loss": {"weights": {"kl": {"type": "float", "low": 0.1, "high": 2.0}},
                      "temperature": {"type": "float", "low": 1, "high": 6}},
             "train": {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
             "model": {"fusion_dim": {"type": "categorical", "choices": [256, 384]}}}
    assert list(flatten_search_space(space)) == ["loss.weights.kl", "loss.temperature", "train.lr", "model.fusion_dim"]
    with pytest.raises(ParamsError, match="optuna.search_space.loss.temperature: expected a mapping"):
        flatten_search_space({"loss": {"temperature": 3.0}})
