"""What a teacher with a lead and the positive controls are built from: an ensemble teacher at its own image
size, scarce labels, a student without text, smoothed and partly unlabelled cross-entropy, fidelity."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, loss_config, medpix_data
from scipy.special import rel_entr

from medkd.catalog.dataset_specs import UNLABELLED, Record, labelled_cases
from medkd.config.configs import ModelConfig, TrainConfig
from medkd.config.schema import check_params
from medkd.data.prepared import PreparedData
from medkd.deploy import onnx_export as export
from medkd.deploy.predictor import load_predictor
from medkd.engine.ensemble import train_teacher_ensemble
from medkd.engine.loop import Distillation, TeacherSource, distill_student, training_set
from medkd.engine.losses import TaskCrossEntropy
from medkd.engine.teacher_cache import load_or_build_teacher_cache
from medkd.models.backbones import build_tokenizer
from medkd.models.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from medkd.models.classifier import TASK_LOGITS, EnsembleClassifier, build_model
from medkd.scoring.metrics import fidelity

FROZEN = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=16, fusion_heads=2, dropout=0.1,
                     vision_train_blocks=0, text_train_blocks=0)
FAST = TrainConfig(epochs=1, batch_size=8, eval_batch_size=16, lr=1e-3, seed=7, precision="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return medpix_data(tmp_path_factory.mktemp("medpix"), sizes=(32, 12, 12), max_length=32)


# --------------------------------------------------------------------------- cross-entropy


def test_smoothed_weighted_cross_entropy_skips_unlabelled_samples():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [1.5, 1.0, -2.0], [-0.5, 2.5, 0.0]])
    target = torch.tensor([0, UNLABELLED, 2, 1])
    weights = torch.tensor([0.5, 1.5, 2.0])
    eps, k = 0.1, 3
    expected, labelled = 0.0, 0
    for row, y in zip(logits, target.tolist()):
        if y == UNLABELLED:
            continue
        q = np.full(k, eps / k)
        q[y] += 1 - eps
        log_p = row.numpy() - np.log(np.exp(row.numpy()).sum())
        expected += weights[y].item() * -(q * log_p).sum()
        labelled += 1
    expected /= labelled
    two_tasks = {TASK_LOGITS[0]: logits, TASK_LOGITS[1]: logits}
    loss = TaskCrossEntropy((weights, weights), label_smoothing=eps)
    got = loss(two_tasks, None, torch.stack([target, target], dim=1))
    assert got.item() == pytest.approx(2 * expected, rel=1e-6)
    # All labelled, no smoothing, no weights: torch's own mean cross-entropy, unchanged.
    full = torch.tensor([0, 1, 2, 1])
    plain = TaskCrossEntropy()(two_tasks, None, torch.stack([full, full], dim=1))
    assert plain.item() == pytest.approx(2 * F.cross_entropy(logits, full).item(), rel=1e-6)


def test_a_batch_without_labels_teaches_nothing_but_keeps_the_graph():
    logits = torch.randn(3, 4, requires_grad=True)
    none = torch.full((3, 2), UNLABELLED)
    loss = TaskCrossEntropy()({TASK_LOGITS[0]: logits, TASK_LOGITS[1]: logits}, None, none)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------- scarce labels


def _records(n_cases=60, images_per_case=(1, 2, 3)):
    """Cases of 1-3 images, every image of a case sharing its label; 6 joint labels."""
    records, rng = [], np.random.default_rng(0)
    for case in range(n_cases):
        label = (f"t{case % 2}", f"l{case % 3}")
        for image in range(int(rng.choice(images_per_case))):
            records.append(Record(f"MPX{case}_synpic{image}", Path("x.png"), "text", label))
    return records


def test_labelled_cases_are_whole_stratified_and_drawn_by_their_seed():
    records = _records()
    case_of = lambda r: r.image_id.split("_")[0]  # noqa: E731
    keep = labelled_cases(records, 0.25, seed=3, case_of=case_of)
    by_case = pd.DataFrame({"case": [case_of(r) for r in records], "keep": keep,
                            "label": [r.labels for r in records]})
    assert by_case.groupby("case").keep.nunique().max() == 1  # no case half labelled
    per_label = by_case.groupby("label").keep.agg(["sum", "size"])
    assert (per_label["sum"] >= 1).all()  # every joint label is seen
    # Each label reaches its share, overshooting by less than one case (at most 3 images).
    assert ((per_label["sum"] >= 0.25 * per_label["size"]) & (per_label["sum"] < 0.25 * per_label["size"] + 3)).all()
    assert np.array_equal(keep, labelled_cases(records, 0.25, seed=3, case_of=case_of))
    assert not np.array_equal(keep, labelled_cases(records, 0.25, seed=4, case_of=case_of))
    assert labelled_cases(records, 1.0, seed=3, case_of=case_of).all()


def test_scarce_data_hides_training_labels_and_the_control_trains_on_the_labelled_ones(data):
    scarce = PreparedData.load(dataclasses.replace(data.config, label_fraction=0.3, label_seed=1))
    hidden = (scarce.labels["train"] == UNLABELLED).all(dim=1)
    assert 0 < int((~hidden).sum()) < len(hidden)
    assert torch.equal(scarce.labels["train"][~hidden], data.labels["train"][~hidden])  # the labels it keeps
    assert all(bool((scarce.labels[s] != UNLABELLED).all()) for s in ("dev", "test"))
    assert scarce.labelled_train() == torch.nonzero(~hidden).flatten().tolist()
    tokenizers = {"student": build_tokenizer("tiny-bert")}
    alone = training_set(scarce, tokenizers, FAST, reads_teacher=False)
    distilled = training_set(scarce, tokenizers, FAST, reads_teacher=True)
    assert len(alone) == int((~hidden).sum()) and len(distilled) == len(hidden)
    drawn = [alone[i] for i in range(len(alone))]  # items are sample indices
    assert sorted(int(i) for i in drawn) == scarce.labelled_train()


# --------------------------------------------------------------------------- the ensemble teacher


def _frozen_members(n=2):
    members = []
    for seed in range(n):
        torch.manual_seed(0)  # the same backbones (the pretrained ones, in the study)
        model = build_model(FROZEN, (2, 5))
        torch.manual_seed(100 + seed)  # each member its own fusion and heads
        for module in (model.img_proj, model.txt_proj, model.fusion, model.head_modality, model.head_location):
            for p in module.parameters():
                torch.nn.init.normal_(p, std=0.2)
        members.append(model.eval())
    return members


@pytest.mark.parametrize("shared", [True, False])
def test_ensemble_averages_its_members_logits_and_sets_their_fused_vectors_side_by_side(tiny_batch, shared):
    members = _frozen_members() if shared else [build_model(dataclasses.replace(FROZEN, vision_train_blocks="all",
                                                                                text_train_blocks="all"), (2, 5)).eval()
                                                 for _ in range(2)]
    inputs = (tiny_batch["pixel_values"], tiny_batch["input_ids"], tiny_batch["attention_mask"])
    with torch.no_grad():
        alone = [m(*inputs) for m in members]
        ensemble = EnsembleClassifier(copy.deepcopy(members)).eval()
        together = ensemble(*inputs)
    assert ensemble.shared_backbones is shared
    for key in TASK_LOGITS:
        assert torch.allclose(together[key], (alone[0][key] + alone[1][key]) / 2, atol=1e-6)
    assert torch.allclose(together["fused"], torch.cat([alone[0]["fused"], alone[1]["fused"]], dim=1), atol=1e-6)
    assert ensemble.fusion_dim == 2 * members[0].fusion_dim


def test_an_ensemble_checkpoint_keeps_shared_backbones_once(tiny_batch, data, tmp_path):
    ensemble = EnsembleClassifier(_frozen_members(3)).eval()
    save_checkpoint(tmp_path / "teacher.pt", ensemble, FROZEN, data.vocab, data.config)
    payload = read_checkpoint(tmp_path / "teacher.pt")
    keys = payload["state_dict"].keys()
    assert any(k.startswith("members.0.vision.") for k in keys)
    assert not any(k.startswith(("members.1.vision.", "members.2.text.")) for k in keys)
    assert payload["members"] == 3 and payload["dims"]["fusion_dim"] == 3 * FROZEN.fusion_dim
    rebuilt = model_from_checkpoint(payload).eval()
    inputs = (tiny_batch["pixel_values"], tiny_batch["input_ids"], tiny_batch["attention_mask"])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ensemble(*inputs).values(), rebuilt(*inputs).values()))


def _probabilities(frame: pd.DataFrame, task: str) -> np.ndarray:
    return frame[sorted(c for c in frame.columns if c.startswith(f"{task}_prob_"))].to_numpy()


def test_an_ensemble_teacher_at_its_own_image_size_teaches_a_student_at_its_own(data, tmp_path):
    teacher_data = data.at_image_size(40)
    assert teacher_data.images("train").shape[-1] == 40 and data.images("train").shape[-1] == 32
    result = train_teacher_ensemble(teacher_data, FROZEN, FAST, [1, 2], tmp_path / "teacher", tmp_path / "teacher.pt",
                                    trunk_dir=tmp_path / "trunks")
    for seed in (1, 2):
        assert (tmp_path / "teacher" / f"member-{seed}" / "predictions_dev.csv").exists()
    # The ensemble's probabilities: the members' geometric mean, renormalised (their logits averaged).
    ensemble = pd.read_csv(tmp_path / "teacher" / "predictions_dev.csv")
    members = [pd.read_csv(tmp_path / "teacher" / f"member-{s}" / "predictions_dev.csv") for s in (1, 2)]
    for task in data.vocab.tasks:
        geometric = np.sqrt(_probabilities(members[0], task) * _probabilities(members[1], task))
        assert np.allclose(_probabilities(ensemble, task), geometric / geometric.sum(1, keepdims=True), atol=1e-5)
    payload = read_checkpoint(result.checkpoint)
    assert payload["data"]["image_size"] == 40 and payload["member_seeds"] == [1, 2]
    # A student at 32 px reads the teacher cache the teacher made of its own 40 px images.
    cache = load_or_build_teacher_cache(result.checkpoint, data, FAST, tmp_path / "cache.pt",
                                        trunk_dir=tmp_path / "trunks")
    teacher = model_from_checkpoint(payload).eval()
    batch = teacher_data.dataset("train", {"teacher": build_tokenizer("tiny-bert")}).collate([0, 1, 2])
    with torch.no_grad():
        live = teacher(batch["pixel_values"], batch["input_ids_teacher"], batch["attention_mask_teacher"])
    assert torch.allclose(cache["outputs"]["logits_modality"][:3], live["logits_modality"], atol=1e-5)
    student = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=8, fusion_heads=2)
    run = Distillation(student, loss_config({"ce": 1.0, "kl": 1.0}), FAST, tmp_path / "student",
                       TeacherSource(result.checkpoint, cache_path=tmp_path / "cache.pt", rebuild_stale=False))
    assert distill_student(data, run).dev["avg_f1"] >= 0
    live_run = dataclasses.replace(run, train=dataclasses.replace(FAST, augment=True, trunk_cache=False),
                                   teacher=TeacherSource(result.checkpoint, live=True))
    with pytest.raises(ValueError, match="reads 40 px images and this student 32 px"):
        distill_student(data, live_run)


# --------------------------------------------------------------------------- a student without text


def test_a_student_without_text_exports_pixels_alone_and_predicts_without_a_caption(data, tmp_path):
    cfg = ModelConfig("tiny-vit", None, fusion_dim=8, fusion_heads=2)
    assert tuple(cfg.modalities) == ("image",)
    model = build_model(cfg, data.vocab.num_classes).eval()
    assert model.text is None
    test = data.dataset("test", {})
    folder = export.export_model(model, cfg, None, test.collate(list(range(4))),
                                 export.Preprocessing.of(data.config, data.vocab), tmp_path / "export", int8=False)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "preprocessing.json"]  # no tokenizer
    spec = export.read_preprocessing(folder)
    assert spec["text"] is None and list(spec["inputs"]) == ["pixel_values"]
    predictor = load_predictor(folder)
    eager = export.eager_logits(model, test.collate([0, 1]))
    pixels = test.collate([0, 1])["pixel_values"].numpy()
    got = predictor.logits(pixels, None, None)
    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(got, eager))


# --------------------------------------------------------------------------- fidelity


def test_fidelity_counts_agreement_and_the_teachers_kl_another_way():
    rng = np.random.default_rng(0)

    def frame(ids, probs):
        out = pd.DataFrame({"image_id": ids})
        out["a_pred"] = [f"c{k}" for k in probs.argmax(1)]
        for k in range(probs.shape[1]):
            out[f"a_prob_c{k}"] = probs[:, k]
        return out

    teacher_p, student_p = rng.dirichlet(np.ones(3), 20), rng.dirichlet(np.ones(3), 20)
    ids = [f"img{i}" for i in range(20)]
    teacher = frame(ids, teacher_p)
    student = frame(ids, student_p).iloc[::-1].reset_index(drop=True)  # another order: matched by image id
    found = fidelity({"dev": student, "test": student}, {"dev": teacher, "test": teacher}, ["a"])
    agree = sum(teacher_p[i].argmax() == student_p[i].argmax() for i in range(20)) / 20
    kl = np.mean([rel_entr(teacher_p[i], student_p[i]).sum() for i in range(20)])
    assert found["agree_dev_a"] == pytest.approx(agree) and found["agree_test_a"] == pytest.approx(agree)
    assert found["kl_dev_a"] == pytest.approx(kl, rel=1e-6) and found["kl_dev"] == pytest.approx(kl, rel=1e-6)
    assert fidelity({"dev": teacher}, {"dev": teacher}, ["a"])["kl_dev"] == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------- check-params


def _ci_params():
    return yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())


@pytest.mark.parametrize("change, where, says", [
    (lambda p: p["teachers"]["medpix"].update(image_size=4), "teachers.medpix.image_size", "integer >= 8"),
    (lambda p: p["teachers"]["medpix"].update(seeds=[1, 1]), "teachers.medpix.seeds", "distinct integer seeds"),
    (lambda p: p["teachers"]["medpix"].update(seeds=[]), "teachers.medpix.seeds", "distinct integer seeds"),
    (lambda p: p["data"]["medpix-scarce"].update(label_fraction=0), "data.medpix-scarce.label_fraction", "greater than 0"),
    (lambda p: p["data"]["medpix-scarce"].update(label_fraction=1.5), "data.medpix-scarce.label_fraction", "1"),
    (lambda p: p["students"]["tiny-scarce"].update(variants=["no-kd", "tuned"]), "students.tiny-scarce.variants",
     "crd term"),
    (lambda p: p["students"]["tiny-scarce"].update(export=True), "students.tiny-scarce.export", "its teacher is not"),
    (lambda p: p["students"]["tiny-b"].update(variants=["no-kd", "kl-onyl"]), "students.tiny-b.variants", "kl-only"),
])
def test_check_params_names_each_new_options_key_path(change, where, says):
    params = _ci_params()
    change(params)
    problems = [p for p in check_params(params) if not p.path.endswith(".root")]
    assert any(p.path == where and says in p.message for p in problems), problems


def test_the_scarce_label_teacher_has_the_studys_teacher_recipe():
    """Positive control 2 changes the labels its teacher sees, not how the teacher is made: params.yaml's
    medpix-scarce teacher is the medpix one but for its members and whether it is exported."""
    teachers = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["teachers"]
    recipe = {key: value for key, value in teachers["medpix"].items() if key not in ("seeds", "export")}
    assert {key: value for key, value in teachers["medpix-scarce"].items() if key not in ("seeds", "export")} == recipe
    assert teachers["medpix-scarce"]["export"] is False
