"""The training loop: teacher training and distillation (cached, live or no teacher).

One loop (`_fit`) serves both phases; what differs (which model trains, where teacher
outputs come from, the loss) is passed in, nanoGPT-style, not subclassed.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from medkd.config.configs import ModelConfig, TrainConfig
from medkd.config.loss_terms import LossConfig
from medkd.data.prepared import PreparedData, make_loader
from medkd.engine.evaluation import autocast, batch_inputs, evaluate, memory_format, seed_everything, training_device
from medkd.engine.losses import CombinedLoss, LossContext
from medkd.engine.teacher_cache import load_or_build_teacher_cache, model_tokenizer
from medkd.engine.trunks import TrunkCache, TrunkRun, model_trunks
from medkd.models.backbones import build_tokenizer
from medkd.models.checkpoint import load_checkpoint, save_checkpoint
from medkd.models.classifier import MultimodalClassifier, build_model, count_parameters
from medkd.util import progress
from medkd.util.distributed import (
    all_reduce_sum,
    average_float_buffers,
    average_gradients,
    barrier,
    broadcast_module,
    broadcast_object,
    is_main,
    rank,
    world_size,
)
from medkd.util.environment import environment
from medkd.util.files import atomic_write, write_json
from medkd.util.keys import content_key, state_fingerprint
from medkd.util.stored import load_or_none


def _trainable(model: nn.Module, cfg: "TrainConfig") -> nn.Module:
    """The model to train, in the configured memory format, compiled in place if asked.

    `dynamic=True`: batches trim their padding, so text length varies from batch to batch.
    """
    model = memory_format(model, cfg)
    if cfg.compile:
        model.compile(dynamic=True)
    return model



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
        state = load_or_none(self.file, "resume state", weights_only=False)
        if state is None:
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            tqdm.write(f"{self.file}: left by a run with other settings; starting afresh")
            return None
        return state

    def save(self, state: Mapping) -> None:
        atomic_write(self.file, lambda p: torch.save({"key": self.key, **state}, p))

    def clear(self) -> None:
        self.file.unlink(missing_ok=True)


def run_state_key(*parts) -> str:
    """The key of a training run's resume state: a data-parallel run resumes only with as many processes."""
    return content_key(*parts, *([f"world_size={world_size()}"] if world_size() > 1 else []))


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
    bf16: bool = False  # the run's resolved precision (TrainConfig.precision on this device)
    trunks: TrunkCache | None = None  # the model's frozen trunk outputs, every split

    def evaluate(self, split: str) -> tuple[dict, pd.DataFrame]:
        return evaluate(self.model, self.data, split, self.tokenizer, self.role, self.cfg, self.device, self.bf16,
                        self.trunks)

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple:
        """The model's positional inputs for a training batch (its own tokenized texts)."""
        return batch_inputs(batch, self.role, self.device, self.cfg.channels_last)

    def trunk_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's cached trunk outputs (none without a trunk cache)."""
        return self.trunks.inputs("train", batch, self.device) if self.trunks is not None else {}


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


@dataclass
class _Optimization:
    """What steps the weights: the optimizer over the trainable parameters (the model's and the loss
    terms'), the schedule, and the steps an epoch takes."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.Tensor]
    steps_per_epoch: int

    @classmethod
    def create(cls, run: RunContext, loss_fn: nn.Module, train_loader) -> "_Optimization":
        cfg = run.cfg
        params = [p for p in run.model.parameters() if p.requires_grad] + list(loss_fn.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      **({"fused": True} if cfg.fused_optimizer else {}))
        steps = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))
        total = steps * cfg.epochs
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
        return cls(optimizer, scheduler, params, steps)

    def backward(self, loss: torch.Tensor, n: int, device: torch.device) -> None:
        """The batch's gradients (data-parallel: averaged over the ranks as one global batch)."""
        self.optimizer.zero_grad(set_to_none=True)
        world = world_size()
        if world > 1:
            # Each rank's mean, weighted by its share of the global batch: after averaging over
            # the ranks the gradient is that of the global batch's mean, as in one process.
            global_n = int(all_reduce_sum(torch.tensor([n], device=device)))
            (loss * (n * world / global_n)).backward()
            average_gradients(self.params)
        else:
            loss.backward()

    def update(self, grad_clip: float) -> None:
        """Clipping, the update and the schedule."""
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        self.optimizer.step()
        self.scheduler.step()


