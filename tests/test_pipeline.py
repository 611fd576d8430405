"""The real pipeline (dvc.yaml + papermill notebooks) on tiny synthetic data, as CI runs it."""

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from medkd.catalog.synthetic import make_synthetic_medpix, make_synthetic_wound
from medkd.config.presets import load_overlay, merge
from medkd.config.sections import student_configs
from medkd.config.study import variants
from medkd.models.classifier import ModelConfig, build_model
from medkd.scoring.metrics import load_run

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(cmd, cwd, both=False):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "MEDKD_PRINT_EVERY": "1"}  # the tiny study's stages take seconds
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, shell=isinstance(cmd, str))
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout + done.stderr if both else done.stdout


def _project(tmp: Path, params: Path) -> Path:
    for item in ("dvc.yaml", "notebooks", "medkd"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp / item)
    shutil.copy(params, tmp / "params.yaml")
    _run(["git", "init", "-q"], tmp)
    _run(["dvc", "init", "-q"], tmp)
    return tmp


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = _project(tmp_path_factory.mktemp("study"), REPO / "configs" / "ci.yaml")
    make_synthetic_medpix(root / "data" / "medpix-2.0", sizes=(32, 12, 12), image_size=32)
    make_synthetic_wound(root / "data" / "wound-1-0", sizes=(32, 12, 12), image_size=32)
    _run(["dvc", "add", "-q", "data"], root)
    _run("git add -A && git -c user.email=ci@example.com -c user.name=ci commit -qm init", root)
    log = _run(["dvc", "repro"], root, both=True)
    return root, log


