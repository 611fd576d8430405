"""The teacher cache: the frozen teacher's outputs on the training split, computed once (by the teacher
stage) and read by every distillation run, keyed by everything that changes them."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from medkd.config.configs import ModelConfig, TrainConfig
from medkd.data.prepared import PreparedData, make_loader
from medkd.engine.evaluation import memory_format, model_outputs, training_device
from medkd.engine.trunks import TrunkRun, model_trunks
from medkd.models.backbones import build_tokenizer, tokenizer_identity
from medkd.models.checkpoint import model_from_checkpoint, read_checkpoint
from medkd.util.distributed import barrier, is_main
from medkd.util.environment import uses_bf16
from medkd.util.files import atomic_write
from medkd.util.keys import content_key
from medkd.util.stored import UnreadableFile, load, load_or_none

TEACHER_CACHE_KEYS = ("logits_modality", "logits_location", "img_raw", "txt_raw", "fused")


def teacher_cache_key(payload: Mapping, data: PreparedData, tokenizer, bf16: bool) -> str:
    """Everything that changes the teacher's outputs on the training split: its weights and full
    model config, its tokenizer, the data's content (decoded pixels, texts) and preprocessing, precision."""
    return content_key("teacher-cache", payload["fingerprint"], payload["model_config"], tokenizer_identity(tokenizer),
                      data.content_key("train"), f"bf16={bf16}")


def build_teacher_cache(teacher_ckpt: Path, data: PreparedData, cfg: TrainConfig,
                        device: torch.device | None = None, payload: Mapping | None = None, tokenizer=None,
                        trunk_dir: Path | None = None) -> dict:
    """Run the frozen teacher once over the training split (no augmentation).

    `payload`/`tokenizer`: the checkpoint and tokenizer when the caller has them already. A teacher
    with frozen trunks reads them from the trunk cache (`trunk_dir`) when `cfg.trunk_cache` allows.
    """
    device, bf16 = training_device(cfg) if device is None else (device, uses_bf16(cfg.precision, device))
    payload = payload if payload is not None else read_checkpoint(teacher_ckpt)
    data = teacher_view(data, payload)
    teacher = model_from_checkpoint(payload, device)
    tokenizer = tokenizer if tokenizer is not None else model_tokenizer(payload)
    loader = make_loader(data.dataset("train", {"teacher": tokenizer}), cfg.eval_batch_size, shuffle=False,
                         by_length=cfg.eval_by_length)
    teacher = memory_format(teacher, cfg)
    trunks = model_trunks(teacher, data, tokenizer, "teacher", TrunkRun(
        device, bf16, trunk_dir, cfg.eval_batch_size, cfg.channels_last, all_ranks=False)) if cfg.trunk_cache else None
    outputs = model_outputs(teacher, loader, device, "teacher", bf16, desc="teacher cache",
                            channels_last=cfg.channels_last, trunks=trunks, split="train")
    return {
        "key": teacher_cache_key(payload, data, tokenizer, bf16),
        "dims": payload["dims"],
        "outputs": {k: outputs[k].contiguous() for k in TEACHER_CACHE_KEYS},
    }


def load_or_build_teacher_cache(teacher_ckpt: Path, data: PreparedData, cfg: TrainConfig,
                                cache_path: Path, device: torch.device | None = None,
                                rebuild_stale: bool = True, all_ranks: bool = True,
                                trunk_dir: Path | None = None, rebuild_with: str | None = None) -> dict:
    """The cached teacher outputs if `cache_path` matches this teacher and preprocessing, else new ones
    (a damaged file is said and rebuilt).

    With `rebuild_stale=False` a missing, stale or damaged cache is an error naming the file and
    `rebuild_with`, the command that makes it (a pipeline stage must not rewrite another stage's output).
    Data-parallel, with `all_ranks` every rank calls this and rank 0 builds the cache for all;
    `all_ranks=False`: only this process calls it.
    """
    payload = read_checkpoint(teacher_ckpt)
    tokenizer = model_tokenizer(payload)
    device, bf16 = training_device(cfg) if device is None else (device, uses_bf16(cfg.precision, device))
    key = teacher_cache_key(payload, teacher_view(data, payload), tokenizer, bf16)
    cache_path = Path(cache_path)
    if not rebuild_stale:
        return _stage_cache(cache_path, key, rebuild_with or "the teacher stage (dvc repro)")
    cache = _matching_cache(cache_path, key)
    if cache is not None:
        return cache
    if is_main() or not all_ranks:  # data-parallel: rank 0 builds it once, the other ranks read it
        cache = build_teacher_cache(teacher_ckpt, data, cfg, device, payload=payload, tokenizer=tokenizer,
                                    trunk_dir=trunk_dir)
        atomic_write(cache_path, lambda p: torch.save(cache, p))
    if all_ranks:
        barrier()
    return cache if cache is not None else _matching_cache(cache_path, key)


def _matching_cache(cache_path: Path, key: str) -> dict | None:
    cache = load_or_none(cache_path, "teacher cache")
    return cache if isinstance(cache, dict) and cache.get("key") == key else None


def _stage_cache(cache_path: Path, key: str, rebuild_with: str) -> dict:
    """The teacher stage's cache, read as it is: missing, stale or damaged is an error saying what to run."""
    try:
        cache = load(cache_path) if cache_path.exists() else None
    except UnreadableFile as err:
        raise UnreadableFile(f"teacher cache {err}; to restore or rebuild it: {rebuild_with}") from None
    if not isinstance(cache, dict) or cache.get("key") != key:
        raise RuntimeError(f"teacher cache {cache_path} is missing or was made by another teacher or preprocessing; "
                           f"to restore or rebuild it: {rebuild_with}")
    return cache


def model_tokenizer(payload: Mapping):
    """The tokenizer of the model a checkpoint holds."""
    cfg = ModelConfig.from_dict(payload["model_config"])
    return build_tokenizer(cfg.text, cfg.text_weights)


def teacher_view(data: PreparedData, payload: Mapping) -> PreparedData:
    """The data as the teacher of `payload` reads it: at its own image size (`teachers.<dataset>.image_size`)."""
    return data.at_image_size(payload["data"]["image_size"])