@dataclass
class _Progress:
    """Everything a run has done so far, which a resumed run restores: epochs, history, the best epoch,
    the loss-term probes."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    best: BestEpoch = BestEpoch(-1.0, 0, {}, None)
    complete: bool = False

    @classmethod
    def resume_or_start(cls, run: RunContext, loss_fn: nn.Module, opt: _Optimization, train_loader) -> "_Progress":
        """The saved progress of this run (model, loss state, optimizer, schedule, loader shuffling, RNGs
        restored), or a fresh start."""
        state = run.resume.load() if run.resume else None
        if state is None:
            return cls()
        run.model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        best = BestEpoch(state["best_score"], state["best_epoch"], state["best_dev"],
                         state["best_state"] if state["best_state"] is not None else state["model"])
        progress = cls(state["epoch"], state["history"], state.get("probes", []), best, state["complete"])
        if not progress.complete:
            opt.optimizer.load_state_dict(state["optimizer"])
            opt.scheduler.load_state_dict(state["scheduler"])
            train_loader.generator.set_state(state["loader_generator"])
            _set_rng_states(state["rng"])
            tqdm.write(f"{run.role}: resuming after epoch {progress.epoch} of {run.cfg.epochs} from {run.resume.path}")
        return progress

    def record(self, epoch: int, row: dict, dev: dict, model: nn.Module) -> None:
        self.history.append(row)
        if dev["avg_f1"] > self.best.score:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best = BestEpoch(dev["avg_f1"], epoch, dev, state)

    def save(self, run: RunContext, loss_fn: nn.Module, opt: _Optimization, train_loader, epoch: int,
             complete: bool) -> None:
        model_state = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        run.resume.save({
            "epoch": epoch, "complete": complete, "model": model_state, "loss": loss_fn.state_dict(),
            "optimizer": None if complete else opt.optimizer.state_dict(),
            "scheduler": None if complete else opt.scheduler.state_dict(),
            "loader_generator": train_loader.generator.get_state(), "rng": _rng_states(),
            "history": self.history, "probes": self.probes,
            "best_score": self.best.score, "best_epoch": self.best.epoch, "best_dev": self.best.dev,
            "best_state": None if self.best.epoch == epoch and not complete else self.best.state,
        })
        self.epoch = epoch

    def interrupted(self, run: RunContext, epoch: int) -> TrainingInterrupted:
        saved = (f"epochs 1-{self.epoch} are saved in {run.resume.path}; re-run to resume from epoch "
                 f"{self.epoch + 1}" if run.resume and self.epoch else "no epoch was saved; re-run to start again")
        current = min(self.epoch + 1, run.cfg.epochs) if run.resume else epoch  # the epoch that did not finish
        return TrainingInterrupted(f"{run.role} interrupted at epoch {current} of {run.cfg.epochs}: {saved}")


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
    cfg = run.cfg
    broadcast_module(run.model)  # data-parallel: every rank starts from rank 0's weights
    broadcast_module(loss_fn)
    opt = _Optimization.create(run, loss_fn, train_loader)
    done = _Progress.resume_or_start(run, loss_fn, opt, train_loader)
    if done.complete:
        return done.best, done.history, done.probes
    epoch = done.epoch
    try:
        for epoch in range(done.epoch + 1, cfg.epochs + 1):
            sums, seen, clock, started = _train_epoch(run, compute_loss, loss_fn, opt, train_loader, epoch,
                                                      done.probes)
            row, dev = _epoch_row(run, epoch, sums, seen, clock, started)
            done.record(epoch, row, dev, run.model)
            if run.resume:
                done.save(run, loss_fn, opt, train_loader, epoch, complete=False)
            if report_epoch is not None:
                report_epoch(epoch, row["dev_avg_f1"])
    except KeyboardInterrupt:
        raise done.interrupted(run, epoch) from None
    if run.resume:
        done.save(run, loss_fn, opt, train_loader, cfg.epochs, complete=True)
    return done.best, done.history, done.probes


def _train_epoch(run: RunContext, compute_loss, loss_fn: nn.Module, opt: _Optimization, train_loader, epoch: int,
                 probes: list[dict]) -> tuple[dict[str, float], int, dict[str, float], float]:
    """One pass over the training batches: (sample-weighted loss sums, samples, where the time went, start)."""
    cfg, device = run.cfg, run.device
    sums: dict[str, float] = {}
    # Where the epoch's time goes (CPU ops are synchronous, so the clock splits them exactly).
    clock = {"data": 0.0, "model": 0.0, "optimizer": 0.0}
    run.model.train()
    seen, start = 0, time.perf_counter()
    bar = tqdm(train_loader, total=opt.steps_per_epoch, desc=f"{run.role} epoch {epoch}/{cfg.epochs}")
    tick = time.perf_counter()
    for step, batch in enumerate(bar):
        if step >= opt.steps_per_epoch:
            break
        fetched = time.perf_counter()
        n = len(batch["index"])
        with autocast(device, run.bf16):
            parts = compute_loss(batch)
        global_step = (epoch - 1) * opt.steps_per_epoch + step
        if cfg.probe_every and global_step % cfg.probe_every == 0 and is_main():
            probes.extend(_probe_rows(parts, loss_fn, run.model, global_step, epoch))
        opt.backward(parts["total"], n, device)
        computed = time.perf_counter()
        opt.update(cfg.grad_clip)
        stepped = time.perf_counter()
        clock["data"] += fetched - tick
        clock["model"] += computed - fetched  # forward and backward
        clock["optimizer"] += stepped - computed
        seen += n
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
        # refresh=False: the bar redraws on its own schedule (mininterval), not once per step.
        bar.set_postfix(loss=f"{sums['total'] / seen:.4f}", sps=f"{seen / (time.perf_counter() - start):.1f}",
                        refresh=False)
        progress.update(f"{run.role} epoch {epoch}/{cfg.epochs}, step {step + 1}/{opt.steps_per_epoch}, "
                        f"train loss {sums['total'] / seen:.4f}",
                        fraction=(epoch - 1 + (step + 1) / opt.steps_per_epoch) / cfg.epochs)
        tick = time.perf_counter()
    return sums, seen, clock, start


def _probe_rows(parts, loss_fn: nn.Module, model: nn.Module, global_step: int, epoch: int) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"step": global_step, "epoch": epoch, "term": term, "weighted_value": value, "grad_norm": norm}
            for term, (value, norm) in probe_terms(parts, loss_fn.weights, params).items()]


def _epoch_row(run: RunContext, epoch: int, sums: dict[str, float], seen: int, clock: dict[str, float],
               started: float) -> tuple[dict, dict]:
    """The epoch's history row (global mean losses over every rank, dev scores, seconds since `started`,
    the dev evaluation included) and its dev metrics (rank 0 evaluates, once). Data-parallel, BatchNorm
    statistics are averaged over the ranks first."""
    if world_size() > 1:
        totals = all_reduce_sum(torch.tensor([seen, *sums.values()], dtype=torch.float64, device=run.device))
        seen, sums = int(totals[0]), dict(zip(sums, totals[1:].tolist()))
        average_float_buffers(run.model)
    dev = broadcast_object(run.evaluate("dev")[0] if is_main() else None)
    row = {"epoch": epoch, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
           "dev_avg_f1": dev["avg_f1"], "train_seconds": time.perf_counter() - started,
           "train_samples": seen, **{f"seconds_{k}": round(v, 3) for k, v in clock.items()},
           **{f"dev_{t}_f1": dev[t]["f1_macro"] for t in dev if isinstance(dev[t], dict)}}
    tqdm.write(f"{run.role} epoch {epoch}: train loss {row['train_total']:.4f}, dev avg F1 {dev['avg_f1']:.4f}")
    progress.update(f"{run.role} epoch {epoch}/{run.cfg.epochs} done", fraction=epoch / run.cfg.epochs,
                    dev=dev["avg_f1"])
    return row, dev


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
    save_checkpoint(ckpt, run.model, run.model_cfg, run.data.vocab, run.data.config,
                    {"best_epoch": best.epoch, **(extra or {})})
    results = {"dev": best.dev}
    for split in ("dev", "test") if evaluate_test else ("dev",):
        metrics, frame = run.evaluate(split)
        results[split] = metrics
        atomic_write(out_dir / f"predictions_{split}.csv", lambda p, f=frame: f.to_csv(p, index=False))
    seconds = time.perf_counter() - run.started
    summary = {"parameters": n_params, "best_epoch": best.epoch, "seed": run.cfg.seed, "seconds": round(seconds, 1),
               "tasks": list(run.data.vocab.tasks), **results,
               "environment": {**environment(run.device, run.bf16, run.cfg.precision), "world_size": world_size(),
                               "trunk_cache_mb": round(run.trunks.nbytes / 2**20, 1) if run.trunks else 0.0}}
    write_json(out_dir / "metrics.json", summary)
    atomic_write(out_dir / "history.csv", lambda p: pd.DataFrame(history).to_csv(p, index=False))
    if probes:
        atomic_write(out_dir / "loss_terms.csv", lambda p: pd.DataFrame(probes).to_csv(p, index=False))
    broadcast_object((results, seconds))
    barrier()
    return RunResult(ckpt, best.epoch, results["dev"], results.get("test"), history, n_params, seconds)


def _model_trunks(model: MultimodalClassifier, data: PreparedData, tokenizer, role: str, cfg: TrainConfig,
                  device: torch.device, bf16: bool, trunk_dir: Path | None) -> TrunkCache | None:
    """The run's trunk cache, when its model has frozen trunks and `cfg.trunk_cache` is on."""
    if not cfg.trunk_cache:
        return None
    return model_trunks(model, data, tokenizer, role, TrunkRun(device, bf16, trunk_dir, cfg.eval_batch_size,
                                                               cfg.channels_last), augment=cfg.augment)


