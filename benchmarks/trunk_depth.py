"""How many top blocks should train? Cost and dev F1 of full fine-tuning vs frozen trunks.

For the teacher and the primary student of params.yaml, on the real data, in the run's precision:
for each depth (`all`: full fine-tuning; k: the top k blocks of both backbones train, the rest is
a cached frozen trunk; 0: both trunks frozen whole):
- the one-time trunk pass (every split, both backbones; paid once per backbone and depth by the
  whole study) in seconds;
- training samples/s and seconds per run (training + the per-epoch dev evaluation) at the
  study's epochs, and the dev avg macro-F1 that run reaches (the teacher with its own recipe, one
  seed; the student as the no-KD control, CE only, on `--student-seeds`);
- at equal wall-clock: a frozen depth trained for as many epochs as fit in full fine-tuning's
  seconds (at most `--max-epochs`), and the best dev F1 it reached within that time.
Only dev F1 is reported (choose on dev). Results: benchmarks/results/trunk_depth.json and a table on stdout.

    .venv/bin/python benchmarks/trunk_depth.py [--depths all 2 0] [--student-seeds 42 43]
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import yaml

import medkd.engine.trunks as trunks
from medkd.config.configs import TrainConfig
from medkd.config.sections import student_configs, teacher_configs
from medkd.config.stage_settings import optuna_section
from medkd.data.prepared import load_data
from medkd.engine.loop import Distillation, TeacherSource, distill_student, train_teacher
from medkd.models.backbones import build_tokenizer
from medkd.models.classifier import build_model
from medkd.util.environment import cpu_model, resolve_device, uses_bf16


def depth_config(model_cfg, depth: str):
    blocks = "all" if depth == "all" else int(depth)
    return replace(model_cfg, vision_train_blocks=blocks, text_train_blocks=blocks)


def trunk_pass(model_cfg, data, cfg: TrainConfig, folder: Path) -> float:
    """Seconds to compute a model's frozen trunks for every split (0 for full fine-tuning)."""
    if not model_cfg.frozen_trunks:
        return 0.0
    device = resolve_device(cfg.device)
    model = build_model(model_cfg, data.vocab.num_classes).to(device)
    trunks._memory.clear()
    started = time.perf_counter()
    cache = trunks.model_trunks(model, data, build_tokenizer(model_cfg.text, model_cfg.text_weights), "teacher",
                                trunks.TrunkRun(device, uses_bf16(cfg.precision, device), folder, cfg.eval_batch_size))
    seconds = time.perf_counter() - started
    print(f"  trunk pass {seconds:.1f} s, {cache.nbytes / 2**20:.0f} MiB", flush=True)
    return seconds