def test_every_stage_ran_and_wrote_its_outputs(pipeline):
    root, log = pipeline
    params = yaml.safe_load((root / "params.yaml").read_text())
    stages = [f"prepare@{d}" for d in params["data"]] + [f"teacher@{d}" for d in params["teachers"]]
    stages += [f"distill@{s}" for s in params["students"]] + ["search", "report"]
    stages += [f"export-teacher@{d}" for d in params["teachers"]] + [f"export@{s}" for s in params["students"]]
    assert "Running stage 'check'" in log and "params.yaml: OK" in log
    for stage in stages:
        assert f"Running stage '{stage}'" in log
    # A successful run prints nothing that looks like an error (kernel chatter stays out of the log).
    alarming = [line for line in log.splitlines()
                if re.search(r"(?i)error|warning|traceback|exception|interrupt|died|encryption", line)]
    assert alarming == []
    assert log.count("stage done: reports/notebooks/") == len(stages)  # one per notebook stage
    for name in ("prepare-medpix", "teacher-wound", "distill-tiny-c", "search", "report"):
        nb = json.loads((root / "reports" / "notebooks" / f"{name}.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), name
    # The terminal showed what each stage was doing while it ran; the notebooks kept readable lines only.
    watched = [line for line in log.splitlines() if re.match(r"^  [\w.-]+ \d\d:\d\d · ", line)]
    assert any("epoch" in line and "dev avg F1" in line for line in watched)
    assert any("trial " in line for line in watched) and any("run 1/" in line for line in watched)
    for rendered in (root / "reports" / "notebooks").glob("*.ipynb"):
        streams = ["".join(o.get("text", "")) for c in json.loads(rendered.read_text())["cells"]
                   for o in c.get("outputs", []) if o.get("output_type") == "stream"]
        assert not [s for s in streams if "\r" in s or "Warning" in s], rendered.name
    report_nb = root / "reports" / "notebooks" / "report.ipynb"
    assert "image/png" not in report_nb.read_text() and report_nb.stat().st_size < 300_000
    for item in ("results.md", "table_medpix.csv", "table_wound.csv", "hyperparameters.csv", "intervals_medpix.csv",
                 "per_class.csv", "masking.csv", "loss_drivers.csv", "loss_drivers.png", "per_class_f1.png",
                 "f1_per_model.png", "params_vs_f1.png", "confusion_matrices.png", "training_curves.png",
                 "deployment.csv", "latency_vs_f1.png"):
        assert (root / "reports" / "results" / item).stat().st_size > 0, item
    results = (root / "reports" / "results" / "results.md").read_text()
    for section in ("## Ablations: medpix", "## Caption masking", "## What drives the student", "## Deployment", "± ",
                    "## Does distillation help? (medpix)"):
        assert section in results, section
    # The primary student's comparison over seeds.primary, the others once; the search best retrained on them.
    all_runs = pd.read_csv(root / "reports" / "results" / "all_runs.csv")
    seeds = all_runs.groupby(["model", "variant"]).seed.apply(sorted)
    assert seeds[("tiny-a", "tuned")] == seeds[("tiny-a", "no-kd")] == seeds[("tiny-a", "optuna-best")] == [7, 42]
    assert seeds[("tiny-a", "kl-only")] == [7, 42]  # Hinton KD on the primary comparison's seeds
    claims = pd.read_csv(root / "reports" / "results" / "claims_medpix.csv")
    assert claims["Compared"].tolist() == ["tiny-a kl-only − tiny-a no-kd", "tiny-a tuned − tiny-a no-kd",
                                           "tiny-a optuna-best − tiny-a no-kd"]
    assert set(claims["Reading"]) <= {"too few seeds (fewer than 3 on an arm)"}  # two seeds here
    # The teacher's baseline: its linear probe is a run with per-image predictions, in every table it belongs to.
    for dataset in params["teachers"]:
        probe = root / "reports" / "teachers" / dataset / "probe"
        assert {"metrics.json", "predictions_dev.csv", "predictions_test.csv"} <= {p.name for p in probe.iterdir()}
        assert "probe" in json.loads((root / "reports" / "metrics" / f"teacher-{dataset}.json").read_text())
    assert ("Linear probe", "linear-probe") in set(zip(all_runs.model, all_runs.variant))
    teacher_checks = pd.read_csv(root / "reports" / "results" / "teacher_medpix.csv")
    assert teacher_checks["Compared"].tolist()[:2] == ["teacher − linear probe", "teacher − tiny-a no-kd"]
    assert "## Is the teacher worth distilling? (medpix)" in results
    # The headline is read off those tables: the claim's own interval and reading, word for word.
    headline = results.split("## Headline", 1)[1].split("\n## ", 1)[0]
    first = pd.read_csv(root / "reports" / "results" / "claims_medpix.csv", dtype=str).iloc[0]
    assert f"**{first['Reading']}**: {first['Compared']} {first['Difference']} {first['95% interval']}" in headline
    assert "- medpix: Teacher lead on dev over the best student trained alone (" in headline
    assert "- medpix: **teacher − tiny-a no-kd** on test: " in headline
    assert seeds[("tiny-b", "tuned")] == seeds[("tiny-a", "no-crd")] == [42]
    assert ("tiny-b", "no-crd") not in seeds.index
    # The positive controls: a scarce-label student alone and distilled on seeds.primary, read as claims; an
    # ensemble teacher of 2 members (each measured alone too); fidelity to the teacher in every student run.
    assert seeds[("tiny-scarce", "no-kd")] == seeds[("tiny-scarce", "kl-only")] == [7, 42]
    scarce_claims = pd.read_csv(root / "reports" / "results" / "claims_medpix-scarce.csv")
    assert scarce_claims["Compared"].tolist() == ["tiny-scarce kl-only − tiny-scarce no-kd"]
    members = all_runs[(all_runs.variant == "teacher-member")].groupby("dataset").seed.apply(sorted)
    assert members.to_dict() == {"medpix-masked": [42, 43], "medpix-scarce": [42, 43]}
    assert {"agree_dev_task1", "agree_test_task2", "kl_dev"} <= set(all_runs.columns)
    assert all_runs[all_runs.variant.isin(["tuned", "no-kd"])].kl_dev.notna().all()
    assert "## Did the teacher's knowledge transfer? (medpix)" in results
    manifest = pd.read_csv(root / "reports" / "data" / "medpix-scarce" / "manifest_train.csv")
    assert 0 < manifest.label_seen.sum() < len(manifest)
    assert "Scarce labels: runs see the labels of" in (root / "reports" / "data" / "medpix-scarce" /
                                                        "data_report.md").read_text()
    # Every model exported with its preprocessing, and the export is what `medkd predict` runs; a model marked
    # `export: false` records only that; a student without text ships no tokenizer.
    for model in ("teacher-medpix-scarce", "tiny-scarce"):
        assert {p.name for p in (root / "models" / "export" / model).iterdir()} == {"NOT_EXPORTED.txt"}
        assert json.loads((root / "reports" / "export" / model / "deployment.json").read_text())["exported"] is False
    exported = [m for m in ["teacher-medpix", "teacher-medpix-masked", "teacher-wound", *params["students"]]
                if m != "tiny-scarce"]
    for model in exported:
        folder = root / "models" / "export" / model
        text = {"tokenizer"} if model != "tiny-b" else set()
        assert {p.name for p in folder.iterdir()} == {"model.onnx", "model.int8.onnx", "preprocessing.json", *text}
        deployment = json.loads((root / "reports" / "export" / model / "deployment.json").read_text())
        low, high = deployment["int8"]["avg_f1_change_ci95"]
        assert low <= deployment["int8"]["avg_f1_change"] <= high
        assert {"predictions_test_fp32.csv", "predictions_test_int8.csv"} <= {
            p.name for p in (root / "reports" / "export" / model).iterdir()}
        assert deployment["parity"]["predictions_identical"]
        # The export scores what the study's own fp32 evaluation of the run scored.
        assert deployment["study"]["checked"] and abs(deployment["study"]["difference"]) <= 0.005
        if model in params["students"]:  # timed against its data set's exported teacher, in its own stage
            # The run a user would pick: the variant with the best mean dev F1, and that variant's best seed.
            variant = max(deployment["selection"]["mean_dev_avg_f1"].items(), key=lambda kv: kv[1])[0]
            assert deployment["run"].startswith(f"{deployment['selection']['variant']}/seed-")
            assert deployment["selection"]["mean_dev_avg_f1"][deployment["selection"]["variant"]] == \
                deployment["selection"]["mean_dev_avg_f1"][variant]
            paired = deployment["speedup_vs_teacher"]
            assert paired["teacher"] == f"teacher-{params['students'][model]['dataset']}"
            assert paired["teacher_image_size"] == (40 if paired["teacher"] == "teacher-medpix" else 32)
            assert paired["ci95"][0] <= paired["speedup"] <= paired["ci95"][1]
    assert "Speed-up vs teacher [95% CI]" in results
    assert "(batch 1, 1 thread): met by " in results and f" of {len(exported) - 3} students" in results
    assert "**int8 costs at most 0.01 avg F1** (the whole 95% interval" in results
    assert json.loads((root / "models" / "export" / "teacher-medpix" / "preprocessing.json").read_text())[
        "image"]["size"] == 40  # the teacher's own image size
    assert json.loads((root / "models" / "export" / "tiny-a-masked" / "preprocessing.json").read_text())["text"][
        "mask_terms"][:2] == ["CT", "MR"]
    assert (root / "reports" / "results" / "optimization_history.png").exists()
    assert (root / "reports" / "data" / "wound" / "manifest_test.csv").exists()
    assert (root / "models" / "medpix" / "teacher_cache.pt").exists()
    # Outputs get normal modes (the umask's), not a temporary file's private 0600.
    private = [str(p) for folder in ("models", "reports") for p in (root / folder).rglob("*")
               if p.is_file() and stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert private == []


def test_status_clean_and_second_repro_is_a_noop(pipeline):
    root, _ = pipeline
    assert "up to date" in _run(["dvc", "status"], root)
    assert "Running stage" not in _run(["dvc", "repro"], root)


def test_the_study_side_by_side_in_100_columns(pipeline):
    root, _ = pipeline
    shown = _run([sys.executable, "-m", "medkd", "experiments"], root)
    lines = shown.splitlines()
    assert lines[0].split() == ["workspace", "master"] or lines[0].split()[0] == "workspace"
    assert max(len(line) for line in lines) <= 100
    assert any(line.startswith("  teacher-medpix ") for line in lines) and "  tiny-a no-kd" in shown


def test_table_f1_recomputes_from_prediction_files(pipeline):
    root, _ = pipeline
    table = pd.read_csv(root / "reports" / "results" / "table_medpix.csv")
    teacher = load_run(root / "reports" / "teachers" / "medpix")
    frame = pd.read_csv(root / "reports" / "teachers" / "medpix" / "predictions_test.csv")
    from sklearn.metrics import f1_score
    f1 = f1_score(frame["modality_true"], frame["modality_pred"], average="macro")
    assert float(table.iloc[0]["Test Modality F1"]) == pytest.approx(round(f1, 3), abs=1e-9)  # one seed: no ±
    assert teacher["test"]["modality"]["f1_macro"] == pytest.approx(f1)
    assert table.iloc[0]["Variant"] == "reference" and "Baseline" not in set(table.iloc[:, -2].dropna())


def test_metrics_and_plots_commands_work(pipeline):
    root, _ = pipeline
    shown = _run(["dvc", "metrics", "show"], root)
    assert "tuned.test_avg_f1" in shown and "no-kd.test_avg_f1" in shown  # every variant of distill:
    assert sorted(p.name for p in (root / "reports" / "plots" / "distill-tiny-b").iterdir()) == [
        "baseline-seed42.csv", "no-kd-seed42.csv", "tuned-seed42.csv"]
    _run(["dvc", "plots", "show", "-o", "plots-out"], root)
    assert (root / "plots-out" / "index.html").exists()


def _outputs(root: Path) -> dict[str, str]:
    """sha256 of every stage output file (the params stamp aside)."""
    files = [p for folder in ("models", "reports") for p in (root / folder).rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if p.name != "params.ok"}


def _repro(root: Path, *options: str):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(["dvc", "repro", *options], cwd=root, env=env, capture_output=True, text=True)


def test_a_params_typo_stops_repro_before_any_output_is_deleted(pipeline):
    root, _ = pipeline
    original = (root / "params.yaml").read_text()
    before = _outputs(root)
    params = yaml.safe_load(original)
    model = params["distill"]["tuned"]["model"]
    model["fusion_layer"] = model.pop("fusion_layers")
    params["teachers"]["wound"]["train"]["epochs"] = "three"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = _repro(root)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert "distill.tuned.model.fusion_layer: unknown key (did you mean 'fusion_layers'?)" in log
    assert "teachers.wound.train.epochs: Input should be a valid integer" in log
    assert "Running stage 'check'" in log and "Running stage 'distill" not in log and "Running stage 'teacher" not in log
    assert _outputs(root) == before  # every earlier output is still there, unchanged
    # Reverting the typo costs only the check: nothing else re-runs.
    (root / "params.yaml").write_text(original)
    done = _repro(root)
    assert done.returncode == 0, done.stdout + done.stderr
    ran = {line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"check"}, done.stdout
    assert _outputs(root) == before


def test_changing_one_student_reruns_only_it_its_export_and_the_report(pipeline):
    root, _ = pipeline
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["students"]["tiny-b"]["text_weights"] = None
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run(["dvc", "status"], root)
    changed = {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith("\t")}
    assert changed == {"check", "distill@tiny-b", "export@tiny-b", "report"}, status
    # What `dvc repro` would run (the check re-writing the same params.ok is covered by the typo test above).
    done = _repro(root, "--dry")
    assert done.returncode == 0, done.stdout + done.stderr
    ran = {line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"check", "distill@tiny-b", "export@tiny-b", "report"}, done.stdout
    (root / "params.yaml").write_text(original)


def test_a_missing_data_set_stops_the_check_with_instructions(tmp_path):
    root = _project(tmp_path, REPO / "configs" / "ci.yaml")
    make_synthetic_wound(root / "data" / "wound-1-0", sizes=(32, 12, 12), image_size=32)
    (root / "data" / "medpix-2.0").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["dvc", "repro", "prepare@medpix"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    said = done.stdout + done.stderr
    # The check stage says what is missing, at its key path, before any stage deletes or runs anything.
    assert "  data.medpix.root: 'data/medpix-2.0' holds no Descriptions.json: not a MedPix-2.0 folder " \
           "(`make data` fetches one)" in said.splitlines()
    assert "Running stage 'prepare@medpix'" not in said and "Traceback" not in said


def _preset(name: str, tmp: Path) -> tuple[dict, Path]:
    """A preset's params (params.yaml with the overlay laid over) and a file holding them."""
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                   load_overlay(REPO / "configs" / f"{name}.yaml"))
    path = tmp / f"{name}-params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params, path


def test_paper_preset_parses_builds_its_dag_and_models(tmp_path):
    params, path = _preset("paper", tmp_path)
    assert params["data"]["medpix"]["image_size"] == 224 and params["distill"]["train"]["epochs"] == 10
    root = _project(tmp_path, path)
    dag = _run(["dvc", "dag", "--md"], root)
    for stage in ("prepare@wound", "teacher@medpix", "distill@wound-deit-tiny-minilm", "search", "report"):
        assert stage in dag
    with torch.device("meta"):
        for dataset, teacher in params["teachers"].items():
            assert build_model(ModelConfig.from_dict(teacher["model"]), (2, 5), pretrained=False)
        for student in params["students"]:
            for variant in variants(params):
                model_cfg, _, _ = student_configs(params, student, variant)
                assert build_model(model_cfg, (10, 3), pretrained=False).fusion_dim in (256, 384)


def test_full_preset_is_the_ci_study_at_full_scale(tmp_path):
    """configs/full.yaml (what the default's budget leaves out) has the shape of configs/ci.yaml, which
    the pipeline test above runs end to end: the same variants with the same scope, loss terms and
    modalities, and a masked copy of MedPix with its own teacher and primary-student twin."""
    full, path = _preset("full", tmp_path)
    ci = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())

    def shape(params):
        primary = params["optuna"]["student"]
        variants_shape = {}
        for variant in variants(params):
            section = params["distill"][variant]
            model, loss, _ = student_configs(params, primary, variant)
            variants_shape[variant] = (section.get("base"), section.get("students", "all"),
                                       section.get("seeds", "default"), tuple(loss.active_terms), model.modalities)
        masked = {name for name, d in params["data"].items() if d.get("mask_terms")}
        twins = {s["dataset"] for s in params["students"].values() if s["dataset"] in masked}
        return variants_shape, masked == twins == (masked & set(params["teachers"])), len(masked)

    assert shape(full) == shape(ci) and shape(full)[1:] == (True, 1)
    assert {"CT", "MR", "MRI", "T1", "T2", "FLAIR", "DWI", "ADC", "computed tomography", "magnetic resonance"} <= set(
        full["data"]["medpix-masked"]["mask_terms"])
    root = _project(tmp_path, path)
    dag = _run(["dvc", "dag", "--md"], root)
    for stage in ("teacher@medpix-masked", "distill@mobilenetv2-minilm-masked", "search", "report"):
        assert stage in dag