def training_set(data: PreparedData, tokenizers: Mapping, cfg: TrainConfig, reads_teacher: bool):
    """The samples a run trains on: every training image when it reads the teacher (whose outputs cover
    them all); otherwise only those whose labels it may see (`data.<d>.label_fraction`)."""
    dataset = data.dataset("train", tokenizers, augment=cfg.augment)
    labelled = data.labelled_train()
    return dataset if reads_teacher or len(labelled) == len(dataset) else dataset.restricted(labelled)


def train_teacher(data: PreparedData, model_cfg: ModelConfig, cfg: TrainConfig, out_dir: Path,
                  checkpoint_path: Path | None = None, resume_path: Path | None = None,
                  trunk_dir: Path | None = None, loss_cfg: LossConfig | None = None) -> RunResult:
    """Phase 1: the teacher learns both tasks from the labels (CE + CE; `loss_cfg` may weigh the classes).

    Metrics, predictions and history go to `out_dir`; the checkpoint to `checkpoint_path`
    (default `out_dir/model.pt`). With `resume_path` the run saves its state after each epoch
    there and continues from it when re-run with the same settings and data. Frozen trunks
    (`model_cfg`'s train_blocks) are read from the trunk cache in `trunk_dir` (medkd.engine.trunks).
    """
    started = time.perf_counter()
    seed_everything(cfg.seed)
    device, bf16 = training_device(cfg)
    model = _trainable(build_model(model_cfg, data.vocab.num_classes).to(device), cfg)
    loss_cfg = loss_cfg or LossConfig.from_dict({"ce": {"weight": 1.0}})
    if loss_cfg.uses_teacher:
        raise ValueError(f"a teacher learns from labels only; its loss has teacher terms {loss_cfg.active_terms}")
    resume = Resume(Path(resume_path), run_state_key("teacher", model_cfg.to_dict(), cfg.to_dict(),
                                                   data.content_key("train"), loss_cfg.to_dict())) if resume_path else None
    tokenizer = build_tokenizer(model_cfg.text, model_cfg.text_weights)
    run = RunContext(model, model_cfg, data, tokenizer, "teacher", cfg, device, out_dir, checkpoint_path, started,
                     resume, bf16, _model_trunks(model, data, tokenizer, "teacher", cfg, device, bf16, trunk_dir))
    loss_fn = CombinedLoss.from_config(loss_cfg, LossContext(
        model.fusion_dim, None, len(data.records["train"]), train_labels=data.labels["train"],
        num_classes=data.vocab.num_classes))
    loader = make_loader(training_set(data, {"teacher": run.tokenizer}, cfg, reads_teacher=False), cfg.batch_size,
                         shuffle=True, seed=cfg.seed, by_length=cfg.train_by_length)

    def compute_loss(batch):
        out = model(*run.inputs(batch), **run.trunk_inputs(batch))
        return loss_fn(out, None, batch["labels"].to(device))

    best, history, probes = _fit(run, compute_loss, loss_fn, loader)
    return _finish(run, best, history, probes=probes)


