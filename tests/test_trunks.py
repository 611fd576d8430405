"""Partial fine-tuning and the trunk cache: the cut computes the same function, a run trained from
cached trunk outputs is the run with the frozen part computed live, and no stale cache is ever read."""

import copy
import dataclasses

import pytest
import torch
from conftest import medpix_data
from transformers import BertTokenizer

import medkd.engine.trunks as trunks
from medkd.catalog.backbone_specs import BACKBONES, BackboneSpec, list_backbones, register_backbone, tiny_vocab
from medkd.catalog.synthetic import make_synthetic_medpix
from medkd.config.configs import TrainConfig
from medkd.config.loss_terms import LossConfig
from medkd.data.prepared import DataConfig, PreparedData, make_loader
from medkd.engine.loop import Distillation, TeacherSource, distill_student, train_teacher
from medkd.engine.losses import CombinedLoss, LossContext
from medkd.engine.teacher_cache import build_teacher_cache
from medkd.models.backbones import BackboneSplitError, build_backbone, build_tokenizer
from medkd.models.classifier import ModelConfig, build_model

TINY_TEXT = {"vocab_size": len(tiny_vocab()), "max_position_embeddings": 130}
register_backbone(BackboneSpec("tiny-mpnet", "text", "hf-text", 32, "mpnet", pooling="mean", blocks=2, arch_kwargs={
    **TINY_TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}))
register_backbone(BackboneSpec("tiny-distilbert", "text", "hf-text", 32, "distilbert", blocks=2, arch_kwargs={
    **TINY_TEXT, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}))

# A frozen lower block, a trainable top block (hidden states cached), and a frozen whole backbone
# (pooled vectors cached), on both sides of the distillation.
TEACHER = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=24, fusion_heads=2, dropout=0.1,
                      vision_train_blocks=1, text_train_blocks=0)
STUDENT = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=16, fusion_layers=2, fusion_heads=2, dropout=0.2,
                      vision_train_blocks=0, text_train_blocks=1)
FAST = TrainConfig(epochs=2, batch_size=8, eval_batch_size=16, lr=1e-3, seed=7, precision="fp32")
LIVE = TrainConfig(**{**FAST.to_dict(), "trunk_cache": False})
LOSS = LossConfig.from_dict({"ce": {"weight": 1.0}, "kl": {"weight": 0.5}, "mse": {"weight": 2.0},
                             "crd": {"weight": 0.5, "nce_k": 8}})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return medpix_data(tmp_path_factory.mktemp("medpix"), sizes=(32, 12, 12), max_length=32)


@pytest.fixture(autouse=True)
def _empty_memory(monkeypatch):
    monkeypatch.setattr(trunks, "_memory", type(trunks._memory)())


# --------------------------------------------------------------------------- the cut


def _inputs(backbone):
    torch.manual_seed(1)
    if backbone.__class__.__name__ == "VisionBackbone":
        return (torch.rand(3, 3, 32, 32),)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return torch.randint(5, len(tiny_vocab()), (3, 12)), mask


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-bert", "tiny-mpnet", "tiny-distilbert", "efficientnet-lite0",
                                  "mobilenetv2"])
def test_top_of_trunk_is_the_whole_backbone_at_every_depth(name):
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    inputs = _inputs(backbone)
    with torch.no_grad():
        whole = backbone(*inputs)
        for blocks in range(BACKBONES[name].blocks + 1):
            backbone.set_train_blocks(blocks)
            trunk = backbone.trunk(*inputs)
            top = backbone.top(trunk, *inputs[1:]) if len(inputs) == 2 else backbone.top(trunk)
            torch.testing.assert_close(top, whole, rtol=0, atol=1e-5, msg=f"{name}, {blocks} top blocks")
            assert (trunk.dim() == 2) == (blocks == 0)  # nothing trains: the trunk ends in the pooled vector


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_declares_the_blocks_its_cut_has(name):
    with torch.device("meta"):
        backbone = build_backbone(name)
    assert len(backbone.cut().blocks) == BACKBONES[name].blocks


