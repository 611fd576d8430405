"""ONNX export, its parity with PyTorch, the measurements, and `medkd predict` on a tiny model."""

import json
import os
import stat
import statistics
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medkd.catalog.synthetic import make_synthetic_medpix
from medkd.data.prepared import DataConfig, PreparedData
from medkd.deploy import onnx_export as export
from medkd.deploy.predictor import main as predict_main
from medkd.models.backbones import build_tokenizer
from medkd.models.checkpoint import save_checkpoint
from medkd.models.classifier import ModelConfig, build_model

CFG = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=16, fusion_layers=2, fusion_heads=2, dropout=0.1)
MASK = ("ct", "mr")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier (random weights) saved as a checkpoint and exported, with its data."""
    tmp = tmp_path_factory.mktemp("export")
    root = make_synthetic_medpix(tmp / "medpix", sizes=(12, 4, 10), image_size=32)
    data = PreparedData.load(DataConfig("medpix", str(root), image_size=32, max_length=24, mask_terms=MASK))
    torch.manual_seed(0)
    model = build_model(CFG, data.vocab.num_classes).eval()
    checkpoint = tmp / "model.pt"
    save_checkpoint(checkpoint, model, CFG, data.vocab, data.config)
    tokenizer = build_tokenizer(CFG.text)
    test = data.dataset("test", {export.ROLE: tokenizer})
    batch = test.collate(list(range(4)))
    folder = export.export_model(model, CFG, tokenizer, batch, export.Preprocessing.of(data.config, data.vocab),
                                 tmp / "exported")
    return {"tmp": tmp, "data": data, "model": model, "checkpoint": checkpoint, "folder": folder, "test": test}


def test_export_folder_is_self_describing_and_checked(trained):
    folder = trained["folder"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.int8.onnx", "model.onnx", "preprocessing.json",
                                                        "tokenizer"]
    spec = export.read_preprocessing(folder)
    assert spec["format"] == export.FORMAT and spec["image"]["size"] == 32 and spec["text"]["max_length"] == 24
    assert spec["classes"] == {t: list(c) for t, c in zip(trained["data"].vocab.tasks, trained["data"].vocab.classes)}
    assert spec["text"]["mask_terms"] == list(MASK)
    assert spec["text"]["tokenizer_sha256"] == export.tokenizer_fingerprint(folder / "tokenizer")
    import onnx
    for name in ("model.onnx", "model.int8.onnx"):
        proto = onnx.load(str(folder / name))
        onnx.checker.check_model(proto)
        assert {p.key: p.value for p in proto.metadata_props}["medkd_format"] == export.FORMAT
        assert [o.name for o in proto.graph.output] == ["logits_modality", "logits_location"]
    assert not list(trained["tmp"].glob(".exported*"))  # no staging folder left behind


def test_export_folder_is_readable_by_group_and_others_like_every_output(trained):
    umask = os.umask(0)
    os.umask(umask)
    for path in [trained["folder"], *trained["folder"].rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_onnx_matches_pytorch_on_every_batch_and_sequence_length(trained):
    session = export.session(trained["folder"] / export.FP32)
    eager = export.score(lambda b: export.eager_logits(trained["model"], b), trained["test"], batch_size=3)
    exported = export.score(lambda b: session.run(None, export.onnx_inputs(b)), trained["test"], batch_size=3)
    parity = export.check_parity(eager, exported)
    assert parity["predictions_identical"] and parity["max_abs_logit_diff"] <= 1e-4 and parity["n"] == 10
    assert exported.avg_f1() == pytest.approx(eager.avg_f1())
    shifted = export.Scored([exported.logits[0] + 1e-3, exported.logits[1]], exported.labels)
    with pytest.raises(export.ExportError, match="not faithful: max"):
        export.check_parity(eager, shifted)
    # The trained module's own logits: their distance is recorded, their classes must agree too.
    nudged = export.Scored([eager.logits[0] + 5e-4, eager.logits[1]], eager.labels)
    checked = export.check_parity(eager, exported, trained=nudged)
    assert checked["trained_vs_export_form_max_abs_logit_diff"] == pytest.approx(5e-4, rel=1e-3)
    flipped = eager.logits[0].copy()
    flipped[0, flipped[0].argmin()] += 100.0  # sample 0's least likely class becomes its prediction
    with pytest.raises(export.ExportError, match="predicted classes differ"):
        export.check_parity(eager, exported, trained=export.Scored([flipped, eager.logits[1]], eager.labels))


def test_int8_model_runs_and_is_smaller(trained):
    folder = trained["folder"]
    int8 = export.session(folder / export.INT8)
    scored = export.score(lambda b: int8.run(None, export.onnx_inputs(b)), trained["test"])
    assert scored.logits[0].shape == (10, 2) and 0.0 <= scored.avg_f1() <= 1.0
    assert export.file_mb(folder / export.INT8) < export.file_mb(folder / export.FP32)


def _int8_weight_extremes(path) -> list[int]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    return [int(abs(numpy_helper.to_array(t).astype(int)).max()) for t in proto.graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_quantized")]


def test_int8_weights_keep_to_7_bits_unless_told_otherwise(trained, tmp_path):
    # Without VNNI, x86 sums pairs of u8 x s8 products in int16: 255 * 127 * 2 overflows it, 255 * 64 * 2
    # does not. The default export's quantized weights must stay within 7 bits; full range reaches 127.
    seven = _int8_weight_extremes(trained["folder"] / export.INT8)
    export.quantize_int8(trained["folder"] / export.FP32, tmp_path / "full.onnx", reduce_range=False)
    full = _int8_weight_extremes(tmp_path / "full.onnx")
    assert seven and len(seven) == len(full)
    assert max(seven) <= 64 and max(full) == 127


def test_latency_statistics_cover_the_requested_runs(trained):
    calls = []
    stats = export.latency(lambda b: calls.append(b), ["a", "b", "c"], runs=30, warmup=4)
    assert len(calls) == 34 and calls[4:8] == ["a", "b", "c", "a"] and stats["runs"] == 30  # timed runs start over
    assert 0 <= stats["p50_ms"] <= stats["p95_ms"]
    batches = [{"index": torch.arange(4)}, {"index": torch.arange(3)}]
    assert export.throughput(lambda b: None, batches) > 0


class _FakeClock:
    """Time that passes only when a timed call says so: the statistics, not this machine, are tested."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def spend(self, ms):
        self.now += ms / 1000


