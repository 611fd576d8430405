"""Presets are overlays on params.yaml, run as DVC experiments that never write params.yaml."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from medkd.config import presets
from medkd.config.merge import merge
from medkd.config.schema import check_params

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["configs/full.yaml", "configs/paper.yaml"]


@pytest.mark.parametrize("preset", PRESETS)
def test_dvc_applies_the_presets_overrides_to_exactly_the_merged_params(preset, tmp_path):
    """What `dvc exp run --set-param` makes of the overrides (DVC's own Hydra code) is the overlay merged."""
    from dvc.utils.hydra import apply_overrides

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    overlay = presets.load_overlay(REPO / preset)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", presets.overrides(base, overlay))
    merged = merge(base, overlay)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == merged
    assert check_params(merged) == [] and merged["preset"] == overlay["preset"] == Path(preset).stem


def test_a_preset_states_only_what_differs():
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for preset in PRESETS:
        overlay = presets.load_overlay(REPO / preset)

        def restated(over, below, path=""):
            for key, value in over.items():
                if isinstance(value, dict) and isinstance(below.get(key), dict):
                    yield from restated(value, below[key], f"{path}{key}.")
                elif key in below and below[key] == value:
                    yield f"{path}{key}"

        assert list(restated(overlay, base)) == [], preset


def test_the_masked_teacher_of_the_full_preset_is_the_medpix_teacher():
    merged = merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                           presets.load_overlay(REPO / "configs/full.yaml"))
    assert merged["teachers"]["medpix-masked"] == merged["teachers"]["medpix"]
    masked, plain = merged["data"]["medpix-masked"], merged["data"]["medpix"]
    assert {k: v for k, v in masked.items() if k != "mask_terms"} == plain


def test_running_a_preset_leaves_params_yaml_alone(monkeypatch, capsys):
    before = (REPO / "params.yaml").read_bytes()
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: calls.append(command) or subprocess.CompletedProcess(
        command, 0))
    assert presets.main(["run", str(REPO / "configs/full.yaml")]) == 0
    (command,) = calls
    assert command[1:7] == ["-m", "dvc", "exp", "run", "--temp", "--name"] and command[7] == "full"
    assert "--set-param=++preset='full'" in command
    assert presets.main(["show", str(REPO / "configs/full.yaml")]) == 0
    assert yaml.safe_load(capsys.readouterr().out.split("dvc exp run", 1)[1].split("\n", 1)[1])["preset"] == "full"
    assert (REPO / "params.yaml").read_bytes() == before


def test_a_preset_that_breaks_the_schema_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: bad\ndistill: {tuned: {model: {fusion_layers: 0}}}\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran"))
    assert presets.main(["run", str(bad)]) == 2
    assert "distill.tuned.model.fusion_layers" in capsys.readouterr().err
    (tmp_path / "nameless.yaml").write_text("seed: 1\n")
    assert presets.main(["show", str(tmp_path / "nameless.yaml")]) == 2
    assert "`preset:`" in capsys.readouterr().err