def test_frozen_part_has_no_gradient_and_stays_in_eval_mode():
    torch.manual_seed(0)
    backbone = build_backbone("mobilenetv2").set_train_blocks(2)
    cut = backbone.cut()
    top = {id(p) for module in (*cut.blocks[-2:], *cut.head_modules) for p in module.parameters()}
    assert {id(p) for p in backbone.parameters() if p.requires_grad} == top and top
    backbone.train()
    features = backbone.body.features  # stem, 17 inverted residuals (7 stages), head conv
    assert not features[0].training and not features[1].training  # BatchNorm statistics frozen
    assert features[14].training and features[17].training and features[18].training  # the top 2 stages, the head
    backbone(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in cut.blocks[0].parameters())
    assert backbone.set_train_blocks("all").body.features[0].training  # whole again
    assert all(p.requires_grad for p in backbone.parameters())


def test_a_backbone_that_cannot_be_cut_and_impossible_depths_are_explained():
    spec = dataclasses.replace(BACKBONES["tiny-vit"], name="tiny-convnext-like")
    backbone = build_backbone("tiny-vit")
    backbone.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    backbone.name = spec.name
    with pytest.raises(BackboneSplitError, match="'tiny-convnext-like' cannot be split.*train_blocks to all"):
        backbone.set_train_blocks(0)
    with pytest.raises(BackboneSplitError, match="has 7 blocks: train_blocks must be 0..7"):
        build_backbone("mobilenetv2").set_train_blocks(8)
    with pytest.raises(ValueError, match="text_train_blocks must be 0..6 .*'minilm'"):
        ModelConfig("mobilenetv2", "minilm", text_train_blocks=7)


# --------------------------------------------------------------------------- exactness


