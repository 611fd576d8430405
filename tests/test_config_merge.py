"""The one merge (medkd.config.merge): one rule for variants, presets and overrides, then pydantic."""

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from medkd.config.merge import merge, merge_layers, overlay_of, with_values
from medkd.config.problems import ParamsError
from medkd.config.schema import check_params
from medkd.config.sections import student_configs, variant_chain

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())


def test_mappings_merge_other_values_replace_and_null_removes():
    base = {"a": {"x": 1, "y": [1, 2], "z": {"k": "v"}}, "b": 2, "c": 3}
    overlay = {"a": {"y": [3], "z": {"new": True}, "w": 0.5}, "b": None, "d": {"e": "f"}}
    assert merge(base, overlay) == {"a": {"x": 1, "y": [3], "z": {"k": "v", "new": True}, "w": 0.5},
                                    "c": 3, "d": {"e": "f"}}
    assert base == {"a": {"x": 1, "y": [1, 2], "z": {"k": "v"}}, "b": 2, "c": 3}  # untouched
    assert merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}  # a mapping over a value replaces it
    assert merge({"a": {"b": 2}}, {"a": 1}) == {"a": 1}


def test_key_path_overrides_are_one_key_overlays():
    tree = {"loss": {"kl": {"weight": 0.5, "temperature": 2.0}}, "train": {}}
    assert overlay_of({"loss.kl.weight": 0.3, "train.lr": 1e-3}) == {"loss": {"kl": {"weight": 0.3}},
                                                                     "train": {"lr": 1e-3}}
    changed = with_values(tree, {"loss.kl.weight": 0.3, "train.lr": 1e-3, "model.fusion_dim": 256})
    assert changed == {"loss": {"kl": {"weight": 0.3, "temperature": 2.0}}, "train": {"lr": 1e-3},
                       "model": {"fusion_dim": 256}}
    assert tree["loss"]["kl"]["weight"] == 0.5  # the original is untouched
    with pytest.raises(KeyError, match="'loss.kl.weight.x' goes through 'loss.kl.weight', which is not a mapping"):
        with_values(tree, {"loss.kl.weight.x": 1})


def test_dvc_set_param_applies_the_same_rule(tmp_path, params):
    """`dvc exp run -S` (DVC's own Hydra code) on params.yaml gives what our merge gives."""
    from dvc.utils.hydra import apply_overrides

    shutil.copy(REPO / "configs" / "ci.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", ["distill.tuned.loss.kl.weight=0.3",
                                               "++distill.tuned.loss.mse={projection: learned}",
                                               "++distill.tuned.model.modalities=[image]"])
    expected = merge(params, overlay_of({"distill.tuned.loss.kl.weight": 0.3,
                                         "distill.tuned.loss.mse": {"projection": "learned"},
                                         "distill.tuned.model.modalities": ["image"]}))
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == expected
    assert expected["distill"]["tuned"]["loss"]["mse"] == {"weight": 112.4, "projection": "learned"}


def test_merge_layers_remembers_which_layer_set_each_key():
    merged = merge_layers([("distill.tuned.loss", {"kl": {"weight": 0.5, "temperature": 3.0}, "ce": {"weight": 1}}),
                           ("distill.x.loss", {"kl": {"weight": 0.2}, "ce": None})])
    assert merged.values == {"kl": {"weight": 0.2, "temperature": 3.0}}
    assert merged.where(("kl", "weight"), "home") == "distill.x.loss.kl.weight"
    assert merged.where(("kl", "temperature"), "home") == "distill.tuned.loss.kl.temperature"
    assert merged.where(("crd", "weight"), "distill.x.loss") == "distill.x.loss.crd.weight"  # no layer set it
    assert merged.last == "distill.x.loss"


def test_a_grandparents_value_reaches_the_grandchild(params):
    distill = params["distill"]
    distill["a"] = {"base": "tuned", "model": {"dropout": 0.33}, "loss": {"crd": {"nce_k": 8}}}
    distill["b"] = {"base": "a", "loss": {"mse": None}, "train": {"lr": 0.005}}
    distill["c"] = {"base": "b", "loss": {"kl": {"temperature": 5.0}}}
    assert variant_chain(distill, "c") == ["tuned", "a", "b", "c"]
    model, loss, train = student_configs(params, "tiny-a", "c")
    assert model.dropout == 0.33 and model.fusion_layers == 2  # from a, and from tuned through a
    assert loss.crd.nce_k == 8 and loss.mse is None  # a's key, b's removal
    assert loss.kl.temperature == 5.0 and loss.kl.weight == 0.518  # c's own key beside tuned's weight
    assert train.lr == 0.005
    assert check_params(params) == []


def test_a_base_cycle_or_unknown_base_is_refused_by_its_key_path(params):
    cyclic = copy.deepcopy(params)
    cyclic["distill"]["x"] = {"base": "y"}
    cyclic["distill"]["y"] = {"base": "x"}
    found = {(p.path, p.message) for p in check_params(cyclic)}
    assert ("distill.y.base", "the base: chain is a cycle: x -> y -> x") in found
    unknown = copy.deepcopy(params)
    unknown["distill"]["x"] = {"base": "no-kdd"}
    assert any(p.path == "distill.x.base" and "no variant 'no-kdd' (did you mean 'no-kd'?)" in p.message
               for p in check_params(unknown))
    with pytest.raises(ParamsError, match="cycle"):
        student_configs(cyclic, "tiny-a", "x")


def test_a_bad_value_is_named_by_the_layer_that_set_it(params):
    params["distill"]["no-kd"]["loss"] = {"kl": None, "mse": None, "crd": None, "ce": {"weight": -1.0}}
    params["distill"]["tuned"]["loss"]["kl"]["temperature"] = 0
    paths = {p.path for p in check_params(params)}
    assert "distill.no-kd.loss.ce.weight" in paths
    assert "distill.tuned.loss.kl.temperature" in paths
