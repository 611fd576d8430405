import json

import pandas as pd
import pytest
import torch

from medkd.backbones import build_tokenizer
from medkd.data import DataConfig, PreparedData, make_loader
from medkd.losses import LossConfig
from medkd.metrics import metrics_from_predictions
from medkd.models import ModelConfig
from medkd.synthetic import make_synthetic_medpix, make_synthetic_wound
from medkd.train import (
    TrainConfig, build_teacher_cache, distill_student, load_checkpoint, load_or_build_teacher_cache, predict,
    train_teacher,
)

TEACHER = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=24, fusion_heads=2, dropout=0.1)
STUDENT = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=16, fusion_layers=2, fusion_heads=2, dropout=0.2)
FAST = TrainConfig(epochs=1, batch_size=8, eval_batch_size=16, lr=1e-3, seed=7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_synthetic_medpix(tmp_path_factory.mktemp("medpix"), sizes=(32, 12, 12), image_size=32)
    return PreparedData.load(DataConfig("medpix", str(root), image_size=32, max_length=32))


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
    out = predict(model, loader, torch.device("cpu"), "teacher", bf16=FAST.bf16)
    frame = pd.read_csv(teacher_run.checkpoint.parent / "predictions_dev.csv")
    pred = [data.vocab.classes[0][i] for i in out["logits_modality"].argmax(1)]
    assert pred == frame["modality_pred"].tolist()


@pytest.mark.parametrize("bf16", [False, True])
def test_cached_teacher_outputs_equal_live_ones(teacher_run, data, bf16):
    cfg = TrainConfig(**{**FAST.to_dict(), "bf16": bf16})
    cache = build_teacher_cache(teacher_run.checkpoint, data, cfg)
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
    import medkd.train as train_module
    real_build = train_module.build_teacher_cache
    monkeypatch.setattr(train_module, "build_teacher_cache", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    assert load_or_build_teacher_cache(teacher_run.checkpoint, data, FAST, path)["key"] == first["key"]
    assert calls == []  # reused
    resized = PreparedData.load(DataConfig("medpix", data.config.root, image_size=24, max_length=32))
    second = load_or_build_teacher_cache(teacher_run.checkpoint, resized, FAST, path)
    assert calls == [1] and second["key"] != first["key"]
    # Another teacher (one weight changed) is another key.
    model, payload = load_checkpoint(teacher_run.checkpoint)
    payload["state_dict"]["head_modality.bias"] += 1.0
    payload["fingerprint"] = "changed"
    torch.save(payload, tmp_path / "other.pt")
    third = load_or_build_teacher_cache(tmp_path / "other.pt", data, FAST, path)
    assert third["key"] not in (first["key"], second["key"])


@pytest.mark.parametrize("use_cache", [True, False])
def test_distillation_leaves_teacher_bit_identical(teacher_run, data, tmp_path, use_cache):
    before = torch.load(teacher_run.checkpoint, weights_only=False)["state_dict"]
    result = distill_student(data, teacher_run.checkpoint, STUDENT, LossConfig(nce_k=8), FAST, tmp_path,
                             cache_path=tmp_path / "cache.pt", use_cache=use_cache)
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
    import medkd.train as train_module
    seen = {}
    real_load = train_module.load_checkpoint

    def spy(path, device="cpu"):
        model, payload = real_load(path, device)
        seen["teacher"] = model
        return model, payload

    monkeypatch.setattr(train_module, "load_checkpoint", spy)
    distill_student(data, teacher_run.checkpoint, STUDENT, LossConfig(nce_k=8), FAST, tmp_path, use_cache=False)
    teacher = seen["teacher"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_same_seed_same_metrics(teacher_run, data, tmp_path):
    runs = [distill_student(data, teacher_run.checkpoint, STUDENT, LossConfig(nce_k=8), FAST, tmp_path / str(i),
                            cache_path=tmp_path / "cache.pt") for i in range(2)]
    assert runs[0].history[0]["train_total"] == runs[1].history[0]["train_total"]
    assert runs[0].test == runs[1].test
    other = distill_student(data, teacher_run.checkpoint, STUDENT, LossConfig(nce_k=8),
                            TrainConfig(**{**FAST.to_dict(), "seed": 8}), tmp_path / "other",
                            cache_path=tmp_path / "cache.pt")
    assert other.history[0]["train_total"] != runs[0].history[0]["train_total"]


def test_augmentation_runs_the_teacher_live(teacher_run, data, tmp_path):
    cfg = TrainConfig(**{**FAST.to_dict(), "augment": True})
    with pytest.raises(ValueError, match="cannot serve randomly augmented"):
        distill_student(data, teacher_run.checkpoint, STUDENT, LossConfig(), cfg, tmp_path, use_cache=True)
    result = distill_student(data, teacher_run.checkpoint, STUDENT, LossConfig(nce_k=8), cfg, tmp_path)
    assert not (tmp_path / "teacher_cache.pt").exists() and result.best_epoch == 1


def test_wound_layout_end_to_end(tmp_path):
    root = make_synthetic_wound(tmp_path / "wound", sizes=(24, 8, 8), image_size=32)
    data = PreparedData.load(DataConfig("wound", str(root), image_size=32, max_length=32))
    teacher = train_teacher(data, TEACHER, FAST, tmp_path / "t")
    student = distill_student(data, teacher.checkpoint, STUDENT, LossConfig(nce_k=8), FAST, tmp_path / "s")
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["tasks"] == ["type", "severity"] and set(metrics["test"]) >= {"type", "severity", "avg_f1"}
    assert student.test["avg_f1"] == metrics["test"]["avg_f1"]


def test_fingerprint_covers_scalar_and_integer_buffers():
    from medkd.train import state_fingerprint
    a = {"w": torch.ones(2, 2), "bn.num_batches_tracked": torch.tensor(3)}
    b = {"w": torch.ones(2, 2), "bn.num_batches_tracked": torch.tensor(4)}
    assert state_fingerprint(a) == state_fingerprint(dict(a)) != state_fingerprint(b)
