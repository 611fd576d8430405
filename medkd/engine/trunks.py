"""The trunk cache: what a frozen backbone part computes, computed once.

With partial fine-tuning (`vision_train_blocks` / `text_train_blocks` below `all`) the lower part of
a backbone never changes during training, so its outputs for every sample of every split are
computed once, stored, and read by every run that shares them: the teacher, every student variant
and seed, every Optuna trial and the retrain. A run then trains only the top blocks, projections,
fusion and heads, on the stored trunk outputs, and evaluates from them too.

The cache is content-addressed: one file per backbone trunk, named by a key that covers everything
its outputs depend on (`trunk_key`): the backbone and where it is cut, the frozen part's weights,
the split's pixels (vision) or texts, max length, masking and tokenizer (text), and the precision.
A changed input gives another key, so a stale file is never read. Files live in the folder a
caller names (the pipeline's is `.medkd/trunks/`, which DVC never deletes), and are kept in memory
while a process uses them (the last few, `MEMORY_ENTRIES`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from tqdm import tqdm

from medkd.catalog.backbone_specs import cache_dir
from medkd.catalog.dataset_specs import SPLITS
from medkd.data.prepared import PreparedData, make_loader
from medkd.models.backbones import TextBackbone, VisionBackbone, tokenizer_identity
from medkd.util import progress
from medkd.util.distributed import barrier, is_main
from medkd.util.files import atomic_write
from medkd.util.keys import content_key, state_fingerprint
from medkd.util.stored import load_or_none

TRUNK_FORMAT = "medkd-trunk-1"
MEMORY_ENTRIES = 4  # trunks kept in memory per process (the teacher's and a student's two fit)
_memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()


class AugmentedTrunkError(ValueError):
    """Random augmentation changes the pixels every epoch: a cached vision trunk cannot serve it."""


def default_trunk_dir() -> Path:
    """Where library calls keep trunk files when no folder is named (MEDKD_CACHE/trunks)."""
    return cache_dir() / "trunks"


def frozen_state(backbone: VisionBackbone | TextBackbone) -> dict[str, torch.Tensor]:
    """The state (parameters and buffers) of the backbone's frozen part only: what the trunk computes
    with. The trainable top changes during training; a trained checkpoint's trunk is still the same."""
    trainable = {id(sub) for module in getattr(backbone, "_trainable", None) or () for sub in module.modules()}
    prefixes = tuple(f"{name}." for name, module in backbone.named_modules() if id(module) in trainable)
    return {k: v for k, v in backbone.state_dict().items() if not k.startswith(prefixes)}


def trunk_key(backbone: VisionBackbone | TextBackbone, data: PreparedData, tokenizer, bf16: bool) -> str:
    """Everything a frozen trunk's outputs depend on, for every split."""
    if isinstance(backbone, VisionBackbone):
        inputs = [data.images_key(split) for split in SPLITS]
    else:
        inputs = [data.texts_key(split) for split in SPLITS] + [tokenizer_identity(tokenizer)]
    return content_key(TRUNK_FORMAT, backbone.name, type(backbone.body).__name__, backbone.frozen_blocks,
                       state_fingerprint(frozen_state(backbone)), inputs, f"bf16={bf16}")


