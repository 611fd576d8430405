import dataclasses
import json

import pandas as pd
import pytest
import torch
from conftest import loss_config, medpix_data

from medkd.catalog.synthetic import make_synthetic_medpix, make_synthetic_wound
from medkd.config.configs import TrainConfig
from medkd.data.prepared import DataConfig, PreparedData, make_loader
from medkd.engine.evaluation import model_outputs
from medkd.engine.loop import Distillation, TeacherSource, TrainingInterrupted, distill_student, train_teacher
from medkd.engine.teacher_cache import build_teacher_cache, load_or_build_teacher_cache
from medkd.models.backbones import build_tokenizer
from medkd.models.checkpoint import load_checkpoint
from medkd.models.classifier import ModelConfig
from medkd.scoring.metrics import metrics_from_predictions

TEACHER = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=24, fusion_heads=2, dropout=0.1)
STUDENT = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=16, fusion_layers=2, fusion_heads=2, dropout=0.2)
FAST = TrainConfig(epochs=1, batch_size=8, eval_batch_size=16, lr=1e-3, seed=7, precision="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return medpix_data(tmp_path_factory.mktemp("medpix"), sizes=(32, 12, 12), max_length=32)


@pytest.fixture(scope="module")
def teacher_run(data, tmp_path_factory):
    return train_teacher(data, TEACHER, FAST, tmp_path_factory.mktemp("teacher"))


def test_teacher_run_writes_recomputable_metrics(teacher_run, data):
    out = teacher_run.checkpoint.parent
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("dev", "test"):
        frame = pd.read_csv(out / f"predictions_{split}.csv")
        assert len(frame) == len(data.records[split])
        recomputed = metrics_from_predictions(frame, data.vocab)
        assert recomputed["avg_f1"] == pytest.approx(metrics[split]["avg_f1"], abs=1e-12)
        assert recomputed["modality"]["confusion"] == metrics[split]["modality"]["confusion"]
        probs = frame.filter(like="location_prob_").to_numpy()
        assert probs.shape[1] == 5 and abs(probs.sum(1) - 1).max() < 1e-5
    assert metrics["parameters"] == teacher_run.parameters > 0
    assert len(pd.read_csv(out / "history.csv")) == 1


def test_checkpoint_rebuilds_the_model(teacher_run, data):
    model, payload = load_checkpoint(teacher_run.checkpoint)
    assert payload["vocab"]["classes"][0] == ["CT", "MR"]
    assert payload["model_config"] == TEACHER.to_dict()
    loader = make_loader(data.dataset("dev", {"teacher": build_tokenizer("tiny-bert")}), 16, shuffle=False)
    out = model_outputs(model, loader, torch.device("cpu"), "teacher", bf16=False)
    frame = pd.read_csv(teacher_run.checkpoint.parent / "predictions_dev.csv")
    pred = [data.vocab.classes[0][i] for i in out["logits_modality"].argmax(1)]
    assert pred == frame["modality_pred"].tolist()


@pytest.mark.parametrize("bf16", [False, True])
def test_cached_teacher_outputs_equal_live_ones(teacher_run, data, bf16):
    cfg = TrainConfig(**{**FAST.to_dict(), "precision": "bf16" if bf16 else "fp32"})
    # bf16 here tests the cache's numerics, whatever this CPU has (emulated bf16 is slow, not wrong).
    cache = build_teacher_cache(teacher_run.checkpoint, data, cfg, device=torch.device("cpu"))
    teacher, _ = load_checkpoint(teacher_run.checkpoint)
    teacher.eval()
    dataset = data.dataset("train", {"teacher": build_tokenizer("tiny-bert")})
    # Live, in shuffled batches of another size (so padding is trimmed differently).
    for batch in make_loader(dataset, 5, shuffle=True, seed=123):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            live = teacher(batch["pixel_values"], batch["input_ids_teacher"], batch["attention_mask_teacher"])
        for key, cached in cache["outputs"].items():
            tol = 2e-2 if bf16 else 1e-5
            torch.testing.assert_close(live[key].float(), cached[batch["index"]], atol=tol, rtol=tol)


def test_cache_is_keyed_by_teacher_and_preprocessing(teacher_run, data, tmp_path, monkeypatch):
    path = tmp_path / "cache.pt"
    first = load_or_build_teacher_cache(teacher_run.checkpoint, data, FAST, path)
    calls = []
    import medkd.engine.teacher_cache as cache_module
    real_build = cache_module.build_teacher_cache
    monkeypatch.setattr(cache_module, "build_teacher_cache", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    assert load_or_build_teacher_cache(teacher_run.checkpoint, data, FAST, path)["key"] == first["key"]
    assert calls == []  # reused
    # Students at another image size read the same teacher outputs: the teacher sees its own size.
    resized = PreparedData.load(DataConfig("medpix", data.config.root, image_size=24, max_length=32))
    assert load_or_build_teacher_cache(teacher_run.checkpoint, resized, FAST, path)["key"] == first["key"]
    assert calls == []
    # A change the teacher does see (its captions cut shorter) is another key, built once.
    shorter = PreparedData.load(DataConfig("medpix", data.config.root, image_size=32, max_length=20))
    second = load_or_build_teacher_cache(teacher_run.checkpoint, shorter, FAST, path)
    assert calls == [1] and second["key"] != first["key"]
    # Another teacher (one weight changed) is another key.
    model, payload = load_checkpoint(teacher_run.checkpoint)
    payload["state_dict"]["head_modality.bias"] += 1.0
    payload["fingerprint"] = "changed"
    torch.save(payload, tmp_path / "other.pt")
    third = load_or_build_teacher_cache(tmp_path / "other.pt", data, FAST, path)
    assert third["key"] not in (first["key"], second["key"])


def test_cache_key_covers_everything_that_changes_teacher_outputs(teacher_run, data, tmp_path):
    from transformers import BertTokenizer

    from medkd.engine.teacher_cache import teacher_cache_key
    from medkd.models.backbones import tiny_vocab
    payload = torch.load(teacher_run.checkpoint, weights_only=False)
    tokenizer = build_tokenizer("tiny-bert")
    base = teacher_cache_key(payload, data, tokenizer, bf16=False)
    assert teacher_cache_key(payload, data, build_tokenizer("tiny-bert"), bf16=False) == base  # stable

    def same_data_but(change):
        root = make_synthetic_medpix(tmp_path / f"copy{len(list(tmp_path.iterdir()))}", sizes=(32, 12, 12),
                                     image_size=32)
        change(root)
        return PreparedData.load(DataConfig("medpix", str(root), image_size=32, max_length=32))

    assert teacher_cache_key(payload, same_data_but(lambda root: None), tokenizer, False) == base  # same content

    def new_captions(root):
        path = root / "splitted_dataset" / "descriptions_train.jsonl"
        path.write_text(path.read_text().replace("scan shows", "scan displays"))

    def inverted_images(root):
        from PIL import Image, ImageOps
        for png in (root / "images").glob("*.png"):
            ImageOps.invert(Image.open(png).convert("L")).save(png)

    changed = {
        "captions": teacher_cache_key(payload, same_data_but(new_captions), tokenizer, False),
        "images": teacher_cache_key(payload, same_data_but(inverted_images), tokenizer, False),
        "model config": teacher_cache_key({**payload, "model_config": {**payload["model_config"], "dropout": 0.5}},
                                          data, tokenizer, False),
        "weights": teacher_cache_key({**payload, "fingerprint": "other"}, data, tokenizer, False),
        "tokenizer": teacher_cache_key(payload, data, BertTokenizer(vocab=tiny_vocab(), do_lower_case=False), False),
        "image size": teacher_cache_key(payload, PreparedData.load(DataConfig("medpix", data.config.root,
                                        image_size=24, max_length=32)), tokenizer, False),
        "max length": teacher_cache_key(payload, PreparedData.load(DataConfig("medpix", data.config.root,
                                        image_size=32, max_length=20)), tokenizer, False),
        "text fields": teacher_cache_key(payload, PreparedData.load(DataConfig(
            "medpix", data.config.root, image_size=32, max_length=32, text_fields=("Caption", "Plane"))),
            tokenizer, False),
        "precision": teacher_cache_key(payload, data, tokenizer, True),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed


@pytest.mark.parametrize("use_cache", [True, False])
def test_distillation_leaves_teacher_bit_identical(teacher_run, data, tmp_path, use_cache):
    before = torch.load(teacher_run.checkpoint, weights_only=False)["state_dict"]
    source = TeacherSource(teacher_run.checkpoint, cache_path=tmp_path / "cache.pt", live=not use_cache)
    result = distill_student(data, Distillation(STUDENT, loss_config(nce_k=8), FAST, tmp_path, source))
    after = torch.load(teacher_run.checkpoint, weights_only=False)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "cache.pt").exists() == use_cache
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    recomputed = metrics_from_predictions(pd.read_csv(tmp_path / "predictions_test.csv"), data.vocab)
    assert recomputed["avg_f1"] == pytest.approx(metrics["test"]["avg_f1"], abs=1e-12)
    history = pd.read_csv(tmp_path / "history.csv")
    assert {"train_ce", "train_kl", "train_mse", "train_crd", "train_total"} <= set(history.columns)
    assert result.parameters < teacher_run.parameters


def test_live_teacher_stays_frozen_during_the_epoch(teacher_run, data, tmp_path, monkeypatch):
    import medkd.engine.loop as train_module
    seen = {}
    real_load = train_module.load_checkpoint

    def spy(path, device="cpu"):
        model, payload = real_load(path, device)
        seen["teacher"] = model
        return model, payload

    monkeypatch.setattr(train_module, "load_checkpoint", spy)
    distill_student(data, Distillation(STUDENT, loss_config(nce_k=8), FAST, tmp_path,
                                       TeacherSource(teacher_run.checkpoint, live=True)))
    teacher = seen["teacher"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_same_seed_same_metrics(teacher_run, data, tmp_path):
    source = TeacherSource(teacher_run.checkpoint, cache_path=tmp_path / "cache.pt")
    runs = [distill_student(data, Distillation(STUDENT, loss_config(nce_k=8), FAST, tmp_path / str(i), source))
            for i in range(2)]
    assert runs[0].history[0]["train_total"] == runs[1].history[0]["train_total"]
    assert runs[0].test == runs[1].test
    other = distill_student(data, Distillation(STUDENT, loss_config(nce_k=8),
                                               TrainConfig(**{**FAST.to_dict(), "seed": 8}), tmp_path / "other",
                                               source))
    assert other.history[0]["train_total"] != runs[0].history[0]["train_total"]


def test_augmentation_runs_the_teacher_live(teacher_run, data, tmp_path):
    cfg = TrainConfig(**{**FAST.to_dict(), "augment": True})
    with pytest.raises(ValueError, match="cannot serve randomly augmented"):
        distill_student(data, Distillation(STUDENT, loss_config(), cfg, tmp_path,
                                           TeacherSource(teacher_run.checkpoint, live=False)))
    result = distill_student(data, Distillation(STUDENT, loss_config(nce_k=8), cfg, tmp_path,
                                                TeacherSource(teacher_run.checkpoint)))
    assert not (tmp_path / "teacher_cache.pt").exists() and result.best_epoch == 1


def test_wound_layout_end_to_end(tmp_path):
    root = make_synthetic_wound(tmp_path / "wound", sizes=(24, 8, 8), image_size=32)
    data = PreparedData.load(DataConfig("wound", str(root), image_size=32, max_length=32))
    teacher = train_teacher(data, TEACHER, FAST, tmp_path / "t")
    student = distill_student(data, Distillation(STUDENT, loss_config(nce_k=8), FAST, tmp_path / "s",
                                                 TeacherSource(teacher.checkpoint)))
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["tasks"] == ["type", "severity"] and set(metrics["test"]) >= {"type", "severity", "avg_f1"}
    assert student.test["avg_f1"] == metrics["test"]["avg_f1"]


def test_fingerprint_covers_scalar_and_integer_buffers():
    from medkd.engine.loop import state_fingerprint
    a = {"w": torch.ones(2, 2), "bn.num_batches_tracked": torch.tensor(3)}
    b = {"w": torch.ones(2, 2), "bn.num_batches_tracked": torch.tensor(4)}
    assert state_fingerprint(a) == state_fingerprint(dict(a)) != state_fingerprint(b)


def _interrupt_after(stop_epoch):
    def report(epoch, score):
        if epoch == stop_epoch:
            raise KeyboardInterrupt  # what SIGINT raises in the training loop
    return report


@pytest.mark.parametrize("train_by_length, trunks", [(False, "all"), (True, "all"), (True, 1)])
def test_interrupted_distillation_resumes_to_the_identical_result(teacher_run, data, tmp_path, train_by_length,
                                                                  trunks):
    """Also with frozen trunks read from the trunk cache (`trunks`: the backbones' trainable blocks)."""
    cfg = TrainConfig(**{**FAST.to_dict(), "epochs": 3, "train_by_length": train_by_length})
    student = dataclasses.replace(STUDENT, vision_train_blocks=trunks, text_train_blocks=trunks)
    resume = tmp_path / "state" / "resume.pt"
    run = Distillation(student, loss_config(nce_k=8), cfg, tmp_path / "cut",
                       TeacherSource(teacher_run.checkpoint, cache_path=tmp_path / "cache.pt"), resume_path=resume)
    full = distill_student(data, dataclasses.replace(run, out_dir=tmp_path / "full", resume_path=None))
    with pytest.raises(TrainingInterrupted, match="interrupted at epoch 2 of 3: epochs 1-1 are saved in .*resume.pt"):
        distill_student(data, dataclasses.replace(run, report_epoch=_interrupt_after(1)))
    assert torch.load(resume, weights_only=False)["epoch"] == 1
    resumed = distill_student(data, run)
    for split in ("dev", "test"):
        assert (tmp_path / "full" / f"predictions_{split}.csv").read_bytes() == \
            (tmp_path / "cut" / f"predictions_{split}.csv").read_bytes()
    losses = lambda run: [{k: v for k, v in row.items() if "seconds" not in k} for row in run.history]  # noqa: E731
    assert losses(resumed) == losses(full) and resumed.best_epoch == full.best_epoch
    a, b = (torch.load(r.checkpoint, weights_only=False)["state_dict"] for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The finished run left its state marked complete: a re-run writes the outputs without training.
    state = torch.load(resume, weights_only=False)
    assert state["complete"] and state["optimizer"] is None
    again = distill_student(data, dataclasses.replace(run, out_dir=tmp_path / "again"))
    assert again.history == resumed.history


def test_interrupted_teacher_resumes_to_the_identical_result(data, tmp_path):
    cfg = TrainConfig(**{**FAST.to_dict(), "epochs": 2})
    full = train_teacher(data, TEACHER, cfg, tmp_path / "full")
    resume = tmp_path / "resume.pt"
    import medkd.engine.loop as train_module
    real_fit = train_module._fit
    calls = []

    def fit_with_interrupt(run, compute_loss, loss_fn, loader, report_epoch=None):
        calls.append(1)
        return real_fit(run, compute_loss, loss_fn, loader, _interrupt_after(1) if len(calls) == 1 else None)

    train_module._fit = fit_with_interrupt
    try:
        with pytest.raises(TrainingInterrupted, match="teacher interrupted at epoch 2 of 2"):
            train_teacher(data, TEACHER, cfg, tmp_path / "cut", resume_path=resume)
        resumed = train_teacher(data, TEACHER, cfg, tmp_path / "cut", resume_path=resume)
    finally:
        train_module._fit = real_fit
    assert (tmp_path / "full" / "predictions_test.csv").read_bytes() == (tmp_path / "cut" / "predictions_test.csv").read_bytes()
    assert [r["train_total"] for r in resumed.history] == [r["train_total"] for r in full.history]


def test_state_of_another_run_is_not_resumed(teacher_run, data, tmp_path):
    cfg = TrainConfig(**{**FAST.to_dict(), "epochs": 2})
    resume = tmp_path / "resume.pt"
    with pytest.raises(TrainingInterrupted):
        distill_student(data, Distillation(STUDENT, loss_config(nce_k=8), cfg, tmp_path / "a",
                                           TeacherSource(teacher_run.checkpoint, cache_path=tmp_path / "cache.pt"),
                                           resume_path=resume, report_epoch=_interrupt_after(1)))
    other = TrainConfig(**{**cfg.to_dict(), "lr": 5e-4})  # another learning rate: another run
    run = distill_student(data, Distillation(STUDENT, loss_config(nce_k=8), other, tmp_path / "b",
                                             TeacherSource(teacher_run.checkpoint, cache_path=tmp_path / "cache.pt"),
                                             resume_path=resume))
    fresh = distill_student(data, Distillation(STUDENT, loss_config(nce_k=8), other, tmp_path / "c",
                                               TeacherSource(teacher_run.checkpoint, cache_path=tmp_path / "cache.pt")))
    assert [r["train_total"] for r in run.history] == [r["train_total"] for r in fresh.history]


def test_padding_is_ignored_to_fp32_precision(teacher_run, data):
    """Masked positions change nothing: the same texts padded to their longest or to 40 tokens."""
    model, _ = load_checkpoint(teacher_run.checkpoint)
    model.eval()
    tokenizer = build_tokenizer("tiny-bert")
    texts = [r.text for r in data.records["dev"][:6]]
    pixels = data.images("dev")[:6].float() / 255
    tight = tokenizer(texts, padding="longest", truncation=True, max_length=24, return_tensors="pt")
    wide = tokenizer(texts, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    wide = {k: torch.cat([v, torch.zeros(len(texts), 16, dtype=v.dtype)], 1) for k, v in wide.items()}  # 40 tokens
    assert wide["input_ids"].shape[1] > tight["input_ids"].shape[1]
    with torch.no_grad():
        a = model(pixels, tight["input_ids"], tight["attention_mask"])
        b = model(pixels, wide["input_ids"], wide["attention_mask"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_speed_switches_keep_outputs_within_tolerance(teacher_run, data):
    """Length-sorted evaluation batches and channels-last give the same predictions (fp32, 1e-5)."""
    from medkd.engine.loop import evaluate
    model, _ = load_checkpoint(teacher_run.checkpoint)
    tokenizer = build_tokenizer("tiny-bert")
    plain = TrainConfig(**{**FAST.to_dict(), "channels_last": False, "eval_by_length": False, "eval_batch_size": 5})
    fast = TrainConfig(**{**FAST.to_dict(), "channels_last": True, "eval_by_length": True, "eval_batch_size": 5})
    _, a = evaluate(model, data, "test", tokenizer, "teacher", plain, torch.device("cpu"))
    _, b = evaluate(model.to(memory_format=torch.channels_last), data, "test", tokenizer, "teacher", fast,
                    torch.device("cpu"))
    assert a["index"].tolist() == b["index"].tolist() == list(range(len(data.records["test"])))
    assert (a.filter(like="_pred") == b.filter(like="_pred")).all().all()
    probs = a.filter(like="_prob_").columns
    assert abs(a[probs].to_numpy() - b[probs].to_numpy()).max() < 1e-5


def test_compiled_training_model_keeps_its_checkpoint_keys():
    """`compile: true` compiles in place: checkpoints keep the plain parameter names."""
    from medkd.engine.loop import _trainable
    from medkd.models.classifier import build_model
    plain = build_model(STUDENT, (2, 5), pretrained=False)
    compiled = _trainable(build_model(STUDENT, (2, 5), pretrained=False),
                          TrainConfig(**{**FAST.to_dict(), "compile": True}))
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert compiled._compiled_call_impl is not None


def test_no_kd_control_reads_runs_and_caches_no_teacher(data, tmp_path, monkeypatch):
    """CE only (the no-KD control): the teacher checkpoint may not even exist; nothing teacher-side runs."""
    import medkd.engine.loop as train_module
    import medkd.engine.teacher_cache as cache_module

    def forbidden(*args, **kwargs):
        raise AssertionError("the no-KD control touched the teacher")

    for name in ("load_checkpoint", "load_or_build_teacher_cache"):
        monkeypatch.setattr(train_module, name, forbidden)
    for name in ("read_checkpoint", "build_teacher_cache"):
        monkeypatch.setattr(cache_module, name, forbidden)
    cache = tmp_path / "cache.pt"
    run = distill_student(data, Distillation(STUDENT, loss_config({"ce": 1.0}), FAST, tmp_path / "no-kd",
                                             TeacherSource(tmp_path / "no-such-teacher.pt", cache_path=cache)))
    assert not cache.exists()
    assert set(run.history[0]) >= {"train_ce", "train_total"} and "train_kl" not in run.history[0]
    assert run.history[0]["train_ce"] == pytest.approx(run.history[0]["train_total"])
    payload = torch.load(run.checkpoint, weights_only=False)
    assert payload["teacher_used"] is False and payload["teacher_cache_used"] is False


def test_every_run_records_its_environment(teacher_run):
    env = json.loads((teacher_run.checkpoint.parent / "metrics.json").read_text())["environment"]
    assert env["cpu_isa"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]
    assert env["torch_threads"] == torch.get_num_threads() and env["world_size"] == 1
    assert env["precision"] == "fp32" and env["precision_requested"] == FAST.precision and env["device"] == "cpu"
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["transformers"]


def test_dvc_metrics_hold_only_the_numbers_a_person_compares(teacher_run):
    from medkd.scoring.metrics import headline_metrics
    full = json.loads((teacher_run.checkpoint.parent / "metrics.json").read_text())
    lean = headline_metrics(full)
    assert set(lean) == {"parameters", "dev_avg_f1", "test_avg_f1", "dev_modality_f1", "dev_location_f1",
                         "test_modality_f1", "test_location_f1"}
    assert lean["test_avg_f1"] == round(full["test"]["avg_f1"], 4) and "seconds" in full


def test_probe_gives_each_weighted_terms_gradient_norm():
    from medkd.engine.loop import probe_terms
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    x = torch.tensor([3.0, 1.0, 2.0])
    parts = {"a": (w @ x) ** 2, "b": w.sum()}
    probed = probe_terms(parts, {"a": 2.0, "b": 3.0}, [w])
    # d/dw 2(w·x)² = 4(w·x)x with w·x = 2; d/dw 3Σw = 3·1.
    assert probed["a"] == pytest.approx((8.0, float(torch.linalg.vector_norm(8.0 * x))))
    assert probed["b"] == pytest.approx((-1.5, 3.0 * 3 ** 0.5))
    assert w.grad is None  # the probe leaves the step's own gradients alone


def test_probing_records_loss_terms_and_leaves_training_unchanged(data, teacher_run, tmp_path):
    loss_cfg = loss_config({"ce": 1.0, "kl": 0.5, "mse": 10.0})
    plain = distill_student(data, Distillation(STUDENT, loss_cfg, FAST, tmp_path / "plain",
                                               TeacherSource(teacher_run.checkpoint, cache_path=tmp_path / "cache.pt")))
    probed = distill_student(data, Distillation(STUDENT, loss_cfg,
                                                TrainConfig(**{**FAST.to_dict(), "probe_every": 2}),
                                                tmp_path / "probed",
                                                TeacherSource(teacher_run.checkpoint, cache_path=tmp_path / "cache.pt")))
    assert plain.history[0]["train_total"] == probed.history[0]["train_total"]
    assert plain.dev == probed.dev
    terms = pd.read_csv(tmp_path / "probed" / "loss_terms.csv")
    assert list(dict.fromkeys(terms.term)) == ["ce", "kl", "mse"] and (terms.step % 2 == 0).all()
    assert (terms.grad_norm > 0).all() and not (tmp_path / "plain" / "loss_terms.csv").exists()


@pytest.mark.parametrize("native", [False, True])
def test_precision_resolves_per_machine_and_emulated_bf16_is_refused(monkeypatch, native):
    import medkd.engine.evaluation as train
    import medkd.util.environment
    monkeypatch.setattr(medkd.util.environment, "cpu_runs_bf16_natively", lambda: native)
    cpu = torch.device("cpu")
    assert train.uses_bf16("fp32", cpu) is False and train.uses_bf16("bf16", cpu) is True
    assert train.uses_bf16("auto", cpu) is native  # auto: bf16 only where the hardware has it
    assert train.precision_problem(cpu, "fp32") is None and train.precision_problem(cpu, "auto") is None
    problem = train.precision_problem(cpu, "bf16")
    if native:
        assert problem is None
        assert train.training_device(TrainConfig(device="cpu", precision="auto")) == (cpu, True)
    else:
        assert "no bf16 instructions" in problem and "Set runtime.precision: fp32" in problem
        with pytest.raises(ValueError, match="no bf16 instructions"):
            train.training_device(TrainConfig(device="cpu", precision="bf16"))
        assert train.training_device(TrainConfig(device="cpu", precision="auto")) == (cpu, False)


@pytest.mark.parametrize("machine, avx512_bf16, amx, features, native", [
    ("x86_64", False, False, "fpu avx2", False), ("x86_64", True, False, "", True), ("x86_64", False, True, "", True),
    ("aarch64", False, False, "fp asimd sve", False),  # Arm without the BF16 extension emulates it
    ("aarch64", False, False, "fp asimd bf16 sve", True), ("riscv64", True, True, "bf16", False),  # unknown: fp32
])
def test_cpu_bf16_probe_reads_instruction_probes_and_feature_flags(monkeypatch, machine, avx512_bf16, amx,
                                                                   features, native):
    from medkd.util import environment
    monkeypatch.setattr(environment.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(environment, "cpu_features", lambda: set(features.split()))
    assert environment.cpu_runs_bf16_natively() is native


def test_a_teacher_can_weigh_its_classes_but_not_distil(data, tmp_path):
    balanced = train_teacher(data, TEACHER, FAST, tmp_path / "balanced",
                             loss_cfg=loss_config({"ce": 1.0}, class_weights="balanced"))
    plain = train_teacher(data, TEACHER, FAST, tmp_path / "plain")
    assert balanced.history[0]["train_ce"] != plain.history[0]["train_ce"]  # the weights reach the loss
    with pytest.raises(ValueError, match="learns from labels only"):
        train_teacher(data, TEACHER, FAST, tmp_path / "kd", loss_cfg=loss_config({"ce": 1.0, "kl": 1.0}))