@dataclass(frozen=True)
class TeacherSource:
    """Where a student's teacher outputs come from. Read only when the loss uses the teacher (not by the
    no-KD control, CE only: then the checkpoint need not even exist)."""

    checkpoint: Path | None = None
    cache_path: Path | None = None  # the teacher cache file (default: <out_dir>/teacher_cache.pt)
    outputs: Mapping | None = None  # a teacher cache already loaded (e.g. once for all Optuna trials)
    live: bool | None = None  # run the teacher on every batch under no_grad; None: only with augmentation
    rebuild_stale: bool = True  # False: a missing or stale cache file is an error (a stage must not rewrite another's)
    rebuild_with: str | None = None  # with rebuild_stale=False: the command that makes the cache (for the error)


@dataclass(frozen=True)
class Distillation:
    """One student run: what it trains (model, loss, schedule), from which teacher, where it writes.

    `checkpoint_path` (default `out_dir/model.pt`); `resume_path`: per-epoch state saved and resumed
    (see `train_teacher`); `trunk_dir`: the trunk cache of the student's frozen trunks; `report_epoch`:
    called with (epoch, dev avg F1) after each epoch (Optuna's pruning).
    """

    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    out_dir: Path
    teacher: TeacherSource = TeacherSource()
    checkpoint_path: Path | None = None
    resume_path: Path | None = None
    trunk_dir: Path | None = None
    evaluate_test: bool = True
    report_epoch: Callable[[int, float], None] | None = None


