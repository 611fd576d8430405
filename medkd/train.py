"""The training engine: teacher training, distillation (cached or live teacher), evaluation.

One loop (`_fit`) serves both phases; what differs (which model trains, where teacher
outputs come from, the loss) is passed in, nanoGPT-style, not subclassed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from torch import nn
from tqdm import tqdm

from medkd.backbones import build_tokenizer
from medkd.data import SPLITS, TASK_KEYS, PreparedData, Vocab, make_loader
from medkd.losses import CombinedLoss, two_task_ce
from medkd.models import MultimodalClassifier, build_model, count_parameters

CHECKPOINT_FORMAT = "medkd-checkpoint-1"
TEACHER_CACHE_KEYS = ("logits_modality", "logits_location", "img_raw", "txt_raw", "fused")


# --------------------------------------------------------------------------- configs


class _FromDict:
    @classmethod
    def from_dict(cls, cfg: Mapping | None):
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelConfig(_FromDict):
    vision: str
    text: str
    fusion_dim: int = 384
    fusion_layers: int = 1
    fusion_heads: int = 8
    dropout: float = 0.1
    pretrained: bool = False
    vision_weights: str | None = None
    text_weights: str | None = None

    def build(self, num_classes, pretrained: bool | None = None) -> MultimodalClassifier:
        cfg = self.to_dict()
        if pretrained is not None:
            cfg["pretrained"] = pretrained
        return build_model(num_classes=num_classes, **cfg)

    def tokenizer(self):
        return build_tokenizer(self.text, self.text_weights)


@dataclass
class TrainConfig(_FromDict):
    epochs: int = 3
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 4.79e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # autocast; on CPU 1.3-2.4x faster here
    augment: bool = False  # random flip/shift; forces a live teacher when distilling
    max_steps_per_epoch: int | None = None  # for smoke runs


@dataclass
class LossConfig(_FromDict):
    w_ce: float = 1.0
    alpha: float = 0.518
    beta: float = 112.4
    gamma: float = 10.0
    temperature: float = 3.19
    projection: str = "fixed"
    feat_dim: int = 128
    nce_k: int = 1024
    nce_t: float = 0.07
    nce_m: float = 0.5


# --------------------------------------------------------------------------- utilities


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def state_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def batch_inputs(batch: Mapping[str, torch.Tensor], role: str, device: torch.device):
    return (
        batch["pixel_values"].to(device, non_blocking=True),
        batch[f"input_ids_{role}"].to(device, non_blocking=True),
        batch[f"attention_mask_{role}"].to(device, non_blocking=True),
    )


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model: MultimodalClassifier, model_cfg: ModelConfig, vocab: Vocab,
                    data: PreparedData, extra: Mapping | None = None) -> str:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fingerprint = state_fingerprint(state)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model_cfg.to_dict(),
        "vocab": vocab.to_dict(),
        "data": {"name": data.config.name, "image_size": data.config.image_size,
                 "max_length": data.config.max_length, "text_fields": list(data.config.text_fields),
                 "text_column": data.config.text_column},
        "dims": {"img_dim": model.img_dim, "txt_dim": model.txt_dim, "fusion_dim": model.fusion_dim},
        "fingerprint": fingerprint,
        "state_dict": state,
        **(extra or {}),
    }
    atomic_write(path, lambda p: torch.save(payload, p))
    return fingerprint


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[MultimodalClassifier, dict]:
    """Rebuild the model from its stored config (random init, no download) and load its weights."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a medkd checkpoint (expected format {CHECKPOINT_FORMAT})")
    cfg = ModelConfig.from_dict(payload["model_config"])
    vocab = Vocab.from_dict(payload["vocab"])
    model = cfg.build(vocab.num_classes, pretrained=False)
    model.load_state_dict(payload["state_dict"])
    return model.to(device), payload


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, role: str, bf16: bool,
            desc: str = "predict") -> dict[str, torch.Tensor]:
    """Model outputs over a loader, in loader order, on the CPU in float32."""
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc=desc, leave=False):
        with autocast(device, bf16):
            out = model(*batch_inputs(batch, role, device))
        out["index"] = batch["index"]
        for k, v in out.items():
            chunks.setdefault(k, []).append(v.detach().float().cpu() if v.is_floating_point() else v.cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}