def run(role: str, model_cfg, cfg: TrainConfig, data, loss_cfg, tmp: Path, folder: Path) -> dict:
    out = tmp / f"{role}-{time.perf_counter_ns()}"
    if role == "teacher":
        result = train_teacher(data, model_cfg, cfg, out, trunk_dir=folder)
    else:
        result = distill_student(data, Distillation(model_cfg, loss_cfg, cfg, out, TeacherSource(None),
                                                    trunk_dir=folder, evaluate_test=False))
    history = pd.DataFrame(result.history)
    train_seconds = history["train_seconds"].sum()
    return {"epochs": cfg.epochs, "dev_avg_f1": result.dev["avg_f1"], "best_epoch": result.best_epoch,
            "run_seconds": result.seconds, "train_seconds": float(train_seconds),
            "train_sps": float(history["train_samples"].sum() / train_seconds),
            "epoch_seconds": float(result.seconds / cfg.epochs),
            "dev_by_epoch": history["dev_avg_f1"].round(4).tolist(),
            "seconds_by_epoch": (result.seconds * history["train_seconds"].cumsum() / train_seconds).round(1).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--dataset", default="medpix")
    parser.add_argument("--depths", nargs="+", default=["all", "2", "0"])
    parser.add_argument("--student-seeds", nargs="+", type=int, default=[42, 43])
    parser.add_argument("--max-epochs", type=int, default=10, help="longest frozen run at equal wall-clock")
    parser.add_argument("--lr-scales", nargs="+", type=float, default=[1.0, 10.0],
                        help="frozen depths also train with lr x these (heads from scratch may want more)")
    parser.add_argument("--only", choices=["teacher", "student"], default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/trunk_depth.json"))
    args = parser.parse_args()
    root = Path.cwd()
    params = yaml.safe_load(args.params.read_text())
    data = load_data(params, args.dataset, root)
    teacher_cfg, teacher_train = teacher_configs(params, args.dataset)
    student = optuna_section(params).student
    jobs = []
    if args.only in (None, "teacher"):
        jobs.append(("teacher", teacher_cfg, teacher_train, None, [params.get("seed", 42)]))
    if args.only in (None, "student"):
        model_cfg, loss_cfg, train_cfg = student_configs(params, student, "no-kd")
        jobs.append((student, model_cfg, train_cfg, loss_cfg, args.student_seeds))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, base_cfg, base_train, loss_cfg, seeds in jobs:
            role = "teacher" if loss_cfg is None else "student"
            full_seconds = None
            for depth in args.depths:
                model_cfg = depth_config(base_cfg, depth)
                folder = tmp / "trunks"
                print(f"{name}: depth {depth}", flush=True)
                pass_seconds = trunk_pass(model_cfg, data, base_train, folder)
                for scale in [1.0] if depth == "all" else args.lr_scales:
                    for seed in seeds:
                        cfg = replace(base_train, seed=seed, lr=base_train.lr * scale)
                        result = run(role, model_cfg, cfg, data, loss_cfg, tmp, folder)
                        row = {"model": name, "backbones": f"{base_cfg.vision} + {base_cfg.text}", "depth": depth,
                               "lr": cfg.lr, "lr_scale": scale, "seed": seed, "trunk_pass_s": pass_seconds, **result}
                        if depth == "all" and seed == seeds[0]:
                            full_seconds = result["run_seconds"]
                        if depth != "all" and full_seconds:
                            # As many epochs as fit in full fine-tuning's time (the trunk pass counts).
                            fit = int((full_seconds - pass_seconds) // result["epoch_seconds"])
                            epochs = max(cfg.epochs, min(args.max_epochs, fit))
                            if epochs > cfg.epochs:
                                longer = run(role, model_cfg, replace(cfg, epochs=epochs), data, loss_cfg, tmp, folder)
                            else:
                                longer = result
                            within = [f for f, s in zip(longer["dev_by_epoch"], longer["seconds_by_epoch"])
                                      if s + pass_seconds <= full_seconds] or [float("nan")]
                            row.update(wallclock_epochs=epochs, wallclock_dev_avg_f1=max(within),
                                       wallclock_dev_by_epoch=longer["dev_by_epoch"])
                        rows.append(row)
                        print(f"  lr x{scale:g} seed {seed}: dev {result['dev_avg_f1']:.4f} in {result['run_seconds']:.0f} s "
                              f"({result['train_sps']:.1f} samples/s)"
                              + (f"; equal wall-clock ({row['wallclock_epochs']} epochs): "
                                 f"{row['wallclock_dev_avg_f1']:.4f}" if "wallclock_epochs" in row else ""), flush=True)
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        args.out.write_text(json.dumps({"machine": machine(base_train), "rows": rows}, indent=1) + "\n")
    print(summary(pd.DataFrame(rows)).to_markdown(index=False))


def machine(cfg: TrainConfig) -> dict:
    device = resolve_device(cfg.device)
    return {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
            "precision": "bf16" if uses_bf16(cfg.precision, device) else "fp32"}


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per model, depth and learning rate."""
    keys = ["model", "depth", "lr_scale"]
    numeric = [c for c in ("trunk_pass_s", "train_sps", "run_seconds", "dev_avg_f1", "wallclock_epochs",
                           "wallclock_dev_avg_f1") if c in frame]
    return frame.groupby(keys, sort=False)[numeric].mean().round(3).reset_index()


if __name__ == "__main__":
    main()
