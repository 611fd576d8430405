"""params.yaml's schema: every typo and type error found up front, named by its key path."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medkd.config.problems import ParamsError
from medkd.config.schema import check_params, validate_params
from medkd.config.sections import student_configs, teacher_configs, teacher_loss_config

REPO = Path(__file__).resolve().parents[1]
CI = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())


def problems_after(change) -> dict[str, str]:
    params = copy.deepcopy(CI)
    change(params)
    return {p.path: p.message for p in check_params(params)}


def test_committed_configs_fit_the_schema():
    from medkd.config.merge import merge
    from medkd.config.presets import load_overlay
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in ("params.yaml", "configs/ci.yaml"):
        assert check_params(yaml.safe_load((REPO / name).read_text())) == [], name
    for name in ("configs/paper.yaml", "configs/full.yaml"):  # overlays on params.yaml
        assert check_params(merge(base, load_overlay(REPO / name))) == [], name


def test_a_key_typo_names_its_path_and_the_nearest_key():
    def typo(p):
        p["distill"]["tuned"]["model"]["fusion_layer"] = p["distill"]["tuned"]["model"].pop("fusion_layers")
    found = problems_after(typo)
    assert list(found) == ["distill.tuned.model.fusion_layer"]
    assert found["distill.tuned.model.fusion_layer"].startswith("unknown key (did you mean 'fusion_layers'?)")


ONE_PROBLEM = {
    "words where numbers belong": (
        lambda p: p["distill"]["train"].update(epochs="three"),
        {"distill.train.epochs": "Input should be a valid integer, unable to parse string as an integer (got 'three')"}),
    "zero epochs": (
        lambda p: p["teachers"]["medpix"]["train"].update(epochs=0),
        {"teachers.medpix.train.epochs": "Input should be greater than or equal to 1 (got 0)"}),
    "a student's data set not under data": (
        lambda p: p["students"]["tiny-c"].update(dataset="woundz"),
        {"students.tiny-c.dataset": "'woundz' has no teacher under `teachers:` (did you mean 'wound'?); "
                                    "teachers: medpix, medpix-scarce, medpix-masked, wound"}),
    "a bad baseline fusion, found before anything trains": (
        lambda p: p["distill"]["baseline"]["model"].update(fusion_dim=10),
        {"distill.baseline.model": "fusion_dim=10 is not divisible by fusion_heads=4"}),
    "a typo inside a further variant": (
        lambda p: p["distill"]["no-kd"].update(los=p["distill"]["no-kd"].pop("loss")),
        {"distill.no-kd.los": "unknown key (did you mean 'loss'?); expected one of: base, students, seeds, model, loss, train"}),
    "a variant based on one that does not exist": (
        lambda p: p["distill"]["no-kd"].update(base="tunde"),
        {"distill.no-kd.base": "no variant 'tunde' (did you mean 'tuned'?); variants: tuned, baseline, no-kd, no-kl, no-mse, no-crd, kl-only, image-only, text-only"}),
    "a typo of a shared distill key is not taken for a variant": (
        lambda p: p["distill"].update(pretrianed=p["distill"].pop("pretrained")),
        {"distill.pretrianed": "unknown key (did you mean 'pretrained'?); expected one of: model, pretrained, train, "
                               "or a variant (a mapping of base/students/seeds/model/loss/train)"}),
}


@pytest.mark.parametrize("case", list(ONE_PROBLEM))
def test_one_mistake_one_message_at_its_key_path(case):
    change, expected = ONE_PROBLEM[case]
    assert problems_after(change) == expected


def test_yaml_strings_that_are_numbers_are_read_as_numbers():
    # YAML 1.1 reads `2e-3` (no dot) as a string; the schema reads it as the number it means.
    params = copy.deepcopy(CI)
    params["distill"]["baseline"]["train"]["lr"] = "2e-3"
    assert check_params(params) == []
    assert student_configs(params, "tiny-a", "baseline")[2].lr == 0.002
    params["distill"]["baseline"]["train"]["lr"] = "fast"
    assert "distill.baseline.train.lr" in {p.path for p in check_params(params)}


def test_a_misspelt_student_key_and_a_missing_one():
    def typo(p):
        p["students"]["tiny-a"]["vison"] = p["students"]["tiny-a"].pop("vision")
    found = problems_after(typo)
    assert found["students.tiny-a.vison"].startswith("unknown key (did you mean 'vision'?)")
    assert found["students.tiny-a.vision"] == "required key is missing"


def test_a_misspelt_optuna_key():
    found = problems_after(lambda p: p["optuna"].update(n_trial=p["optuna"].pop("n_trials")))
    assert found["optuna.n_trial"].startswith("unknown key (did you mean 'n_trials'?)")
    assert found["optuna.n_trials"] == "required key is missing"


def test_registry_names_and_loss_terms():
    def bad(p):
        p["students"]["tiny-b"]["vision"] = "deit-smal"
        p["teachers"]["wound"]["model"]["text"] = "mobilenetv2"
        p["distill"]["tuned"]["loss"]["klx"] = {"weight": 1.0}
        p["data"]["wound"]["name"] = "wounds"
    found = problems_after(bad)
    assert found["students.tiny-b.vision"].startswith("unknown vision backbone 'deit-smal' (did you mean 'deit-small'?)")
    assert found["teachers.wound.model.text"].startswith("unknown text backbone 'mobilenetv2'")
    assert found["distill.tuned.loss.klx"] == "unknown key (did you mean 'kl'?); expected one of: ce, kl, mse, crd"
    assert found["data.wound.name"].startswith("unknown data set 'wounds' (did you mean 'wound'?)")


def test_search_space_paths_and_ranges():
    def bad(p):
        space = p["optuna"]["search_space"]
        space["loss.kl.temprature"] = space.pop("loss.kl.temperature")
        space["loss.kll.weight"] = {"type": "float", "low": 0.1, "high": 1.0}
        space["loss.crd"] = {"type": "float", "low": 0.1, "high": 1.0}
        space["model"]["dropout"] = {"type": "float", "low": 0.1, "high": 1.5}
        space["train.lr"]["low"] = 1.0  # above high
    found = problems_after(bad)
    assert found["optuna.search_space.loss.kl.temprature"].startswith(
        "'temprature' is not a setting of loss.kl (did you mean 'temperature'?); expected one of: weight, temperature")
    assert found["optuna.search_space.loss.kll.weight"].startswith("'kll' is not a setting of loss (did you mean 'kl'?)")
    assert found["optuna.search_space.loss.crd"].startswith("'loss.crd' is a section; a search-space leaf sets one")
    assert found["optuna.search_space.model.dropout"] == "value 1.5: Input should be less than 1 (got 1.5)"
    assert found["optuna.search_space.train.lr"].startswith("needs low < high")


def test_optuna_student_and_leakage_fields():
    def bad(p):
        p["optuna"]["student"] = "tiny-z"
        p["data"]["medpix"]["text_fields"] = ["Caption", "Modality"]
    found = problems_after(bad)
    assert found["optuna.student"].startswith("no student 'tiny-z' under `students:`")
    assert "leaks a label" in found["data.medpix"]


def test_validate_raises_with_every_problem_listed():
    params = copy.deepcopy(CI)
    params["seed"] = "x"
    params["runtime"]["device"] = "gpu"
    with pytest.raises(ParamsError) as err:
        validate_params(params)
    assert str(err.value).startswith("params.yaml: 2 problems\n  seed: ")
    assert "runtime.device: unknown device 'gpu'" in str(err.value)
    assert teacher_configs(CI, "medpix")[1].epochs == 2


def with_data(folder: Path) -> Path:
    """CI's data folders under `folder`, each holding its data set's marker file (what check-params looks for)."""
    from medkd.catalog.dataset_specs import get_dataset
    for section in CI["data"].values():
        (folder / section["root"]).mkdir(parents=True, exist_ok=True)
        (folder / section["root"] / get_dataset(section["name"]).marker).touch()
    return folder


def test_check_params_command(tmp_path):
    with_data(tmp_path)
    params = copy.deepcopy(CI)
    params["distill"]["tuned"]["model"]["fusion_layer"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "medkd", "check-params", "--params", str(tmp_path / "params.yaml"),
                           "--stamp", str(tmp_path / "ok")], capture_output=True, text=True)
    assert done.returncode == 2 and not (tmp_path / "ok").exists()
    assert done.stderr.strip().splitlines()[-1] == f"{tmp_path / 'params.yaml'}: 1 problem; nothing was run"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(CI))
    done = subprocess.run([sys.executable, "-m", "medkd", "check-params", "--params", str(tmp_path / "params.yaml"),
                           "--stamp", str(tmp_path / "ok")], capture_output=True, text=True)
    assert done.returncode == 0 and (tmp_path / "ok").exists()


def test_check_params_refuses_bf16_that_this_cpu_would_emulate(tmp_path, monkeypatch, capsys):
    import medkd.util.environment
    from medkd.stages.check import check_params_command
    with_data(tmp_path)
    params = copy.deepcopy(CI)
    params["runtime"] = {**params.get("runtime", {}), "device": "cpu", "precision": "bf16"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(medkd.util.environment, "cpu_runs_bf16_natively", lambda: False)
    assert check_params_command(tmp_path / "params.yaml", tmp_path / "ok") == 2 and not (tmp_path / "ok").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no bf16 instructions" in err[0] and "Set runtime.precision: fp32" in err[0]
    assert err[-1] == f"{tmp_path / 'params.yaml'}: fits the schema, but not this machine; nothing was run"
    params["runtime"]["precision"] = "auto"  # auto falls back to fp32 here: accepted
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert check_params_command(tmp_path / "params.yaml", tmp_path / "ok") == 0 and (tmp_path / "ok").exists()
    params["runtime"]["precision"] = "bf16"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(medkd.util.environment, "cpu_runs_bf16_natively", lambda: True)
    assert check_params_command(tmp_path / "params.yaml", tmp_path / "ok") == 0 and (tmp_path / "ok").exists()


def test_variants_are_the_entries_of_distill_and_start_from_their_base():
    from medkd.config.study import variants
    assert variants(CI)[:3] == ["tuned", "baseline", "no-kd"]
    tuned_model, _, tuned_train = student_configs(CI, "tiny-a", "tuned")
    model, loss, train = student_configs(CI, "tiny-a", "no-kd")
    assert model == tuned_model and train == tuned_train  # same model and schedule as tuned
    assert loss.weights == {"ce": 1.0} and loss.active_terms == ["ce"]  # no teacher term
    params = copy.deepcopy(CI)
    params["distill"]["kl-big"] = {"base": "tuned", "loss": {"kl": {"weight": 1.0}, "mse": None, "crd": None}}
    assert variants(params)[-1] == "kl-big" and check_params(params) == []
    assert student_configs(params, "tiny-a", "kl-big")[1].weights == {"ce": 1.0, "kl": 1.0}


def test_runs_expand_variants_by_their_students_and_seeds():
    from medkd.config.study import Run, student_runs
    # tiny-a is optuna.student (the primary student): tuned, no-kd and kl-only (Hinton KD) on seeds.primary,
    # the other ablations (students: primary) once; the other students take tuned, baseline, no-kd once.
    assert student_runs(CI, "tiny-a") == [
        Run("tuned", 42), Run("tuned", 7), Run("baseline", 42), Run("no-kd", 42), Run("no-kd", 7),
        *(Run(v, 42) for v in ("no-kl", "no-mse", "no-crd")), Run("kl-only", 42), Run("kl-only", 7),
        *(Run(v, 42) for v in ("image-only", "text-only"))]
    assert student_runs(CI, "tiny-c") == [Run("tuned", 42), Run("baseline", 42), Run("no-kd", 42)]
    assert Run("no-kd", 7).name == "no-kd/seed-7"
    # Each run trains with its own seed, everything else from its variant.
    a, b = (student_configs(CI, "tiny-a", "tuned", seed=s)[2] for s in (42, 7))
    assert (a.seed, b.seed) == (42, 7) and a.to_dict() | {"seed": 7} == b.to_dict()
    # Without `seeds:` every run uses the top-level seed.
    params = copy.deepcopy(CI)
    del params["seeds"]
    params["seed"] = 3
    assert {r.seed for r in student_runs(params, "tiny-a")} == {3}
    assert student_runs(params, "tiny-a")[:2] == [Run("tuned", 3), Run("baseline", 3)]


def test_seed_and_variant_scope_problems_are_named():
    assert problems_after(lambda p: p["seeds"].update(primary=[])) == {
        "seeds.primary": "List should have at least 1 item after validation, not 0"}
    assert set(problems_after(lambda p: p["distill"]["no-kl"].update(students="primry"))) == {"distill.no-kl.students"}

    def no_search(p):
        del p["optuna"]
    assert problems_after(no_search)["distill.no-kl.students"].startswith("`primary` names `optuna.student`")


def test_a_teachers_loss_may_weigh_classes_but_never_distil():
    assert teacher_loss_config(CI, "medpix").active_terms == ["ce"]  # no `loss:`: plain CE
    params = copy.deepcopy(CI)
    params["teachers"]["medpix"]["loss"] = {"ce": {"class_weights": "balanced"}}
    loss = teacher_loss_config(params, "medpix")
    assert loss.ce.class_weights == "balanced" and loss.weights == {"ce": 1.0} and check_params(params) == []
    params["teachers"]["medpix"]["loss"] = {"kl": {"weight": 0.5}}
    assert {p.path for p in check_params(params)} == {"teachers.medpix.loss"}


def test_the_loss_keys_of_before_say_where_they_went():
    found = problems_after(lambda p: p["distill"]["baseline"].update(loss={"weights": {"ce": 1.0}, "temperature": 2}))
    assert found["distill.baseline.loss.weights"].startswith("no longer a key: each term has its own section")
    assert found["distill.baseline.loss.temperature"] == "no longer a key here: loss.kl.temperature"


def check_file(tmp_path, text: str, capsys) -> list[str]:
    from medkd.stages.check import check_params_command
    (tmp_path / "params.yaml").write_text(text)
    assert check_params_command(tmp_path / "params.yaml", tmp_path / "ok") == 2 and not (tmp_path / "ok").exists()
    return capsys.readouterr().err.rstrip().splitlines()


def test_check_params_names_the_line_and_column_of_bad_yaml_and_an_empty_file(tmp_path, capsys):
    lines = check_file(tmp_path, "seed: 42\ndata:\n  medpix: {root: data/x\n", capsys)
    assert lines == [f"{tmp_path / 'params.yaml'}:4:1: not valid YAML: while parsing a flow mapping: expected ',' or "
                     "'}', but got '<stream end>'"]
    lines = check_file(tmp_path, "seed: 42\n  seeds: [1]\n", capsys)
    assert lines[0].startswith(f"{tmp_path / 'params.yaml'}:2:8: not valid YAML: ")
    assert check_file(tmp_path, "", capsys) == [
        f"{tmp_path / 'params.yaml'}: the file is empty; expected params.yaml's sections (data:, teachers:, students:, ...)"]


def test_check_params_wants_each_data_set_where_its_root_says(tmp_path, capsys):
    lines = check_file(tmp_path, yaml.safe_dump(CI), capsys)
    assert lines[0] == (f"  data.medpix.root: folder 'data/medpix-2.0' does not exist ({tmp_path}/data/medpix-2.0); "
                        "run `make data`, or set root to the data set's folder")
    (tmp_path / "data" / "medpix-2.0").mkdir(parents=True)
    lines = check_file(tmp_path, yaml.safe_dump(CI), capsys)
    assert lines[0] == ("  data.medpix.root: 'data/medpix-2.0' holds no Descriptions.json: not a MedPix-2.0 folder "
                        "(`make data` fetches one)")


def test_the_gaps_a_new_user_met_each_get_one_line_at_their_key_path():
    found = problems_after(lambda p: p["runtime"].update(device="gpu"))
    assert found == {"runtime.device": "unknown device 'gpu' (did you mean 'cpu'?); expected one of: auto, cpu, cuda, "
                                       "or cuda:N (a GPU's number)"}
    assert problems_after(lambda p: p["runtime"].update(device="cuda:1")) == {}
    found = problems_after(lambda p: p.setdefault("export", {}).update(variant="bestt"))
    assert found["export.variant"].startswith("no variant 'bestt' under `distill:` (did you mean 'best'?); expected best")
    found = problems_after(lambda p: p["distill"]["tuned"]["loss"]["kl"].update(weight=-0.5))
    assert found == {"distill.tuned.loss.kl.weight": "Input should be greater than or equal to 0 (got -0.5)"}
