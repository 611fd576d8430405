"""The configs of params.yaml's sections that describe data, models and training.

`DataConfig` (`data.<name>`), `ModelConfig` (`model:` sections) and `TrainConfig` (`train:`, `seed`,
`runtime:`) are frozen pydantic dataclasses: values are validated and coerced on construction (types,
ranges, registry names), unknown keys are refused. Their `pydantic.ValidationError`s carry the
offending key, which `medkd.config.sections` turns into the key path in params.yaml. Each is the
single place of its defaults. The loss has its own module, a registry of terms
(`medkd.config.loss_terms`). Nothing here imports torch: checking params.yaml needs only the specs
(`medkd.catalog`), not the networks they describe.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Literal, Mapping

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from medkd.catalog.backbone_specs import TrainBlocks, get_spec, list_backbones
from medkd.catalog.dataset_specs import DatasetSpec, check_leakage, get_dataset, list_datasets
from medkd.config.merge import build
from medkd.config.problems import ParamsError, Problem
from medkd.util.registry import did_you_mean, one_of

STRICT_KEYS = ConfigDict(extra="forbid")
DEVICES = ("auto", "cpu", "cuda")


def config_dataclass(cls):
    """`@config_dataclass`: a frozen pydantic dataclass that refuses unknown keys."""
    return dataclass(frozen=True, config=STRICT_KEYS)(cls)


class FromMapping:
    @classmethod
    def from_dict(cls, cfg: Mapping | None):
        return cls(**dict(cfg or {}))

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- data


@config_dataclass
class DataConfig(FromMapping):
    """One entry of `data:` in params.yaml: which registered data set, where, and how to read it.

    `text_fields` / `label_fields` default to the data set's spec.
    """

    name: str  # a registered data set (medkd.catalog.dataset_specs.list_datasets())
    root: str
    image_size: Annotated[int, Field(ge=8)] = 224
    max_length: Annotated[int, Field(ge=4)] = 128  # text tokens
    text_fields: Annotated[tuple[str, ...], Field(min_length=1)] | None = None
    label_fields: tuple[str, str] | None = None
    # Words and phrases replaced by the tokenizer's mask (or unknown) token in every split's text:
    # whole words, any case, a phrase's words separated by any whitespace (see `mask_words`).
    mask_terms: tuple[str, ...] = ()
    # Scarce labels: the share of the training split's cases whose labels runs may see (stratified by label,
    # whole cases; `label_seed` draws them). Training reads the rest's images, never their labels.
    label_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    label_seed: int = 0

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return one_of(name, list_datasets(), "data set")

    @field_validator("mask_terms")
    @classmethod
    def _non_empty_terms(cls, terms: tuple[str, ...]) -> tuple[str, ...]:
        if any(not t.strip() for t in terms):
            raise ValueError("mask_terms must be non-empty words or phrases")
        return terms

    @model_validator(mode="after")
    def _spec_defaults(self):
        spec = get_dataset(self.name)
        object.__setattr__(self, "text_fields", tuple(self.text_fields or spec.text_fields))
        object.__setattr__(self, "label_fields", tuple(self.label_fields or spec.label_fields))
        check_leakage(spec, self.text_fields, self.label_fields)
        return self

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @property
    def spec(self) -> DatasetSpec:
        return get_dataset(self.name)

    @property
    def task_names(self) -> tuple[str, str]:
        return self.spec.tasks


# --------------------------------------------------------------------------- model


@config_dataclass
class ModelConfig(FromMapping):
    """A classifier by registry names plus its fusion settings: `model:` sections of params.yaml.

    The single place where the model's defaults live (the study's teacher fusion).
    """

    vision: str  # a registered vision backbone
    text: str | None = None  # a registered text backbone; None: the model reads no text (modalities [image])
    fusion_dim: Annotated[int, Field(ge=1)] = 384
    fusion_layers: Annotated[int, Field(ge=1)] = 1
    fusion_heads: Annotated[int, Field(ge=1)] = 8
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    pretrained: bool = False
    # What the model reads; default: image and text, or image alone for a model without a text backbone.
    modalities: Annotated[tuple[Literal["image", "text"], ...], Field(min_length=1, max_length=2)] | None = None
    vision_weights: str | None = None  # a local weights file or folder; wins over every other source
    text_weights: str | None = None
    # Partial fine-tuning: how many top blocks of each backbone train (CNN stages, ViT blocks, transformer
    # layers); "all": the whole backbone, 0: a frozen trunk (projections, fusion and heads train).
    # Below the trainable blocks the backbone is frozen and its outputs are cached once (medkd.engine.trunks).
    vision_train_blocks: TrainBlocks = "all"
    text_train_blocks: TrainBlocks = "all"

    @field_validator("vision")
    @classmethod
    def _registered_vision(cls, name: str) -> str:
        return one_of(name, list_backbones("vision"), "vision backbone")

    @field_validator("text")
    @classmethod
    def _registered_text(cls, name: str | None) -> str | None:
        return None if name is None else one_of(name, list_backbones("text"), "text backbone")

    @model_validator(mode="after")
    def _text_for_text(self):
        if self.modalities is None:
            object.__setattr__(self, "modalities", ("image", "text") if self.text is not None else ("image",))
        if self.text is None and "text" in self.modalities:
            raise ValueError("modalities include text, but the model has no text backbone (`text:`)")
        return self

    @model_validator(mode="after")
    def _blocks_exist(self):
        for modality in ("vision", "text"):
            blocks = getattr(self, f"{modality}_train_blocks")
            if blocks == "all" or getattr(self, modality) is None:
                continue
            spec = get_spec(getattr(self, modality), modality)
            if spec.blocks is None:
                raise ValueError(f"{modality}_train_blocks: backbone {spec.name!r} cannot be split into a frozen "
                                 "trunk and trainable blocks; use all")
            if not 0 <= blocks <= spec.blocks:
                raise ValueError(f"{modality}_train_blocks must be 0..{spec.blocks} (the blocks of {spec.name!r}) "
                                 f"or all, got {blocks}")
        return self

    @property
    def frozen_trunks(self) -> bool:
        """Whether some backbone has a frozen part (whose outputs can be cached)."""
        return self.vision_train_blocks != "all" or self.text_train_blocks != "all"

    @field_validator("modalities")
    @classmethod
    def _distinct(cls, modalities: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if modalities is not None and len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be distinct, got {list(modalities)}")
        return modalities

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.fusion_dim % self.fusion_heads:
            raise ValueError(f"fusion_dim={self.fusion_dim} is not divisible by fusion_heads={self.fusion_heads}")
        return self


# --------------------------------------------------------------------------- training


@config_dataclass
class TrainConfig(FromMapping):
    """`train:` sections of params.yaml (plus `seed` and `runtime:`); the single place of their defaults."""

    epochs: Annotated[int, Field(ge=1)] = 3
    batch_size: Annotated[int, Field(ge=1)] = 16
    eval_batch_size: Annotated[int, Field(ge=1)] = 64
    lr: Annotated[float, Field(gt=0.0)] = 4.79e-5
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    warmup_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0  # 0: no clipping
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # fp32 everywhere by default, so training, evaluation, the ONNX export and `medkd predict` compute alike;
    # bf16: autocast, only where the hardware has bf16 instructions; auto: bf16 there, fp32 elsewhere.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    augment: bool = False  # random flip/shift; forces a live teacher when distilling
    # Frozen backbone parts (train_blocks below all) read their outputs from the trunk cache instead of
    # running every step (medkd.engine.trunks); false: they run live, under no_grad, on every batch.
    trunk_cache: bool = True
    channels_last: bool = True  # NHWC images and conv weights: faster CNN kernels on CPU (benchmarks/throughput.py)
    eval_by_length: bool = True  # evaluation batches of similar text length: less padding, same outputs
    fused_optimizer: bool = True  # one fused AdamW kernel instead of per-tensor updates
    train_by_length: bool = False  # training batches drawn from shuffled pools of similar text length
    compile: bool = False  # torch.compile (inductor) of the training model's forward
    # Every N steps: each weighted loss term's gradient norm on the model (one extra backward pass per
    # term on those steps; training itself is unchanged). 0: never. Written to the run's loss_terms.csv.
    probe_every: Annotated[int, Field(ge=0)] = 0
    max_steps_per_epoch: Annotated[int, Field(ge=1)] | None = None  # for smoke runs

    @field_validator("device")
    @classmethod
    def _a_device(cls, device: str) -> str:
        if device in DEVICES or re.fullmatch(r"cuda:\d+", device):
            return device
        raise ValueError(f"unknown device {device!r}{did_you_mean(device, DEVICES)}; expected one of: "
                         f"{', '.join(DEVICES)}, or cuda:N (a GPU's number)")


# --------------------------------------------------------------------------- from params.yaml


def data_config(params: Mapping, dataset: str, root: Path | None = None) -> DataConfig:
    """`data.<dataset>` (its key is the registry name unless `name:` says otherwise), root made absolute."""
    if dataset not in (params.get("data") or {}):
        raise ParamsError([Problem(f"data.{dataset}", "no such data set under `data:`")])
    section = {"name": dataset, **params["data"][dataset]}
    if root is not None and isinstance(section.get("root"), str) and not os.path.isabs(section["root"]):
        section["root"] = str((Path(root) / section["root"]).resolve())
    return build(DataConfig, [(f"data.{dataset}", section)])
