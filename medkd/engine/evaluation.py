"""Running a model, as training and evaluation share it: the device and precision a run computes in,
its seeds, a batch's inputs, every output over a loader, and a split's evaluation (metrics and the
per-image prediction frame)."""

from __future__ import annotations

import random
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from medkd.config.configs import TrainConfig
from medkd.data.prepared import PreparedData, make_loader
from medkd.engine.trunks import TrunkCache
from medkd.models.classifier import TASK_LOGITS
from medkd.scoring.metrics import metrics_from_predictions, predictions_frame
from medkd.util import progress
from medkd.util.environment import precision_problem, resolve_device, uses_bf16


def training_device(cfg: TrainConfig) -> tuple[torch.device, bool]:
    """The device a run trains or predicts on and whether it computes in bf16; emulated bf16 is refused."""
    device = resolve_device(cfg.device)
    problem = precision_problem(device, cfg.precision)
    if problem:
        raise ValueError(problem)
    return device, uses_bf16(cfg.precision, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)



def memory_format(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def batch_inputs(batch: Mapping[str, torch.Tensor], role: str, device: torch.device, channels_last: bool = False):
    """(pixels, token ids, attention mask) of `role`; the last two None where the role reads no text."""
    pixels = batch["pixel_values"].to(device, non_blocking=True)
    ids, mask = batch.get(f"input_ids_{role}"), batch.get(f"attention_mask_{role}")
    return (
        pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels,
        ids.to(device, non_blocking=True) if ids is not None else None,
        mask.to(device, non_blocking=True) if mask is not None else None,
    )



@torch.inference_mode()
def model_outputs(model: nn.Module, loader, device: torch.device, role: str, bf16: bool,
                  desc: str = "predict", channels_last: bool = False, trunks: TrunkCache | None = None,
            split: str | None = None) -> dict[str, torch.Tensor]:
    """Model outputs over a loader, on the CPU in float32, rows in `index` order.

    `trunks`/`split`: the model's frozen trunk outputs for the loader's split, read instead of computed.
    """
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    for number, batch in enumerate(tqdm(loader, desc=desc, leave=False), 1):
        progress.update(f"{desc}: batch {number}/{len(loader)}")
        extra = trunks.inputs(split, batch, device) if trunks is not None else {}
        with autocast(device, bf16):
            out = model(*batch_inputs(batch, role, device, channels_last), **extra)
        out["index"] = batch["index"]
        for k, v in out.items():
            chunks.setdefault(k, []).append(v.detach().float().cpu() if v.is_floating_point() else v.cpu())
    outputs = {k: torch.cat(v) for k, v in chunks.items()}
    order = outputs["index"].argsort()  # the split's order, whatever order the loader batched in
    return {k: v[order] for k, v in outputs.items()}


def evaluate(model: nn.Module, data: PreparedData, split: str, tokenizer, role: str,
             cfg: TrainConfig, device: torch.device, bf16: bool = False,
             trunks: TrunkCache | None = None) -> tuple[dict, pd.DataFrame]:
    loader = make_loader(data.dataset(split, {role: tokenizer}), cfg.eval_batch_size, shuffle=False,
                         by_length=cfg.eval_by_length)
    outputs = model_outputs(model, loader, device, role, bf16, desc=f"eval {split}",
                            channels_last=cfg.channels_last, trunks=trunks, split=split)
    image_ids = [r.image_id for r in data.records[split]]
    frame = predictions_frame(outputs["index"], [outputs[k] for k in TASK_LOGITS], image_ids, data.labels[split],
                              data.vocab)
    return metrics_from_predictions(frame, data.vocab), frame

