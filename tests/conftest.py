import os

# Tests never reach a model hub: any accidental download fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from medkd.backbones import build_tokenizer
from medkd.models import ModelConfig, build_model


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDKD_CACHE", str(tmp_path_factory.getbasetemp() / "medkd-cache"))


@pytest.fixture
def tiny_batch():
    torch.manual_seed(0)
    tokenizer = build_tokenizer("tiny-bert")
    texts = ["ct of the chest shows a mass", "mr of the brain", "axial view of the spine", "pelvis"]
    enc = tokenizer(texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    return {
        "pixel_values": torch.rand(4, 3, 32, 32),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([[0, 0], [1, 1], [0, 2], [1, 3]]),
        "index": torch.tensor([0, 3, 5, 7]),
    }


def tiny_model(fusion_dim=16, fusion_layers=1, heads=2, num_classes=(2, 5), dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=fusion_dim, fusion_layers=fusion_layers,
                      fusion_heads=heads, dropout=dropout)
    return build_model(cfg, num_classes)