def test_paired_speedup_alternates_and_bootstraps_the_pairs():
    clock, calls = _FakeClock(), []
    student_ms = [2.0, 3.0, 2.5, 9.0, 2.0, 2.2, 2.4, 2.6, 3.5, 2.1]
    teacher_ms = [11.0, 12.0, 14.0, 30.0, 10.0, 11.5, 12.5, 13.0, 16.0, 10.5]

    def student(batch):
        calls.append(("student", batch))
        clock.spend(student_ms[batch] if len(calls) > 4 else 50.0)  # warm-up calls are not timed

    def teacher(batch):
        calls.append(("teacher", batch))
        clock.spend(teacher_ms[batch] if len(calls) > 4 else 50.0)

    result = export.paired_speedup(student, teacher, list(range(10)), runs=10, warmup=2, resamples=500, block=3,
                                   seed=3, clock=clock)
    timed = calls[4:]
    assert [who for who, _ in timed[:4]] == ["student", "teacher", "teacher", "student"]  # who goes first alternates
    assert [b for _, b in timed[::2]] == list(range(10)) == [b for _, b in timed[1::2]]  # both on the same sample
    assert result["p50_ms"] == pytest.approx(statistics.median(student_ms), abs=1e-3)
    assert result["reference_p50_ms"] == pytest.approx(statistics.median(teacher_ms), abs=1e-3)
    assert result["speedup"] == pytest.approx(statistics.median(teacher_ms) / statistics.median(student_ms), abs=1e-3)
    # The interval, resample by resample: four runs of three consecutive pairs from the same draws
    # (the last run cut to fill ten pairs), medians taken one list at a time.
    ratios = []
    for starts in np.random.default_rng(3).integers(0, 8, size=(500, 4)):
        pairs = [start + offset for start in starts for offset in range(3)][:10]
        ratios.append(statistics.median(teacher_ms[i] for i in pairs) / statistics.median(student_ms[i] for i in pairs))
    assert result["ci95"] == pytest.approx(list(np.percentile(ratios, [2.5, 97.5])), abs=1e-3)
    assert result["ci95"][0] <= result["speedup"] <= result["ci95"][1] and result["runs"] == 10 and result["block"] == 3