def task_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    return {
        "f1_macro": float(f1_score(y_true, y_pred, average="macro")),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "confusion": confusion_matrix(y_true, y_pred, labels=list(range(n_classes))).tolist(),
    }


def predictions_frame(outputs: Mapping[str, torch.Tensor], data: PreparedData, split: str) -> pd.DataFrame:
    """Per-sample predictions: index, image id, true and predicted class, class probabilities."""
    index = outputs["index"].numpy()
    vocab = data.vocab
    frame = {"index": index, "image_id": [data.records[split][i].image_id for i in index]}
    labels = data.labels[split][index].numpy()
    for t, key in enumerate(("logits_modality", "logits_location")):
        task, classes = vocab.tasks[t], vocab.classes[t]
        probs = torch.softmax(outputs[key], dim=1).numpy()
        frame[f"{task}_true"] = [classes[i] for i in labels[:, t]]
        frame[f"{task}_pred"] = [classes[i] for i in probs.argmax(1)]
        for c, name in enumerate(classes):
            frame[f"{task}_prob_{name}"] = probs[:, c]
    return pd.DataFrame(frame)


def metrics_from_predictions(frame: pd.DataFrame, vocab: Vocab) -> dict:
    """The metrics of a predictions file: every reported number can be recomputed from it."""
    result = {}
    for t, task in enumerate(vocab.tasks):
        lookup = {c: i for i, c in enumerate(vocab.classes[t])}
        y_true = frame[f"{task}_true"].map(lookup).to_numpy()
        y_pred = frame[f"{task}_pred"].map(lookup).to_numpy()
        result[task] = task_metrics(y_true, y_pred, len(vocab.classes[t]))
    result["avg_f1"] = float(np.mean([result[t]["f1_macro"] for t in vocab.tasks]))
    result["n"] = int(len(frame))
    return result


def evaluate(model: nn.Module, data: PreparedData, split: str, tokenizer, role: str,
             cfg: TrainConfig, device: torch.device) -> tuple[dict, pd.DataFrame]:
    loader = make_loader(data.dataset(split, {role: tokenizer}), cfg.eval_batch_size, shuffle=False)
    outputs = predict(model, loader, device, role, cfg.bf16, desc=f"eval {split}")
    frame = predictions_frame(outputs, data, split)
    return metrics_from_predictions(frame, data.vocab), frame


# --------------------------------------------------------------------------- teacher cache


def teacher_cache_key(fingerprint: str, data: PreparedData, bf16: bool) -> str:
    cfg = data.config
    ids = "\n".join(r.image_id for r in data.records["train"])
    parts = [fingerprint, cfg.name, str(cfg.image_size), str(cfg.max_length), repr(cfg.text_fields),
             cfg.text_column, hashlib.sha256(ids.encode()).hexdigest(), f"bf16={bf16}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def build_teacher_cache(teacher_ckpt: Path, data: PreparedData, cfg: TrainConfig,
                        device: torch.device | None = None) -> dict:
    """Run the frozen teacher once over the training split (no augmentation)."""
    device = device or resolve_device(cfg.device)
    teacher, payload = load_checkpoint(teacher_ckpt, device)
    tokenizer = ModelConfig.from_dict(payload["model_config"]).tokenizer()
    loader = make_loader(data.dataset("train", {"teacher": tokenizer}), cfg.eval_batch_size, shuffle=False)
    outputs = predict(teacher, loader, device, "teacher", cfg.bf16, desc="teacher cache")
    order = outputs["index"].argsort()
    return {
        "key": teacher_cache_key(payload["fingerprint"], data, cfg.bf16),
        "dims": payload["dims"],
        "outputs": {k: outputs[k][order].contiguous() for k in TEACHER_CACHE_KEYS},
    }


def load_or_build_teacher_cache(teacher_ckpt: Path, data: PreparedData, cfg: TrainConfig,
                                cache_path: Path, device: torch.device | None = None,
                                rebuild_stale: bool = True) -> dict:
    """The cached teacher outputs if `cache_path` matches this teacher and preprocessing, else new ones.

    With `rebuild_stale=False` a missing or stale cache is an error (a pipeline stage must not
    rewrite another stage's output).
    """
    payload = torch.load(teacher_ckpt, map_location="cpu", weights_only=False)
    key = teacher_cache_key(payload["fingerprint"], data, cfg.bf16)
    del payload
    cache_path = Path(cache_path)
    if cache_path.exists():
        cache = torch.load(cache_path, map_location="cpu", weights_only=True)
        if cache.get("key") == key:
            return cache
    if not rebuild_stale:
        raise RuntimeError(
            f"teacher cache {cache_path} is missing or was made by another teacher or preprocessing; "
            "rebuild it with the teacher stage (dvc repro)"
        )
    cache = build_teacher_cache(teacher_ckpt, data, cfg, device)
    atomic_write(cache_path, lambda p: torch.save(cache, p))
    return cache


