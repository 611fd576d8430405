"""The training engine: teacher training, distillation (cached or live teacher), evaluation.

One loop (`_fit`) serves both phases; what differs (which model trains, where teacher
outputs come from, the loss) is passed in, nanoGPT-style, not subclassed.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Mapping, NamedTuple

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import nn
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from medkd.backbones import tokenizer_identity
from medkd.config import FromMapping, config_dataclass
from medkd.data import PreparedData, make_loader
from medkd.datasets import Vocab
from medkd.distributed import (
    all_reduce_sum, average_float_buffers, average_gradients, barrier, broadcast_module, broadcast_object, is_main,
    local_device, rank, world_size,
)
from medkd.environment import cpu_model, cpu_runs_bf16_natively, environment
from medkd.files import atomic_write, write_json
from medkd.losses import TERMS, CombinedLoss, LossConfig, LossContext
from medkd.metrics import metrics_from_predictions, predictions_frame
from medkd.models import TASK_LOGITS, ModelConfig, MultimodalClassifier, build_model, count_parameters

CHECKPOINT_FORMAT = "medkd-checkpoint-1"
TEACHER_CACHE_KEYS = ("logits_modality", "logits_location", "img_raw", "txt_raw", "fused")


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
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    bf16: bool = True  # autocast; on CPU 1.3-2.4x faster here
    augment: bool = False  # random flip/shift; forces a live teacher when distilling
    channels_last: bool = True  # NHWC images and conv weights: faster CNN kernels on CPU (benchmarks/throughput.py)
    eval_by_length: bool = True  # evaluation batches of similar text length: less padding, same outputs
    fused_optimizer: bool = True  # one fused AdamW kernel instead of per-tensor updates
    train_by_length: bool = False  # training batches drawn from shuffled pools of similar text length
    compile: bool = False  # torch.compile (inductor) of the training model's forward
    # Every N steps: each weighted loss term's gradient norm on the model (one extra backward pass per
    # term on those steps; training itself is unchanged). 0: never. Written to the run's loss_terms.csv.
    probe_every: Annotated[int, Field(ge=0)] = 0
    max_steps_per_epoch: Annotated[int, Field(ge=1)] | None = None  # for smoke runs


# --------------------------------------------------------------------------- utilities


def resolve_device(spec: str = "auto") -> torch.device:
    spec = local_device(spec)  # under torchrun: this rank's GPU
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available")
    return device


def precision_problem(device: torch.device, bf16: bool) -> str | None:
    """Why `bf16` autocast on `device` would crawl, or None: a CPU without bf16 instructions makes
    torch emulate it, about 100x slower than fp32 (a teacher step of 230 s instead of 2), a run that
    looks hung. `medkd check-params` (the pipeline's first stage) refuses such params."""
    if not (bf16 and device.type == "cpu") or cpu_runs_bf16_natively():
        return None
    return (f"bf16 autocast is on (runtime.bf16), but this CPU ({cpu_model()}, "
            f"{torch.backends.cpu.get_cpu_capability()}) has no bf16 instructions (AVX512-BF16 or AMX): it would "
            "run about 100x slower than fp32 here. Set runtime.bf16: false (fp32; the numbers then differ slightly "
            "from a bf16 run) or use a machine with bf16 (README, 'Reproducing the committed run').")


def training_device(cfg: "TrainConfig") -> torch.device:
    """The device a run trains or predicts on; a warning if its precision would crawl there."""
    device = resolve_device(cfg.device)
    problem = precision_problem(device, cfg.bf16)
    if problem:
        warnings.warn(problem, RuntimeWarning, stacklevel=3)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _memory_format(model: nn.Module, cfg: "TrainConfig") -> nn.Module:
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def _trainable(model: nn.Module, cfg: "TrainConfig") -> nn.Module:
    """The model to train, in the configured memory format, compiled in place if asked.

    `dynamic=True`: batches trim their padding, so text length varies from batch to batch.
    """
    model = _memory_format(model, cfg)
    if cfg.compile:
        model.compile(dynamic=True)
    return model


def state_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def batch_inputs(batch: Mapping[str, torch.Tensor], role: str, device: torch.device, channels_last: bool = False):
    pixels = batch["pixel_values"].to(device, non_blocking=True)
    return (
        pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels,
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
        "data": data.config.to_dict(),
        "dims": {"img_dim": model.img_dim, "txt_dim": model.txt_dim, "fusion_dim": model.fusion_dim},
        "fingerprint": fingerprint,
        "state_dict": state,
        **(extra or {}),
    }
    atomic_write(path, lambda p: torch.save(payload, p))
    return fingerprint


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[MultimodalClassifier, dict]:
    """Rebuild the model from its stored config (random init, no download) and load its weights."""
    payload = read_checkpoint(path)
    return model_from_checkpoint(payload, device), payload


def read_checkpoint(path: Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a medkd checkpoint (expected format {CHECKPOINT_FORMAT})")
    return payload


def model_from_checkpoint(payload: Mapping, device: torch.device | str = "cpu") -> MultimodalClassifier:
    """The model a checkpoint describes (random init, no download), with its weights."""
    cfg = ModelConfig.from_dict(payload["model_config"])
    vocab = Vocab.from_dict(payload["vocab"])
    model = build_model(cfg, vocab.num_classes, pretrained=False)
    model.load_state_dict(payload["state_dict"])
    return model.to(device)


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def predict(model: nn.Module, loader, device: torch.device, role: str, bf16: bool,
            desc: str = "predict", channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Model outputs over a loader, on the CPU in float32, rows in `index` order."""
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc=desc, leave=False):
        with autocast(device, bf16):
            out = model(*batch_inputs(batch, role, device, channels_last))
        out["index"] = batch["index"]
        for k, v in out.items():
            chunks.setdefault(k, []).append(v.detach().float().cpu() if v.is_floating_point() else v.cpu())
    outputs = {k: torch.cat(v) for k, v in chunks.items()}
    order = outputs["index"].argsort()  # the split's order, whatever order the loader batched in
    return {k: v[order] for k, v in outputs.items()}


def evaluate(model: nn.Module, data: PreparedData, split: str, tokenizer, role: str,
             cfg: TrainConfig, device: torch.device) -> tuple[dict, pd.DataFrame]:
    loader = make_loader(data.dataset(split, {role: tokenizer}), cfg.eval_batch_size, shuffle=False,
                         by_length=cfg.eval_by_length)
    outputs = predict(model, loader, device, role, cfg.bf16, desc=f"eval {split}", channels_last=cfg.channels_last)
    image_ids = [r.image_id for r in data.records[split]]
    frame = predictions_frame(outputs["index"], [outputs[k] for k in TASK_LOGITS], image_ids, data.labels[split],
                              data.vocab)
    return metrics_from_predictions(frame, data.vocab), frame


# --------------------------------------------------------------------------- teacher cache


def teacher_cache_key(payload: Mapping, data: PreparedData, tokenizer, bf16: bool) -> str:
    """Everything that changes the teacher's outputs on the training split: its weights and full
    model config, its tokenizer, the data's content (decoded pixels, texts) and preprocessing, precision."""
    return resume_key("teacher-cache", payload["fingerprint"], payload["model_config"], tokenizer_identity(tokenizer),
                      data.content_key("train"), f"bf16={bf16}")


def build_teacher_cache(teacher_ckpt: Path, data: PreparedData, cfg: TrainConfig,
                        device: torch.device | None = None, payload: Mapping | None = None, tokenizer=None) -> dict:
    """Run the frozen teacher once over the training split (no augmentation).

    `payload`/`tokenizer`: the checkpoint and tokenizer when the caller has them already.
    """
    device = device or training_device(cfg)
    payload = payload if payload is not None else read_checkpoint(teacher_ckpt)
    teacher = model_from_checkpoint(payload, device)
    tokenizer = tokenizer if tokenizer is not None else ModelConfig.from_dict(payload["model_config"]).tokenizer()
    loader = make_loader(data.dataset("train", {"teacher": tokenizer}), cfg.eval_batch_size, shuffle=False,
                         by_length=cfg.eval_by_length)
    teacher = _memory_format(teacher, cfg)
    outputs = predict(teacher, loader, device, "teacher", cfg.bf16, desc="teacher cache", channels_last=cfg.channels_last)
    return {
        "key": teacher_cache_key(payload, data, tokenizer, cfg.bf16),
        "dims": payload["dims"],
        "outputs": {k: outputs[k].contiguous() for k in TEACHER_CACHE_KEYS},
    }


def load_or_build_teacher_cache(teacher_ckpt: Path, data: PreparedData, cfg: TrainConfig,
                                cache_path: Path, device: torch.device | None = None,
                                rebuild_stale: bool = True, all_ranks: bool = True) -> dict:
    """The cached teacher outputs if `cache_path` matches this teacher and preprocessing, else new ones.

    With `rebuild_stale=False` a missing or stale cache is an error (a pipeline stage must not
    rewrite another stage's output). Data-parallel, with `all_ranks` every rank calls this and
    rank 0 builds the cache for all; `all_ranks=False`: only this process calls it.
    """
    payload = read_checkpoint(teacher_ckpt)
    tokenizer = ModelConfig.from_dict(payload["model_config"]).tokenizer()
    key = teacher_cache_key(payload, data, tokenizer, cfg.bf16)
    cache_path = Path(cache_path)
    cache = _matching_cache(cache_path, key)
    if cache is not None:
        return cache
    if not rebuild_stale:
        raise RuntimeError(
            f"teacher cache {cache_path} is missing or was made by another teacher or preprocessing; "
            "rebuild it with the teacher stage (dvc repro)"
        )
    if is_main() or not all_ranks:  # data-parallel: rank 0 builds it once, the other ranks read it
        cache = build_teacher_cache(teacher_ckpt, data, cfg, device, payload=payload, tokenizer=tokenizer)
        atomic_write(cache_path, lambda p: torch.save(cache, p))
    if all_ranks:
        barrier()
    return cache if cache is not None else _matching_cache(cache_path, key)


def _matching_cache(cache_path: Path, key: str) -> dict | None:
    if cache_path.exists():
        cache = torch.load(cache_path, map_location="cpu", weights_only=True)
        if cache.get("key") == key:
            return cache
    return None


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


class BestEpoch(NamedTuple):
    """The epoch with the highest dev average macro-F1 so far, and the weights it had."""

    score: float
    epoch: int
    dev: dict
    state: dict | None


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM (KeyboardInterrupt) stopped training; the message says what was saved."""


def _rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(states: Mapping) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass(frozen=True)
class Resume:
    """Where a run keeps its state after each epoch, and the key that state must carry to be resumed.

    The key fingerprints everything that determines the run (configs, data, teacher): state left
    by another run is ignored, not resumed.
    """

    path: Path
    key: str

    @property
    def file(self) -> Path:
        """This process's state file: `path` for rank 0, `<stem>.rank<k><suffix>` beside it for rank k
        (each rank keeps its own random states)."""
        path = Path(self.path)
        return path if rank() == 0 else path.with_name(f"{path.stem}.rank{rank()}{path.suffix}")

    def load(self) -> dict | None:
        if not self.file.exists():
            return None
        state = torch.load(self.file, map_location="cpu", weights_only=False)
        if state.get("key") != self.key:
            tqdm.write(f"{self.file}: left by a run with other settings; starting afresh")
            return None
        return state

    def save(self, state: Mapping) -> None:
        atomic_write(self.file, lambda p: torch.save({"key": self.key, **state}, p))

    def clear(self) -> None:
        self.file.unlink(missing_ok=True)


def resume_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_state_key(*parts) -> str:
    """The key of a training run's resume state: a data-parallel run resumes only with as many processes."""
    return resume_key(*parts, *([f"world_size={world_size()}"] if world_size() > 1 else []))


@dataclass
class RunContext:
    """One training run: what it trains, on what, where its outputs go."""

    model: MultimodalClassifier
    model_cfg: ModelConfig
    data: PreparedData
    tokenizer: object
    role: str  # "teacher" | "student": which tokenized inputs the model reads
    cfg: TrainConfig
    device: torch.device
    out_dir: Path
    checkpoint_path: Path | None = None
    started: float = field(default_factory=time.perf_counter)
    resume: Resume | None = None

    def evaluate(self, split: str) -> tuple[dict, pd.DataFrame]:
        return evaluate(self.model, self.data, split, self.tokenizer, self.role, self.cfg, self.device)


def probe_terms(parts: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                params: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """{term: (weight × value, L2 norm of its gradient on `params`)} for each weighted term of a
    step's loss (its graph is kept for the step's own backward pass)."""
    probed = {}
    for name, weight in weights.items():
        weighted = weight * parts[name]
        grads = torch.autograd.grad(weighted, params, retain_graph=True, allow_unused=True)
        norms = [g.detach().float().norm() for g in grads if g is not None]
        probed[name] = (float(weighted.detach()), float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0)
    return probed


def _fit(
    run: RunContext,
    compute_loss: Callable[[dict], dict[str, torch.Tensor]],
    loss_fn: nn.Module,
    train_loader,
    report_epoch: Callable[[int, float], None] | None = None,
) -> tuple[BestEpoch, list[dict], list[dict]]:
    """Train; return the best epoch (by dev average macro-F1), the per-epoch history and the loss-term
    probes (`cfg.probe_every`).

    With `run.resume`, the state after each epoch (model, optimizer, scheduler, loss state such as
    the CRD memory, every RNG, the loader's shuffling generator, history, best so far) is saved,
    and a run that finds its own state continues after its last complete epoch, ending with the
    same weights as an uninterrupted run.
    """
    model, cfg, device = run.model, run.cfg, run.device
    params = [p for p in model.parameters() if p.requires_grad] + list(loss_fn.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if cfg.fused_optimizer else {}))
    world = world_size()
    broadcast_module(model)  # data-parallel: every rank starts from rank 0's weights
    broadcast_module(loss_fn)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    best = BestEpoch(-1.0, 0, {}, None)
    history: list[dict] = []
    probes: list[dict] = []  # loss-term probes (cfg.probe_every)
    model_params = [p for p in model.parameters() if p.requires_grad]
    saved_epoch = 0
    state = run.resume.load() if run.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        history, saved_epoch, probes = state["history"], state["epoch"], state.get("probes", [])
        best = BestEpoch(state["best_score"], state["best_epoch"], state["best_dev"],
                         state["best_state"] if state["best_state"] is not None else state["model"])
        if state["complete"]:
            return best, history, probes
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        train_loader.generator.set_state(state["loader_generator"])
        _set_rng_states(state["rng"])
        tqdm.write(f"{run.role}: resuming after epoch {saved_epoch} of {cfg.epochs} from {run.resume.path}")

    def save(epoch: int, complete: bool) -> None:
        model_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        run.resume.save({
            "epoch": epoch, "complete": complete, "model": model_state, "loss": loss_fn.state_dict(),
            "optimizer": None if complete else optimizer.state_dict(),
            "scheduler": None if complete else scheduler.state_dict(),
            "loader_generator": train_loader.generator.get_state(), "rng": _rng_states(), "history": history,
            "probes": probes,
            "best_score": best.score, "best_epoch": best.epoch, "best_dev": best.dev,
            "best_state": None if best.epoch == epoch and not complete else best.state,
        })

    epoch = saved_epoch
    try:
        for epoch in range(saved_epoch + 1, cfg.epochs + 1):
            model.train()
            sums: dict[str, float] = {}
            # Where the epoch's time goes (CPU ops are synchronous, so the clock splits them exactly).
            clock = {"data": 0.0, "model": 0.0, "optimizer": 0.0}
            seen, start = 0, time.perf_counter()
            bar = tqdm(train_loader, total=steps_per_epoch, desc=f"{run.role} epoch {epoch}/{cfg.epochs}")
            tick = time.perf_counter()
            for step, batch in enumerate(bar):
                if step >= steps_per_epoch:
                    break
                fetched = time.perf_counter()
                n = len(batch["index"])
                with autocast(device, cfg.bf16):
                    parts = compute_loss(batch)
                global_step = (epoch - 1) * steps_per_epoch + step
                if cfg.probe_every and global_step % cfg.probe_every == 0 and is_main():
                    for term, (value, norm) in probe_terms(parts, loss_fn.weights, model_params).items():
                        probes.append({"step": global_step, "epoch": epoch, "term": term,
                                       "weighted_value": value, "grad_norm": norm})
                optimizer.zero_grad(set_to_none=True)
                if world > 1:
                    # Each rank's mean, weighted by its share of the global batch: after averaging over
                    # the ranks the gradient is that of the global batch's mean, as in one process.
                    global_n = int(all_reduce_sum(torch.tensor([n], device=device)))
                    (parts["total"] * (n * world / global_n)).backward()
                    average_gradients(params)
                else:
                    parts["total"].backward()
                computed = time.perf_counter()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                stepped = time.perf_counter()
                clock["data"] += fetched - tick
                clock["model"] += computed - fetched
                clock["optimizer"] += stepped - computed
                seen += n
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
                # refresh=False: the bar redraws on its own schedule (mininterval), not once per step.
                bar.set_postfix(loss=f"{sums['total'] / seen:.4f}",
                                sps=f"{seen / (time.perf_counter() - start):.1f}", refresh=False)
                tick = time.perf_counter()
            if world > 1:  # epoch means over the global batches; BatchNorm statistics of all ranks
                totals = all_reduce_sum(torch.tensor([seen, *sums.values()], dtype=torch.float64, device=device))
                seen, sums = int(totals[0]), dict(zip(sums, totals[1:].tolist()))
                average_float_buffers(model)
            dev = broadcast_object(run.evaluate("dev")[0] if is_main() else None)  # rank 0 evaluates, once
            row = {"epoch": epoch, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
                   "dev_avg_f1": dev["avg_f1"], "train_seconds": time.perf_counter() - start,
                   "train_samples": seen, **{f"seconds_{k}": round(v, 3) for k, v in clock.items()},
                   **{f"dev_{t}_f1": dev[t]["f1_macro"] for t in dev if isinstance(dev[t], dict)}}
            history.append(row)
            tqdm.write(f"{run.role} epoch {epoch}: train loss {row['train_total']:.4f}, "
                       f"dev avg F1 {dev['avg_f1']:.4f}")
            if dev["avg_f1"] > best.score:
                state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best = BestEpoch(dev["avg_f1"], epoch, dev, state)
            if run.resume:
                save(epoch, complete=False)
                saved_epoch = epoch
            if report_epoch is not None:
                report_epoch(epoch, dev["avg_f1"])
    except KeyboardInterrupt:
        saved = (f"epochs 1-{saved_epoch} are saved in {run.resume.path}; re-run to resume from epoch "
                 f"{saved_epoch + 1}" if run.resume and saved_epoch else "no epoch was saved; re-run to start again")
        current = min(saved_epoch + 1, cfg.epochs) if run.resume else epoch  # the epoch that did not finish
        raise TrainingInterrupted(f"{run.role} interrupted at epoch {current} of {cfg.epochs}: {saved}") from None
    if run.resume:
        save(cfg.epochs, complete=True)
    return best, history, probes


def _finish(run: RunContext, best: BestEpoch, history: list[dict], extra: Mapping | None = None,
            evaluate_test: bool = True, probes: list[dict] | None = None) -> RunResult:
    """Restore the best weights, evaluate dev/test, write checkpoint, predictions and metrics.

    Data-parallel: rank 0 evaluates and writes; every rank returns its results.
    """
    run.model.load_state_dict(best.state)
    out_dir = Path(run.out_dir)
    ckpt = Path(run.checkpoint_path) if run.checkpoint_path else out_dir / "model.pt"
    n_params = count_parameters(run.model)
    if not is_main():
        results, seconds = broadcast_object(None)
        barrier()
        return RunResult(ckpt, best.epoch, results["dev"], results.get("test"), history, n_params, seconds)
    save_checkpoint(ckpt, run.model, run.model_cfg, run.data.vocab, run.data,
                    {"best_epoch": best.epoch, **(extra or {})})
    results = {"dev": best.dev}
    for split in ("dev", "test") if evaluate_test else ("dev",):
        metrics, frame = run.evaluate(split)
        results[split] = metrics
        atomic_write(out_dir / f"predictions_{split}.csv", lambda p, f=frame: f.to_csv(p, index=False))
    seconds = time.perf_counter() - run.started
    summary = {"parameters": n_params, "best_epoch": best.epoch, "seed": run.cfg.seed, "seconds": round(seconds, 1),
               "tasks": list(run.data.vocab.tasks), **results,
               "environment": {**environment(run.device, run.cfg.bf16), "world_size": world_size()}}
    write_json(out_dir / "metrics.json", summary)
    atomic_write(out_dir / "history.csv", lambda p: pd.DataFrame(history).to_csv(p, index=False))
    if probes:
        atomic_write(out_dir / "loss_terms.csv", lambda p: pd.DataFrame(probes).to_csv(p, index=False))
    broadcast_object((results, seconds))
    barrier()
    return RunResult(ckpt, best.epoch, results["dev"], results.get("test"), history, n_params, seconds)


def train_teacher(data: PreparedData, model_cfg: ModelConfig, cfg: TrainConfig, out_dir: Path,
                  checkpoint_path: Path | None = None, resume_path: Path | None = None) -> RunResult:
    """Phase 1: the teacher learns both tasks from the labels (CE + CE).

    Metrics, predictions and history go to `out_dir`; the checkpoint to `checkpoint_path`
    (default `out_dir/model.pt`). With `resume_path` the run saves its state after each epoch
    there and continues from it when re-run with the same settings and data.
    """
    started = time.perf_counter()
    seed_everything(cfg.seed)
    device = training_device(cfg)
    model = _trainable(build_model(model_cfg, data.vocab.num_classes).to(device), cfg)
    resume = Resume(Path(resume_path), run_state_key("teacher", model_cfg.to_dict(), cfg.to_dict(),
                                                   data.content_key("train"))) if resume_path else None
    run = RunContext(model, model_cfg, data, model_cfg.tokenizer(), "teacher", cfg, device, out_dir,
                     checkpoint_path, started, resume)
    loss_fn = CombinedLoss.from_config(LossConfig(weights={"ce": 1.0}),
                                       LossContext(model.fusion_dim, None, len(data.records["train"])))
    loader = make_loader(data.dataset("train", {"teacher": run.tokenizer}, augment=cfg.augment), cfg.batch_size,
                         shuffle=True, seed=cfg.seed, by_length=cfg.train_by_length)

    def compute_loss(batch):
        out = model(*batch_inputs(batch, "teacher", device, cfg.channels_last))
        return loss_fn(out, None, batch["labels"].to(device))

    best, history, probes = _fit(run, compute_loss, loss_fn, loader)
    return _finish(run, best, history, probes=probes)


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
    resume_path: Path | None = None,
    teacher_cache: Mapping | None = None,
) -> RunResult:
    """Phase 2: the student learns from the labels and the frozen teacher (CombinedLoss).

    The teacher's outputs come from a cache computed once (default when inputs are
    deterministic) or from the live teacher under no_grad (with random augmentation).
    With `resume_path`, per-epoch state is saved there and resumed (see `train_teacher`).
    `teacher_cache`: cached outputs the caller already loaded (e.g. once for all Optuna trials).
    """
    started = time.perf_counter()
    seed_everything(cfg.seed)
    device = training_device(cfg)
    use_cache = (not cfg.augment) if use_cache is None else use_cache
    if use_cache and cfg.augment:
        raise ValueError("a teacher cache cannot serve randomly augmented inputs; set use_cache=False")
    needs_teacher = any(TERMS[name].uses_teacher for name in loss_cfg.active_terms)

    tokenizers = {"student": model_cfg.tokenizer()}
    teacher = cache = teacher_dims = None
    if not needs_teacher:  # e.g. the no-KD control (CE only): no teacher is read, run or cached
        use_cache = False
    elif use_cache and teacher_cache is not None:
        cache = teacher_cache
        teacher_dims = cache["dims"]
    elif use_cache:
        cache_path = Path(cache_path) if cache_path else Path(out_dir) / "teacher_cache.pt"
        cache = load_or_build_teacher_cache(teacher_ckpt, data, cfg, cache_path, device,
                                            rebuild_stale=rebuild_stale_cache)
        teacher_dims = cache["dims"]
    else:
        teacher, payload = load_checkpoint(teacher_ckpt, device)
        teacher = _memory_format(teacher, cfg).eval().requires_grad_(False)
        tokenizers["teacher"] = ModelConfig.from_dict(payload["model_config"]).tokenizer()
        teacher_dims = payload["dims"]

    seed_everything(cfg.seed)
    student = _trainable(build_model(model_cfg, data.vocab.num_classes).to(device), cfg)
    teacher_id = (cache["key"] if cache is not None else
                  state_fingerprint(teacher.state_dict()) if teacher is not None else "no teacher")
    resume = Resume(Path(resume_path), run_state_key("student", model_cfg.to_dict(), loss_cfg.to_dict(), cfg.to_dict(),
                                                   data.content_key("train"), teacher_id)) if resume_path else None
    run = RunContext(student, model_cfg, data, tokenizers["student"], "student", cfg, device, out_dir,
                     checkpoint_path, started, resume)
    loss_fn = CombinedLoss.from_config(loss_cfg, LossContext(
        student.fusion_dim, teacher_dims, n_data=len(data.records["train"]),
        joint_labels=data.joint_train_labels(), seed=cfg.seed, train_labels=data.labels["train"],
        num_classes=data.vocab.num_classes)).to(device)
    train_set = data.dataset("train", tokenizers, augment=cfg.augment)
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, by_length=cfg.train_by_length)
    cached = {k: v.to(device) for k, v in cache["outputs"].items()} if cache is not None else None

    def compute_loss(batch):
        index = batch["index"].to(device)
        if cached is not None:
            t_out = {k: v[index] for k, v in cached.items()}
        elif teacher is None:
            t_out = None
        else:
            with torch.no_grad():
                t_out = teacher(*batch_inputs(batch, "teacher", device, cfg.channels_last))
        s_out = student(*batch_inputs(batch, "student", device, cfg.channels_last))
        return loss_fn(s_out, t_out, batch["labels"].to(device), index)

    best, history, probes = _fit(run, compute_loss, loss_fn, loader, report_epoch)
    return _finish(run, best, history, {"loss_config": loss_cfg.to_dict(), "teacher_cache_used": bool(use_cache),
                                        "teacher_used": needs_teacher},
                   evaluate_test=evaluate_test, probes=probes)
