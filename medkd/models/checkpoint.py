"""The checkpoint format: a trained classifier saved with everything needed to rebuild it (its model
config, class names, data settings, widths) and read back without the training code (the export
stages and `medkd predict` use it; no loss, loop or cache comes with it)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from medkd.catalog.dataset_specs import Vocab
from medkd.config.configs import DataConfig, ModelConfig
from medkd.models.classifier import EnsembleClassifier, MultimodalClassifier, build_model
from medkd.util.files import atomic_write
from medkd.util.keys import state_fingerprint
from medkd.util.stored import load

CHECKPOINT_FORMAT = "medkd-checkpoint-1"


def save_checkpoint(path: Path, model: MultimodalClassifier | EnsembleClassifier, model_cfg: ModelConfig,
                    vocab: Vocab, data_config: DataConfig, extra: Mapping | None = None) -> str:
    """`model_cfg`: the model's (an ensemble's: each member's)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fingerprint = state_fingerprint(state)
    ensemble = {"members": len(model.members), "shared_backbones": model.shared_backbones} \
        if isinstance(model, EnsembleClassifier) else {}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model_cfg.to_dict(),
        "vocab": vocab.to_dict(),
        "data": data_config.to_dict(),
        "dims": {"img_dim": model.img_dim, "txt_dim": model.txt_dim, "fusion_dim": model.fusion_dim},
        "fingerprint": fingerprint,
        "state_dict": state,
        **ensemble,
        **(extra or {}),
    }
    atomic_write(path, lambda p: torch.save(payload, p))
    return fingerprint


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[MultimodalClassifier, dict]:
    """Rebuild the model from its stored config (random init, no download) and load its weights."""
    payload = read_checkpoint(path)
    return model_from_checkpoint(payload, device), payload


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's payload; a damaged file is an UnreadableFile naming it."""
    payload = load(path, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a medkd checkpoint (expected format {CHECKPOINT_FORMAT})")
    return payload


def model_from_checkpoint(payload: Mapping, device: torch.device | str = "cpu"
                          ) -> MultimodalClassifier | EnsembleClassifier:
    """The model a checkpoint describes (random init, no download), with its weights."""
    cfg = ModelConfig.from_dict(payload["model_config"])
    vocab = Vocab.from_dict(payload["vocab"])
    if payload.get("members", 1) > 1:
        model = EnsembleClassifier([build_model(cfg, vocab.num_classes, pretrained=False)
                                    for _ in range(payload["members"])], payload["shared_backbones"])
    else:
        model = build_model(cfg, vocab.num_classes, pretrained=False)
    model.load_state_dict(payload["state_dict"])
    return model.to(device)
