"""From params.yaml sections to the engine's configs (ModelConfig, LossConfig, TrainConfig).

Each key keeps its params.yaml name all the way down: a distill variant's `model:`, `loss:` and
`train:` sections are those configs' fields, and overrides (Optuna's) are key paths inside a
variant (`loss.weights.kl`, `model.fusion_dim`, `train.lr`).
"""

from __future__ import annotations

from typing import Mapping

from medkd.losses import LossConfig
from medkd.models import ModelConfig
from medkd.params import with_values
from medkd.train import TrainConfig

SECTIONS = ("model", "loss", "train")


def train_config(params: Mapping, *sections: Mapping | None) -> TrainConfig:
    """Seed and runtime from the top of params.yaml, then each section's `train` keys in turn."""
    merged = {"seed": params.get("seed", 42), **(params.get("runtime") or {})}
    for section in sections:
        merged.update(section or {})
    return TrainConfig.from_dict(merged)


def teacher_configs(params: Mapping, dataset: str) -> tuple[ModelConfig, TrainConfig]:
    section = params["teachers"][dataset]
    return ModelConfig.from_dict(section["model"]), train_config(params, section.get("train"))


def student_configs(params: Mapping, student: str, variant: str,
                    overrides: Mapping[str, object] | None = None) -> tuple[ModelConfig, LossConfig, TrainConfig]:
    """(ModelConfig, LossConfig, TrainConfig) of one student trained with one variant's hyperparameters.

    `overrides`: {key path inside the variant: value}, e.g. {"loss.weights.kl": 0.3, "train.epochs": 2}.
    """
    try:
        spec = dict(params["students"][student])
    except KeyError:
        raise KeyError(f"params.yaml: no student {student!r} under `students:`") from None
    distill = params["distill"]
    bad = [path for path in overrides or {} if path.split(".")[0] not in SECTIONS]
    if bad:
        raise KeyError(f"overrides {bad}: a key path must start with one of {list(SECTIONS)}")
    chosen = with_values(distill[variant], overrides or {})
    model = ModelConfig.from_dict({
        "vision": spec["vision"], "text": spec["text"], "pretrained": distill.get("pretrained", True),
        **{k: spec[k] for k in ("vision_weights", "text_weights") if k in spec},
        **chosen.get("model", {}),
    })
    loss = LossConfig.from_dict(chosen.get("loss", {}))
    train = train_config(params, distill.get("train"), chosen.get("train"))
    return model, loss, train