def test_the_speedup_interval_is_the_studys_one_bootstrap_interval(monkeypatch):
    """One percentile helper (medkd.scoring.stats) for every interval, at the study's one level."""
    used = []
    real = export.percentile_interval
    monkeypatch.setattr(export, "percentile_interval", lambda *a, **k: used.append(a) or real(*a, **k))
    clock = _FakeClock()
    export.paired_speedup(lambda b: clock.spend(1.0 + b), lambda b: clock.spend(5.0), list(range(4)), runs=8,
                          warmup=0, resamples=50, clock=clock)
    assert len(used) == 1 and len(used[0]) == 2  # the default level: stats.LEVEL


def test_a_students_stage_needs_its_teachers_export_read_as_it_reads_the_data(project, tmp_path):
    import copy

    from medkd.config.sections import teacher_plan
    from medkd.data.prepared import DataConfig
    from medkd.pipeline.stage import Paths
    from medkd.stages.export import exported_teacher
    root, params = project
    # The teacher reads the test split at its own image size (teachers.medpix.image_size), the rest as the data.
    teacher_size = teacher_plan(params, "medpix").image_size
    config = DataConfig.from_dict({**params["data"]["medpix"], "root": str(root / params["data"]["medpix"]["root"]),
                                   **({"image_size": teacher_size} if teacher_size else {})})
    with pytest.raises(export.ExportError, match="run `dvc repro export-teacher@medpix`"):
        exported_teacher(Paths(tmp_path), "medpix", config)
    if not (root / "models" / "export" / "teacher-medpix").exists():
        from medkd.stages.export import export_stage
        export_stage({**params, "export": {"latency_runs": 2, "warmup": 1, "threads": [1], "throughput_batch": 4,
                                           "int8": False}}, "teacher-medpix", root)
    teacher = exported_teacher(Paths(root), "medpix", config)
    assert teacher.image_size == config.image_size and teacher.max_length == config.max_length
    with pytest.raises(export.ExportError, match=f"image_size = {config.image_size}, data.medpix.image_size is now 16"):
        exported_teacher(Paths(root), "medpix", DataConfig.from_dict({**config.to_dict(), "image_size": 16}))
    changed = DataConfig.from_dict({**copy.deepcopy(params["data"]["medpix"]), "max_length": 20,
                                    **({"image_size": teacher_size} if teacher_size else {})})
    with pytest.raises(export.ExportError, match="max_length = 24, data.medpix.max_length is now 20"):
        exported_teacher(Paths(root), "medpix", changed)


def _caption_rows(data, n=3):
    records = data.records["test"][:n]
    return records, [str(r.image_path) for r in records], [r.text for r in records]


def test_predict_agrees_with_the_model_and_writes_probabilities(trained, tmp_path, capsys):
    records, images, texts = _caption_rows(trained["data"])
    table = tmp_path / "cases.csv"
    pd.DataFrame({"image": images, "text": texts}).to_csv(table, index=False)
    out = tmp_path / "predictions.csv"
    assert predict_main([str(trained["folder"]), "--csv", str(table), "--out", str(out)]) == 0
    predicted = pd.read_csv(out)
    test = trained["test"]
    eager = export.eager_logits(trained["model"], test.collate(list(range(3))))
    for t, task in enumerate(trained["data"].vocab.tasks):
        classes = trained["data"].vocab.classes[t]
        assert predicted[f"{task}_pred"].tolist() == [classes[k] for k in eager[t].argmax(1)]
        probs = predicted[[f"{task}_prob_{c}" for c in classes]].to_numpy()
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
        assert np.allclose(probs.max(1), predicted[f"{task}_prob"], atol=1e-6)
    # One image and caption: one line per sample, the same answer from the checkpoint.
    assert predict_main([str(trained["folder"] / "model.onnx"), "--image", images[0], "--text", texts[0]]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"modality: {predicted.modality_pred[0]} (") and "; location: " in line
    assert predict_main([str(trained["checkpoint"]), "--image", images[0], "--text", texts[0]]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].split(" (")[0] == line.split(" (")[0]


