"""The teacher's baseline: the linear probe picks C on dev alone and its run files say what it predicted."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from medkd.catalog.synthetic import make_synthetic_medpix
from medkd.config.configs import ModelConfig, TrainConfig
from medkd.data.prepared import DataConfig, PreparedData
from medkd.engine.probe import linear_probe, pooled_features, write_probe
from medkd.models.classifier import build_model
from medkd.scoring.metrics import load_run

MODEL = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=16, fusion_heads=2, vision_train_blocks=1, text_train_blocks=1)
CFG = TrainConfig(eval_batch_size=16, precision="fp32")
GRID = (0.001, 0.1, 10.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_synthetic_medpix(tmp_path_factory.mktemp("medpix"), sizes=(40, 16, 16), image_size=32)
    return PreparedData.load(DataConfig("medpix", str(root), image_size=32, max_length=32))


def test_the_probe_chooses_c_on_dev_and_predicts_test_with_it(data, tmp_path):
    # Random-init tiny backbones: the same seed before each build gives the probe's backbones again.
    torch.manual_seed(0)
    result = linear_probe(data, MODEL, CFG, trunk_dir=tmp_path / "trunks", c_grid=GRID)
    torch.manual_seed(0)
    features, _ = pooled_features(data, MODEL, CFG, tmp_path / "trunks")
    scaler = StandardScaler().fit(features["train"])
    labels = {split: data.labels[split].numpy() for split in ("train", "dev", "test")}

    def scores(c: float, split: str) -> tuple[float, list[np.ndarray]]:
        probabilities, f1s = [], []
        for task in range(2):
            clf = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(features["train"]),
                                                               labels["train"][:, task])
            probabilities.append(clf.predict_proba(scaler.transform(features[split])))
            f1s.append(f1_score(labels[split][:, task], clf.predict(scaler.transform(features[split])),
                                average="macro"))
        return float(np.mean(f1s)), probabilities

    dev = {c: scores(c, "dev")[0] for c in GRID}
    assert result.dev_by_c == pytest.approx(dev)
    assert result.c == next(c for c in GRID if dev[c] == max(dev.values()))  # the first best: strongest penalty
    test_f1, test_probabilities = scores(result.c, "test")
    assert result.metrics["test"]["avg_f1"] == pytest.approx(test_f1)
    frame = result.frames["test"]
    for task, probabilities in zip(data.vocab.tasks, test_probabilities):
        columns = [f"{task}_prob_{name}" for name in data.vocab.classes[data.vocab.tasks.index(task)]]
        np.testing.assert_allclose(frame[columns].to_numpy(), probabilities, atol=1e-6)
    assert frame["image_id"].tolist() == [r.image_id for r in data.records["test"]]


def test_the_probe_reads_the_frozen_pretrained_backbones_whatever_depth_the_teacher_trains(data, tmp_path):
    # The probe's features are the whole backbones' pooled outputs, cached like any frozen trunk.
    torch.manual_seed(0)
    features, parameters = pooled_features(data, MODEL, CFG, tmp_path / "trunks")
    assert features["train"].shape[0] == len(data.records["train"])
    assert parameters > 0
    torch.manual_seed(0)
    model = build_model(MODEL, data.vocab.num_classes).eval()
    batch = data.dataset("dev", {}).collate([0])
    with torch.no_grad():
        image = model.vision(batch["pixel_values"])
    np.testing.assert_allclose(features["dev"][0, :image.shape[1]], image[0].numpy(), atol=1e-5)


def test_the_probe_is_written_as_a_run_folder_the_report_reads(data, tmp_path):
    result = linear_probe(data, MODEL, CFG, trunk_dir=tmp_path / "trunks", c_grid=GRID)
    write_probe(result, tmp_path / "probe")
    run = load_run(tmp_path / "probe")
    assert run["test"]["avg_f1"] == pytest.approx(result.metrics["test"]["avg_f1"])
    assert run["metrics"]["C"] == result.c and run["metrics"]["trained_parameters"] > 0


def test_an_empty_grid_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="c_grid is empty"):
        linear_probe(data, MODEL, CFG, trunk_dir=tmp_path, c_grid=())