@torch.inference_mode()
def compute_trunk(backbone: VisionBackbone | TextBackbone, data: PreparedData, split: str, tokenizer,
                  device: torch.device, bf16: bool, batch_size: int = 64) -> torch.Tensor:
    """The trunk's outputs for one split, in record order, float32 on the CPU.

    Text trunks above the pooled vector are (N, max_length, H), zero beyond each text's batch
    length: every later layer and the pooling mask those positions out.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        return _compute(backbone, data, split, tokenizer, device, bf16, batch_size)
    finally:
        backbone.train(was_training)


def _compute(backbone, data, split, tokenizer, device, bf16, batch_size) -> torch.Tensor:
    vision = isinstance(backbone, VisionBackbone)
    dataset = data.dataset(split, {} if vision else {"trunk": tokenizer})
    loader = make_loader(dataset, batch_size, shuffle=False, by_length=not vision)
    out = None
    for number, batch in enumerate(tqdm(loader, desc=f"{backbone.name} trunk {split}", leave=False), 1):
        progress.update(f"trunk pass of {backbone.name}, {split}: batch {number}/{len(loader)}")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if vision:
                value = backbone.trunk(batch["pixel_values"].to(device))
            else:
                value = backbone.trunk(batch["input_ids_trunk"].to(device), batch["attention_mask_trunk"].to(device))
        value = value.float().cpu()
        if out is None:
            shape = (len(dataset), data.config.max_length, *value.shape[2:]) if value.dim() == 3 and not vision \
                else (len(dataset), *value.shape[1:])
            out = torch.zeros(shape)
        if out.dim() == 3 and not vision:
            out[batch["index"], :value.shape[1]] = value
        else:
            out[batch["index"]] = value.contiguous()
    return out


def load_or_build(backbone: VisionBackbone | TextBackbone, data: PreparedData, tokenizer, device: torch.device,
                  bf16: bool, folder: Path, batch_size: int = 64, all_ranks: bool = True) -> dict[str, torch.Tensor]:
    """{split: trunk outputs} from memory, from `folder`, or computed now and stored there.

    Data-parallel, every rank calls this (`all_ranks`): rank 0 computes and writes, the others read.
    """
    key = trunk_key(backbone, data, tokenizer, bf16)
    if key in _memory:
        _memory.move_to_end(key)
        return _memory[key]
    path = trunk_file(folder, backbone.name, backbone.frozen_blocks, key)
    outputs = _read(path, key)
    if outputs is None and (is_main() or not all_ranks):
        started = time.perf_counter()
        outputs = {split: compute_trunk(backbone, data, split, tokenizer, device, bf16, batch_size) for split in SPLITS}
        atomic_write(path, lambda p: torch.save({"key": key, "outputs": outputs}, p))
        frozen = "frozen whole" if backbone.train_blocks == 0 else f"frozen below its top {backbone.train_blocks} blocks"
        print(f"trunk pass: {backbone.name} ({frozen}), {sum(len(o) for o in outputs.values())} samples, "
              f"{time.perf_counter() - started:.0f} s (cached in {path})")
    if all_ranks:
        barrier()
    outputs = outputs if outputs is not None else _read(path, key)
    _memory[key] = outputs
    while len(_memory) > MEMORY_ENTRIES:
        _memory.popitem(last=False)
    return outputs


def trunk_file(folder: Path, backbone: str, frozen_blocks: int | str, key: str) -> Path:
    return Path(folder) / f"{backbone}-frozen{frozen_blocks}-{key[:20]}.pt"


def _read(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The stored outputs when `path` holds this key's; None when it is missing, stale or damaged."""
    stored = load_or_none(path, "trunk cache file")
    return stored["outputs"] if isinstance(stored, dict) and stored.get("key") == key else None


@dataclass
class TrunkCache:
    """A model's cached trunk outputs (None for a backbone trained whole): the model's extra inputs."""

    vision: Mapping[str, torch.Tensor] | None
    text: Mapping[str, torch.Tensor] | None
    role: str  # which tokenized inputs of a batch the text trunk belongs to ("teacher" | "student")
    channels_last: bool = False

    def inputs(self, split: str, batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """`vision_trunk`/`text_trunk` of the batch's samples, cut to the batch's text length."""
        index = batch["index"]
        out = {}
        if self.vision is not None:
            value = self.vision[split][index].to(device, non_blocking=True)
            out["vision_trunk"] = value.contiguous(memory_format=torch.channels_last) \
                if self.channels_last and value.dim() == 4 else value
        if self.text is not None:
            value = self.text[split][index]
            if value.dim() == 3:  # hidden states: the batch trims its padding, so do they
                value = value[:, :batch[f"attention_mask_{self.role}"].shape[1]]
            out["text_trunk"] = value.to(device, non_blocking=True)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in (self.vision, self.text) if part for t in part.values())


@dataclass(frozen=True)
class TrunkRun:
    """How a model's trunks are computed (device, precision, batch size, memory format) and where their
    files live (`folder`; None: `default_trunk_dir()`). Data-parallel, with `all_ranks` every rank calls
    `model_trunks` and rank 0 computes; `all_ranks=False`: only this process calls it."""

    device: torch.device
    bf16: bool
    folder: Path | None = None
    batch_size: int = 64
    channels_last: bool = False
    all_ranks: bool = True


def model_trunks(model, data: PreparedData, tokenizer, role: str, run: TrunkRun,
                 augment: bool = False) -> TrunkCache | None:
    """The trunk cache of a model's frozen backbone parts (None when no backbone has one).

    `augment`: the run's images change every epoch, which no vision trunk cache can serve.
    """
    vision = model.vision if model.vision is not None and model.vision.frozen_blocks is not None else None
    text = model.text if model.text is not None and model.text.frozen_blocks is not None else None
    if vision is None and text is None:
        return None
    if vision is not None and augment:
        raise AugmentedTrunkError(
            f"train.augment changes the images every epoch, so the frozen trunk of {vision.name!r} "
            f"(vision_train_blocks: {vision.train_blocks}) cannot be read from the trunk cache: set "
            "train.trunk_cache: false to run it live on each augmented batch, vision_train_blocks: all, "
            "or augment: false")
    folder = Path(run.folder) if run.folder is not None else default_trunk_dir()
    build = dict(device=run.device, bf16=run.bf16, folder=folder, batch_size=run.batch_size, all_ranks=run.all_ranks)
    return TrunkCache(
        load_or_build(vision, data, None, **build) if vision is not None else None,
        load_or_build(text, data, tokenizer, **build) if text is not None else None,
        role, run.channels_last,
    )