def _step(model, loss_fn, batch, teacher_out, cached: trunks.TrunkCache | None):
    extra = cached.inputs("train", batch, torch.device("cpu")) if cached else {}
    inputs = (batch["pixel_values"], batch["input_ids_student"], batch["attention_mask_student"])
    out = model(*inputs, **extra)
    parts = loss_fn(out, teacher_out, batch["labels"], batch["index"])
    model.zero_grad(set_to_none=True)
    parts["total"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, parts, grads


def test_one_step_from_the_cache_equals_the_live_step(data, tmp_path):
    """Logits and every output, each loss term (CRD's memory included) and every gradient, with the
    teacher's outputs from the teacher cache, for a vision trunk cut at its top block and a text trunk
    cut to the pooled vector (and the other way round)."""
    teacher_run = train_teacher(data, TEACHER, TrainConfig(**{**FAST.to_dict(), "epochs": 1}), tmp_path / "teacher",
                                trunk_dir=tmp_path / "trunks")
    teacher_cache = build_teacher_cache(teacher_run.checkpoint, data, FAST, trunk_dir=tmp_path / "trunks")
    tokenizer = build_tokenizer("tiny-bert")
    for cfg in (STUDENT, TEACHER):
        torch.manual_seed(3)
        live_model = build_model(cfg, data.vocab.num_classes).train()
        cached_model = copy.deepcopy(live_model)
        loss_fn = CombinedLoss.from_config(LOSS, LossContext(cfg.fusion_dim, teacher_cache["dims"], n_data=32,
                                                             joint_labels=data.joint_train_labels(), seed=7,
                                                             train_labels=data.labels["train"],
                                                             num_classes=data.vocab.num_classes))
        cached_loss = copy.deepcopy(loss_fn)
        cache = trunks.model_trunks(cached_model, data, tokenizer, "student",
                                    trunks.TrunkRun(torch.device("cpu"), False, tmp_path / "trunks"))
        assert cache.vision is not None and cache.text is not None
        batch = next(iter(make_loader(data.dataset("train", {"student": tokenizer}), 8, shuffle=True, seed=5)))
        teacher_out = {k: v[batch["index"]] for k, v in teacher_cache["outputs"].items()}
        torch.manual_seed(11)  # the same dropout masks in both
        live = _step(live_model, loss_fn, batch, teacher_out, None)
        torch.manual_seed(11)
        cached = _step(cached_model, cached_loss, batch, teacher_out, cache)
        for key in live[0]:
            torch.testing.assert_close(cached[0][key], live[0][key], rtol=0, atol=1e-5, msg=key)
        for term in ("ce", "kl", "mse", "crd", "total"):
            torch.testing.assert_close(cached[1][term], live[1][term], rtol=0, atol=1e-5, msg=term)
        assert live[2].keys() == cached[2].keys() and len(live[2]) < len(list(live_model.parameters()))
        for name in live[2]:
            torch.testing.assert_close(cached[2][name], live[2][name], rtol=1e-5, atol=1e-6, msg=name)
        for key, value in loss_fn.state_dict().items():
            torch.testing.assert_close(cached_loss.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def teacher_runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    cached = train_teacher(data, TEACHER, FAST, root / "cached", trunk_dir=root / "trunks")
    live = train_teacher(data, TEACHER, LIVE, root / "live", trunk_dir=root / "trunks-unused")
    return cached, live, root


def _assert_same_runs(a, b):
    for row_a, row_b in zip(a.history, b.history, strict=True):
        for key, value in row_a.items():
            if key.startswith("train_") and key not in ("train_seconds", "train_samples"):
                assert row_b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert row_b["dev_avg_f1"] == pytest.approx(row_a["dev_avg_f1"], abs=1e-9)
    assert b.test["avg_f1"] == pytest.approx(a.test["avg_f1"], abs=1e-9)
    state_a = torch.load(a.checkpoint, weights_only=False)["state_dict"]
    state_b = torch.load(b.checkpoint, weights_only=False)["state_dict"]
    for name, value in state_a.items():
        torch.testing.assert_close(state_b[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_a_teacher_trained_from_the_cache_is_the_live_run(teacher_runs):
    cached, live, root = teacher_runs
    _assert_same_runs(cached, live)
    assert len(list((root / "trunks").glob("*.pt"))) == 2 and not (root / "trunks-unused").exists()


def test_a_student_distilled_from_the_cache_is_the_live_run(teacher_runs, data, tmp_path, monkeypatch):
    teacher, _, root = teacher_runs
    source = TeacherSource(teacher.checkpoint, cache_path=tmp_path / "t.pt")
    cached = distill_student(data, Distillation(STUDENT, LOSS, FAST, tmp_path / "cached", source,
                                                trunk_dir=root / "trunks"))
    live = distill_student(data, Distillation(STUDENT, LOSS, LIVE, tmp_path / "live", source, trunk_dir=root / "unused"))
    _assert_same_runs(cached, live)
    # Another variant (loss, schedule) reads the same trunks from the file: nothing is computed again.
    # (These tiny backbones are random, so another seed has other trunk weights; pretrained ones do not.)
    calls = []
    monkeypatch.setattr(trunks, "_memory", type(trunks._memory)())
    monkeypatch.setattr(trunks, "compute_trunk", lambda *a, **k: calls.append(a) or pytest.fail("recomputed"))
    again = distill_student(data, Distillation(STUDENT, LossConfig.from_dict({"ce": {"weight": 1.0}}),
                                               TrainConfig(**{**FAST.to_dict(), "epochs": 1}), tmp_path / "again",
                                               TeacherSource(teacher.checkpoint), trunk_dir=root / "trunks"))
    assert again.history and calls == []


def test_augmentation_cannot_read_a_cached_vision_trunk(teacher_runs, data, tmp_path):
    augmented = TrainConfig(**{**FAST.to_dict(), "augment": True, "epochs": 1})
    with pytest.raises(trunks.AugmentedTrunkError, match="train.augment.*'tiny-vit'.*trunk_cache: false"):
        train_teacher(data, TEACHER, augmented, tmp_path / "t", trunk_dir=tmp_path / "trunks")
    live = train_teacher(data, TEACHER, TrainConfig(**{**augmented.to_dict(), "trunk_cache": False}), tmp_path / "t2")
    assert live.history


# --------------------------------------------------------------------------- keys


def test_the_trunk_key_changes_with_every_input_one_at_a_time(data, tmp_path):
    tokenizer = build_tokenizer("tiny-bert")

    def keys(cfg=STUDENT, data=data, tokenizer=tokenizer, bf16=False, model=None):
        torch.manual_seed(0)
        model = model or build_model(cfg, data.vocab.num_classes)
        return (trunks.trunk_key(model.vision, data, None, bf16), trunks.trunk_key(model.text, data, tokenizer, bf16))

    base = keys()
    assert keys() == base  # stable

    def reload(**changes):
        root = make_synthetic_medpix(tmp_path / f"copy{len(list(tmp_path.iterdir()))}", sizes=(32, 12, 12),
                                     image_size=32)
        if "edit" in changes:
            changes.pop("edit")(root)
        return PreparedData.load(DataConfig("medpix", str(root), **{"image_size": 32, "max_length": 32, **changes}))

    def new_captions(root):
        path = root / "splitted_dataset" / "descriptions_train.jsonl"
        path.write_text(path.read_text().replace("scan shows", "scan displays"))

    def inverted_image(root):
        from PIL import Image, ImageOps
        path = sorted((root / "images").glob("*.png"))[0]
        ImageOps.invert(Image.open(path).convert("L")).save(path)

    assert keys(data=reload()) == base  # the same content elsewhere
    vision, text = base
    changed = {
        "images": (keys(data=reload(edit=inverted_image)), (False, True)),
        "image size": (keys(data=reload(image_size=24)), (False, True)),
        "texts": (keys(data=reload(edit=new_captions)), (True, False)),
        "max length": (keys(data=reload(max_length=24)), (True, False)),
        "masked words": (keys(data=reload(mask_terms=("MR",))), (True, False)),
        "tokenizer": (keys(tokenizer=BertTokenizer(vocab=tiny_vocab(), do_lower_case=False)), (True, False)),
        "precision": (keys(bf16=True), (False, False)),
        "depth": (keys(cfg=dataclasses.replace(STUDENT, vision_train_blocks=1, text_train_blocks=0)), (False, False)),
    }
    for what, ((new_vision, new_text), (vision_same, text_same)) in changed.items():
        assert (new_vision == vision) is vision_same, what
        assert (new_text == text) is text_same, what
    # The frozen part's weights are the key; the trainable top's are not (a trained model reads the same cache).
    torch.manual_seed(0)
    model = build_model(STUDENT, data.vocab.num_classes)
    with torch.no_grad():
        model.text.cut().blocks[-1].output.dense.bias += 1.0  # the trainable top block
        model.vision.cut().blocks[0].norm1.bias += 1.0  # frozen: vision_train_blocks 0
    assert keys(model=model)[1] == text and keys(model=model)[0] != vision
    with torch.no_grad():
        model.text.cut().blocks[0].output.dense.bias += 1.0  # the text trunk's frozen block
    assert keys(model=model)[1] != text


def test_a_stored_trunk_of_another_key_is_never_read(data, tmp_path):
    torch.manual_seed(0)
    model = build_model(STUDENT, data.vocab.num_classes)
    tokenizer = build_tokenizer("tiny-bert")
    first = trunks.load_or_build(model.text, data, tokenizer, torch.device("cpu"), False, tmp_path)
    (path,) = tmp_path.glob("*.pt")
    stored = torch.load(path, weights_only=True)
    stored["key"] = "another"  # e.g. the same file name left by other inputs
    torch.save(stored, path)
    trunks._memory.clear()
    assert trunks._read(path, trunks.trunk_key(model.text, data, tokenizer, False)) is None
    again = trunks.load_or_build(model.text, data, tokenizer, torch.device("cpu"), False, tmp_path)
    torch.testing.assert_close(again["dev"], first["dev"])
    assert torch.load(path, weights_only=True)["key"] != "another"  # recomputed and rewritten