@dataclass
class _Teacher:
    """The teacher side of a run, decided once (`_resolve_teacher`): none, its cached outputs, or live."""

    mode: str  # "none" | "cache" | "live"
    identity: str  # what the run's resume key records of it
    dims: Mapping[str, int] | None = None
    outputs: Mapping[str, torch.Tensor] | None = None
    model: nn.Module | None = None
    tokenizer: object | None = None

    def __call__(self, batch: Mapping[str, torch.Tensor], index: torch.Tensor, device: torch.device,
                 channels_last: bool) -> dict[str, torch.Tensor] | None:
        if self.mode == "cache":
            return {k: v[index] for k, v in self.outputs.items()}
        if self.mode == "live":
            with torch.no_grad():
                return self.model(*batch_inputs(batch, "teacher", device, channels_last))
        return None


def _resolve_teacher(run: Distillation, data: PreparedData, device: torch.device) -> _Teacher:
    cfg, source = run.train, run.teacher
    if not run.loss.uses_teacher:
        return _Teacher("none", "no teacher")
    live = cfg.augment if source.live is None else source.live
    if cfg.augment and not live:
        raise ValueError("a teacher cache cannot serve randomly augmented inputs; use TeacherSource(live=True)")
    if live:
        teacher, payload = load_checkpoint(source.checkpoint, device)
        if payload["data"]["image_size"] != data.config.image_size:
            raise ValueError(f"the teacher {source.checkpoint} reads {payload['data']['image_size']} px images and "
                             f"this student {data.config.image_size} px: a live teacher (augmentation) sees the "
                             "student's batches, so both need one image size; without augmentation the teacher "
                             "cache serves any size")
        teacher = memory_format(teacher, cfg).eval().requires_grad_(False)
        return _Teacher("live", state_fingerprint(teacher.state_dict()), payload["dims"], model=teacher,
                        tokenizer=model_tokenizer(payload))
    cache = source.outputs
    if cache is None:
        cache_path = Path(source.cache_path) if source.cache_path else Path(run.out_dir) / "teacher_cache.pt"
        cache = load_or_build_teacher_cache(source.checkpoint, data, cfg, cache_path, device,
                                            rebuild_stale=source.rebuild_stale, trunk_dir=run.trunk_dir,
                                            rebuild_with=source.rebuild_with)
    return _Teacher("cache", cache["key"], cache["dims"], outputs={k: v.to(device) for k, v in cache["outputs"].items()})