def test_predict_masks_the_words_the_model_was_trained_without(trained):
    from medkd.deploy.predictor import load_predictor
    predictor = load_predictor(trained["folder"])
    masked, _ = predictor.encode(["ct of the head", "MR image"])
    assert (masked == predictor.tokenizer.mask_token_id).sum(1).tolist() == [1, 1]


def _bad(args, capsys):
    code = predict_main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("case", ["missing", "unreadable", "rgba", "16-bit", "empty caption", "columns",
                                  "not ours", "not a checkpoint", "foreign onnx", "tokenizer"])
def test_predict_refuses_bad_input_with_one_line_and_writes_nothing(case, trained, tmp_path, capsys):
    _, images, texts = _caption_rows(trained["data"], 1)
    model, image, text = trained["folder"], images[0], texts[0]
    extra = []
    if case == "missing":
        image, expect = tmp_path / "nope.png", "does not exist"
    elif case == "unreadable":
        image = tmp_path / "broken.png"
        image.write_text("not an image")
        expect = "cannot be read as an image"
    elif case == "rgba":
        image = tmp_path / "alpha.png"
        Image.new("RGBA", (8, 8)).save(image)
        expect = "has mode RGBA: it has an alpha channel"
    elif case == "16-bit":
        image = tmp_path / "deep.png"
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(image)
        expect = "more than 8 bits per channel"
    elif case == "empty caption":
        text, expect = "   ", "empty caption in --image/--text"
    elif case == "columns":
        table = tmp_path / "cases.csv"
        pd.DataFrame({"path": [image], "caption": [text]}).to_csv(table, index=False)
        extra, expect = ["--csv", table], "lacks the columns image, text (found: path, caption)"
    elif case == "not ours":
        model, expect = tmp_path, "is not a medkd export: no preprocessing.json"
    elif case == "not a checkpoint":
        model = tmp_path / "other.pt"
        torch.save({"weights": 1}, model)
        expect = "is not a medkd checkpoint"
    elif case == "foreign onnx":
        import shutil
        model = tmp_path / "copy"
        shutil.copytree(trained["folder"], model)
        import onnx
        proto = onnx.load(str(model / "model.onnx"))
        del proto.metadata_props[:]
        onnx.save(proto, str(model / "model.onnx"))
        expect = "is not a medkd export (no 'medkd-onnx-1' metadata)"
    else:
        import shutil
        model = tmp_path / "copy"
        shutil.copytree(trained["folder"], model)
        vocab = next(p for p in (model / "tokenizer").iterdir() if p.name in ("vocab.txt", "tokenizer.json"))
        vocab.write_text(vocab.read_text() + "\n")
        expect = "does not match the one"
    out = tmp_path / "out.csv"
    args = [model, *(extra or ["--image", image, "--text", text]), "--out", out]
    code, err = _bad(args, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("medkd predict: error: ") and expect in err[0], err
    assert not out.exists()


def test_predict_is_a_console_command_and_a_module(trained):
    _, images, texts = _caption_rows(trained["data"], 1)
    for command in ([sys.executable, "-m", "medkd", "predict"], [sys.executable, "-m", "medkd.deploy.predictor"]):
        done = subprocess.run([*command, str(trained["folder"]), "--image", images[0], "--text", texts[0]],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.startswith("modality: "), done.stderr[-2000:]


def test_export_stage_measures_the_teacher_and_refuses_changed_data_settings(project):
    import copy

    from medkd.stages.export import export_stage
    root, params = project
    params = {**params, "export": {"latency_runs": 5, "warmup": 1, "threads": [1, 2], "throughput_batch": 4}}
    result = export_stage(params, "teacher-medpix", root)["result"]
    assert result["parity"]["predictions_identical"] and result["parity"]["n"] == 12
    assert set(result["fp32"]) >= {"mb", "avg_f1", "latency_1_thread", "latency_2_threads", "throughput_batch4_per_s"}
    assert result["fp32"]["avg_f1"] == pytest.approx(result["eager_avg_f1"])
    assert result["int8"]["avg_f1_change"] == pytest.approx(result["int8"]["avg_f1"] - result["fp32"]["avg_f1"],
                                                            abs=1e-4)
    assert result["torch_eager"]["latency_1_thread"]["runs"] == 5
    # The export scores what the teacher stage's own fp32 evaluation scored; the CPU's VNNI is on record.
    assert result["study"]["checked"] and abs(result["study"]["difference"]) <= 0.005
    assert isinstance(result["cpu_vnni"], bool) and "selection" not in result
    lean = json.loads((root / "reports" / "metrics" / "export-teacher-medpix.json").read_text())
    assert lean["fp32_avg_f1"] == result["fp32"]["avg_f1"] and "int8_p50_ms_1_thread" in lean
    assert (root / "models" / "export" / "teacher-medpix" / "model.onnx").exists()
    changed = copy.deepcopy(params)
    changed["data"]["medpix"]["max_length"] = 20
    with pytest.raises(export.ExportError, match="trained with data.medpix.max_length = 24"):
        export_stage(changed, "teacher-medpix", root)


def test_export_form_computes_the_same_function_and_leaves_the_model_alone(trained):
    """The exported graph's first RGB convolution runs on (R, G - R, B - R): same logits, and the
    caller's model (the parity check's reference) is not changed."""
    model = trained["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    form = export.export_form(model)
    assert sum(isinstance(m, export._ChannelDifferenceConv) for m in form.modules()) == 1
    batch = trained["test"].collate(list(range(4)))
    inputs = (batch["pixel_values"], batch[f"input_ids_{export.ROLE}"], batch[f"attention_mask_{export.ROLE}"])
    with torch.inference_mode():
        plain, rewritten = model(*inputs), form(*inputs)
    for key in ("logits_modality", "logits_location"):
        torch.testing.assert_close(rewritten[key], plain[key], atol=1e-5, rtol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_shipped_run_is_the_best_variant_on_dev_then_its_best_seed():
    from medkd.config.study import Run
    from medkd.stages.export import pick_run

    def m(dev, params=100):
        return {"dev": {"avg_f1": dev}, "parameters": params, "test": {"avg_f1": 0.0}}

    metrics = {Run("tuned", 42): m(0.80), Run("tuned", 43): m(0.84), Run("baseline", 42): m(0.81),
               Run("no-kd", 42): m(0.85), Run("no-kd", 43): m(0.83)}
    run, selection = pick_run(metrics)  # no-kd: mean 0.84 > tuned 0.82 > baseline 0.81; its better seed: 42
    assert run == Run("no-kd", 42) and selection["variant"] == "no-kd"
    assert selection["mean_dev_avg_f1"] == {"tuned": 0.82, "baseline": 0.81, "no-kd": 0.84}
    # A tie on dev goes to the variant with fewer parameters, whatever the test set would say.
    tie = {Run("tuned", 42): m(0.85, 300), Run("baseline", 42): m(0.85, 200)}
    assert pick_run(tie)[0] == Run("baseline", 42)
    assert pick_run({Run("tuned", 42): m(0.85, 200), Run("baseline", 42): m(0.85, 200)})[0] == Run("tuned", 42)


def test_the_export_must_score_what_the_study_scored_for_an_fp32_run():
    from medkd.stages.export import study_agreement
    fp32 = {"test": {"avg_f1": 0.8000}, "environment": {"precision": "fp32"}}
    assert study_agreement(0.8040, fp32) == {"study_test_avg_f1": 0.8, "difference": 0.004, "checked": True,
                                             "tolerance": 0.005}
    with pytest.raises(export.ExportError, match="0.8100.*0.8000.*more than 0.005"):
        study_agreement(0.8100, fp32)
    bf16 = {"test": {"avg_f1": 0.8000}, "environment": {"precision": "bf16 autocast"}}
    assert study_agreement(0.8100, bf16)["checked"] is False  # a bf16 run's evaluation differs by design