# --------------------------------------------------------------------------- the loop


@dataclass
class RunResult:
    checkpoint: Path
    best_epoch: int
    dev: dict
    test: dict | None
    history: list[dict] = field(default_factory=list)
    parameters: int = 0
    seconds: float = 0.0


def _linear_warmup_decay(optimizer, total_steps: int, warmup_ratio: float):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)


def _fit(
    model: MultimodalClassifier,
    compute_loss: Callable[[dict], dict[str, torch.Tensor]],
    extra_params: list[nn.Parameter],
    train_loader,
    evaluate_dev: Callable[[], dict],
    cfg: TrainConfig,
    device: torch.device,
    desc: str,
    report_epoch: Callable[[int, float], None] | None = None,
) -> tuple[dict, int, dict, list[dict]]:
    """Train; return the best state (by dev average macro-F1), its epoch, dev metrics, history."""
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    scheduler = _linear_warmup_decay(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup_ratio)
    best = (-1.0, 0, {}, None)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        sums: dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"{desc} epoch {epoch}/{cfg.epochs}")
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            with autocast(device, cfg.bf16):
                parts = compute_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            parts["total"].backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            n = len(batch["index"])
            seen += n
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
            # refresh=False: the bar redraws on its own schedule (mininterval), not once per step.
            bar.set_postfix(loss=f"{sums['total'] / seen:.4f}", sps=f"{seen / (time.perf_counter() - start):.1f}",
                            refresh=False)
        dev = evaluate_dev()
        row = {"epoch": epoch, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
               "dev_avg_f1": dev["avg_f1"], "train_seconds": time.perf_counter() - start,
               **{f"dev_{t}_f1": dev[t]["f1_macro"] for t in dev if isinstance(dev[t], dict)}}
        history.append(row)
        tqdm.write(f"{desc} epoch {epoch}: train loss {row['train_total']:.4f}, dev avg F1 {dev['avg_f1']:.4f}")
        if dev["avg_f1"] > best[0]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = (dev["avg_f1"], epoch, dev, state)
        if report_epoch is not None:
            report_epoch(epoch, dev["avg_f1"])
    return best[3], best[1], best[2], history


def _finish(model, model_cfg, state, best_epoch, dev, history, data, tokenizer, role, cfg, device,
            out_dir: Path, started: float, extra: Mapping | None = None, evaluate_test: bool = True,
            checkpoint_path: Path | None = None) -> RunResult:
    """Restore the best weights, evaluate dev/test, write checkpoint, predictions and metrics."""
    model.load_state_dict(state)
    out_dir = Path(out_dir)
    ckpt = Path(checkpoint_path) if checkpoint_path else out_dir / "model.pt"
    save_checkpoint(ckpt, model, model_cfg, data.vocab, data, {"best_epoch": best_epoch, **(extra or {})})
    results = {"dev": dev}
    splits = ("dev", "test") if evaluate_test else ("dev",)
    for split in splits:
        metrics, frame = evaluate(model, data, split, tokenizer, role, cfg, device)
        results[split] = metrics
        atomic_write(out_dir / f"predictions_{split}.csv", lambda p, f=frame: f.to_csv(p, index=False))
    seconds = time.perf_counter() - started
    n_params = count_parameters(model)
    summary = {"parameters": n_params, "best_epoch": best_epoch, "seconds": round(seconds, 1),
               "tasks": list(data.vocab.tasks), **results}
    write_json(out_dir / "metrics.json", summary)
    atomic_write(out_dir / "history.csv", lambda p: pd.DataFrame(history).to_csv(p, index=False))
    return RunResult(ckpt, best_epoch, results["dev"], results.get("test"), history, n_params, seconds)