def distill_student(data: PreparedData, run: Distillation) -> RunResult:
    """Phase 2: the student learns from the labels and the frozen teacher (CombinedLoss).

    The teacher's outputs come from its cache, computed once (the default: inputs are deterministic),
    from the live teacher under no_grad (with random augmentation), or not at all (a loss without
    teacher terms). The student's frozen trunks are read from the trunk cache (see `train_teacher`).
    """
    started = time.perf_counter()
    cfg, model_cfg, loss_cfg = run.train, run.model, run.loss
    seed_everything(cfg.seed)
    device, bf16 = training_device(cfg)
    teacher = _resolve_teacher(run, data, device)
    tokenizers = {"student": build_tokenizer(model_cfg.text, model_cfg.text_weights), **({"teacher": teacher.tokenizer} if teacher.tokenizer else {})}
    seed_everything(cfg.seed)
    student = _trainable(build_model(model_cfg, data.vocab.num_classes).to(device), cfg)
    resume = Resume(Path(run.resume_path), run_state_key(
        "student", model_cfg.to_dict(), loss_cfg.to_dict(), cfg.to_dict(), data.content_key("train"),
        teacher.identity)) if run.resume_path else None
    context = RunContext(student, model_cfg, data, tokenizers["student"], "student", cfg, device, run.out_dir,
                         run.checkpoint_path, started, resume, bf16,
                         _model_trunks(student, data, tokenizers["student"], "student", cfg, device, bf16,
                                       run.trunk_dir))
    loss_fn = CombinedLoss.from_config(loss_cfg, LossContext(
        student.fusion_dim, teacher.dims, n_data=len(data.records["train"]),
        joint_labels=data.joint_train_labels(), seed=cfg.seed, train_labels=data.labels["train"],
        num_classes=data.vocab.num_classes)).to(device)
    train_set = training_set(data, tokenizers, cfg, reads_teacher=teacher.mode != "none")
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, by_length=cfg.train_by_length)

    def compute_loss(batch):
        index = batch["index"].to(device)
        t_out = teacher(batch, index, device, cfg.channels_last)
        s_out = student(*context.inputs(batch), **context.trunk_inputs(batch))
        return loss_fn(s_out, t_out, batch["labels"].to(device), index)

    best, history, probes = _fit(context, compute_loss, loss_fn, loader, run.report_epoch)
    return _finish(context, best, history, {"loss_config": loss_cfg.to_dict(),
                                            "teacher_cache_used": teacher.mode == "cache",
                                            "teacher_used": teacher.mode != "none"},
                   evaluate_test=run.evaluate_test, probes=probes)