def train_teacher(data: PreparedData, model_cfg: ModelConfig, cfg: TrainConfig, out_dir: Path,
                  checkpoint_path: Path | None = None) -> RunResult:
    """Phase 1: the teacher learns both tasks from the labels (CE + CE).

    Metrics, predictions and history go to `out_dir`; the checkpoint to `checkpoint_path`
    (default `out_dir/model.pt`).
    """
    started = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model = model_cfg.build(data.vocab.num_classes).to(device)
    tokenizer = model_cfg.tokenizer()
    train_set = data.dataset("train", {"teacher": tokenizer}, augment=cfg.augment)
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed)

    def compute_loss(batch):
        out = model(*batch_inputs(batch, "teacher", device))
        ce = two_task_ce(out, batch[TASK_KEYS[0]].to(device), batch[TASK_KEYS[1]].to(device))
        return {"total": ce}

    def evaluate_dev():
        return evaluate(model, data, "dev", tokenizer, "teacher", cfg, device)[0]

    state, epoch, dev, history = _fit(model, compute_loss, [], loader, evaluate_dev, cfg, device, "teacher")
    return _finish(model, model_cfg, state, epoch, dev, history, data, tokenizer, "teacher", cfg, device,
                   out_dir, started, checkpoint_path=checkpoint_path)


def distill_student(
    data: PreparedData,
    teacher_ckpt: Path,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    cfg: TrainConfig,
    out_dir: Path,
    cache_path: Path | None = None,
    use_cache: bool | None = None,
    report_epoch: Callable[[int, float], None] | None = None,
    evaluate_test: bool = True,
    checkpoint_path: Path | None = None,
    rebuild_stale_cache: bool = True,
) -> RunResult:
    """Phase 2: the student learns from the labels and the frozen teacher (CombinedLoss).

    The teacher's outputs come from a cache computed once (default when inputs are
    deterministic) or from the live teacher under no_grad (with random augmentation).
    """
    started = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    use_cache = (not cfg.augment) if use_cache is None else use_cache
    if use_cache and cfg.augment:
        raise ValueError("a teacher cache cannot serve randomly augmented inputs; set use_cache=False")

    tokenizers = {"student": model_cfg.tokenizer()}
    teacher = cache = None
    if use_cache:
        cache_path = Path(cache_path) if cache_path else Path(out_dir) / "teacher_cache.pt"
        cache = load_or_build_teacher_cache(teacher_ckpt, data, cfg, cache_path, device,
                                            rebuild_stale=rebuild_stale_cache)
        teacher_dims = cache["dims"]
    else:
        teacher, payload = load_checkpoint(teacher_ckpt, device)
        teacher.eval().requires_grad_(False)
        tokenizers["teacher"] = ModelConfig.from_dict(payload["model_config"]).tokenizer()
        teacher_dims = payload["dims"]

    seed_everything(cfg.seed)
    student = model_cfg.build(data.vocab.num_classes).to(device)
    loss_fn = CombinedLoss.for_models(
        student, teacher_dims, n_data=len(data.records["train"]),
        joint_labels=data.joint_train_labels(), seed=cfg.seed, **loss_cfg.to_dict(),
    ).to(device)
    train_set = data.dataset("train", tokenizers, augment=cfg.augment)
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed)
    cached = {k: v.to(device) for k, v in cache["outputs"].items()} if cache is not None else None

    def compute_loss(batch):
        index = batch["index"].to(device)
        if cached is not None:
            t_out = {k: v[index] for k, v in cached.items()}
        else:
            with torch.no_grad():
                t_out = teacher(*batch_inputs(batch, "teacher", device))
        s_out = student(*batch_inputs(batch, "student", device))
        return loss_fn(s_out, t_out, batch[TASK_KEYS[0]].to(device), batch[TASK_KEYS[1]].to(device), index)

    def evaluate_dev():
        return evaluate(student, data, "dev", tokenizers["student"], "student", cfg, device)[0]

    state, epoch, dev, history = _fit(student, compute_loss, list(loss_fn.parameters()), loader,
                                      evaluate_dev, cfg, device, "student", report_epoch)
    return _finish(student, model_cfg, state, epoch, dev, history, data, tokenizers["student"], "student",
                   cfg, device, out_dir, started, {"loss_config": loss_cfg.to_dict(),
                                                   "teacher_cache_used": bool(use_cache)},
                   evaluate_test=evaluate_test, checkpoint_path=checkpoint_path)
