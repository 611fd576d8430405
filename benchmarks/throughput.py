"""Where the time goes: throughput of the teacher and each student of params.yaml on this machine.

For every model (random weights: speed does not depend on them), with the speed switches off
(baseline) and on (optimised), side by side:
- training samples/s (a student step reads the cached teacher outputs), measured on the second
  epoch so that one-off kernel set-up is excluded, and the share of a step spent outside the
  model (data: batching, collation; optimizer: clipping, AdamW, schedule);
- evaluation samples/s and, for the teacher, teacher-cache build samples/s;
- FLOPs per sample counted by PyTorch's `torch.utils.flop_counter.FlopCounterMode` (forward;
  a training step = 3x, see `forward_flops_per_sample`), the achieved GFLOP/s of the model's
  forward+backward, and that as a share of this machine's dense-matmul ceiling measured in the
  same run (`torch.mm` of 2048 x 2048: fp32, and bf16 only where the CPU has bf16 instructions; an
  emulated bf16 matmul would take minutes and measure nothing a run would use).

    .venv/bin/python benchmarks/throughput.py [--steps 8] [--medpix ../shared/data/medpix-2.0]
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the table
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
from torch.utils.flop_counter import FlopCounterMode

from medkd.config.configs import TrainConfig
from medkd.config.sections import student_configs, teacher_configs
from medkd.data.prepared import DataConfig, PreparedData, make_loader
from medkd.engine.evaluation import autocast, batch_inputs, evaluate
from medkd.engine.loop import Distillation, TeacherSource, distill_student, train_teacher
from medkd.engine.teacher_cache import build_teacher_cache
from medkd.models.backbones import build_tokenizer
from medkd.models.checkpoint import save_checkpoint
from medkd.models.classifier import build_model
from medkd.util.environment import bf16_is_native, cpu_model, resolve_device, uses_bf16

_OFF = {"channels_last": False, "fused_optimizer": False, "eval_by_length": False, "train_by_length": False,
        "compile": False}
_DEFAULT = {k: getattr(TrainConfig(), k) for k in _OFF}
# "optimised" is the engine's defaults; each "+switch" adds one switch the defaults leave off.
SWITCHES = {"baseline": _OFF, "optimised": _DEFAULT,
            **{f"+{k}": {**_DEFAULT, k: True} for k, on in _DEFAULT.items() if not on}}


def matmul_ceiling(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a dense n x n matmul in `dtype` on this machine."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def subset(data: PreparedData, sizes: dict[str, int]) -> PreparedData:
    for split, n in sizes.items():
        data.records[split], data.labels[split] = data.records[split][:n], data.labels[split][:n]
        data.images(split)  # decode now, not inside a timed loop
    return data


def forward_flops_per_sample(model, batch, cfg: TrainConfig, role: str, device) -> float:
    """FLOPs of one forward pass per sample, counted by FlopCounterMode.

    A training step is counted as 3x this (forward + a backward of twice the forward's matmul
    work). FlopCounterMode's own backward count is not used: it counts the backward of a grouped
    (depthwise) convolution as if it were dense, `groups` times too much (65x the forward instead of
    2x for a 64-channel depthwise 3x3), which inflates MobileNet/EfficientNet steps about 6x.
    """
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), \
            autocast(device, uses_bf16(cfg.precision, device)):
        model(*batch_inputs(batch, role, device, cfg.channels_last))
    return counter.get_total_flops() / len(batch["index"])


def measure(name: str, role: str, model_cfg, loss_cfg, cfg: TrainConfig, data: PreparedData, teacher_ckpt: Path,
            cache_path: Path, tmp: Path) -> dict:
    device = resolve_device(cfg.device)
    if role == "teacher":
        run = train_teacher(data, model_cfg, cfg, tmp / f"{name}-run")
    else:
        run = distill_student(data, Distillation(model_cfg, loss_cfg, cfg, tmp / f"{name}-run",
                                                 TeacherSource(teacher_ckpt, cache_path=cache_path, rebuild_stale=False),
                                                 evaluate_test=False))
    epoch = run.history[-1]  # the second epoch: kernels set up, caches warm
    busy = epoch["seconds_data"] + epoch["seconds_model"] + epoch["seconds_optimizer"]
    model = build_model(model_cfg, data.vocab.num_classes, pretrained=False).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    tokenizer = build_tokenizer(model_cfg.text, model_cfg.text_weights)
    evaluate(model, data, "dev", tokenizer, role, cfg, device)  # warm-up
    started = time.perf_counter()
    evaluate(model, data, "dev", tokenizer, role, cfg, device)
    eval_rate = len(data.records["dev"]) / (time.perf_counter() - started)
    # A training batch (random order: padded as in training) for the FLOP count.
    batch = next(iter(make_loader(data.dataset("train", {role: tokenizer}), cfg.batch_size, shuffle=True)))
    eval_flops = forward_flops_per_sample(model, batch, cfg, role, device)
    train_flops = 3 * eval_flops
    first = run.history[0]
    return {"train_sps": epoch["train_samples"] / busy, "eval_sps": eval_rate,
            "first_epoch_extra_s": first["train_seconds"] - epoch["train_seconds"],
            "outside_model": (epoch["seconds_data"] + epoch["seconds_optimizer"]) / busy,
            "data_share": epoch["seconds_data"] / busy, "optimizer_share": epoch["seconds_optimizer"] / busy,
            "train_gflop_per_sample": train_flops / 1e9, "eval_gflop_per_sample": eval_flops / 1e9,
            "train_gflops": train_flops * epoch["train_samples"] / epoch["seconds_model"] / 1e9,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--dataset", default="medpix")
    parser.add_argument("--medpix", type=Path, default=None, help="data folder (default: the params' data root)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per epoch (two epochs, the second timed)")
    parser.add_argument("--eval-samples", type=int, default=96)
    parser.add_argument("--only", nargs="*", default=None, help="model names to measure (teacher, student names)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating baseline/optimised runs; medians reported")
    parser.add_argument("--variants", nargs="*", default=["baseline", "optimised"], choices=list(SWITCHES),
                        help="switch sets to compare with the first (+name: the defaults plus one switch)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args()
    params = yaml.safe_load(args.params.read_text())
    section = {"name": args.dataset, **params["data"][args.dataset]}
    if args.medpix:
        section["root"] = str(args.medpix)
    data_cfg = DataConfig.from_dict(section)
    threads = torch.get_num_threads()
    native_bf16 = bf16_is_native(torch.device("cpu"))
    ceiling = {"fp32": matmul_ceiling(torch.float32),
               "bf16": matmul_ceiling(torch.bfloat16) if native_bf16 else float("nan")}
    bf16_ceiling = f"{ceiling['bf16']:.0f} GFLOP/s" if native_bf16 else "not measured (emulated on this CPU)"
    print(f"matmul ceiling 2048^2: fp32 {ceiling['fp32']:.0f} GFLOP/s, bf16 {bf16_ceiling} ({threads} threads)",
          flush=True)

    teacher_cfg, teacher_train = teacher_configs(params, args.dataset)
    teacher_cfg = replace(teacher_cfg, pretrained=False)
    models = [("teacher", "teacher", teacher_cfg, None, teacher_train)]
    for student, spec in params["students"].items():
        if spec["dataset"] == args.dataset:
            model_cfg, loss_cfg, train_cfg = student_configs(params, student, "tuned")
            # A small subset can lack a class, which balanced weights refuse; speed does not depend on them.
            loss_cfg = loss_cfg.model_copy(update={"ce": loss_cfg.ce.model_copy(update={"class_weights": "none"})})
            models.append((student, "student", replace(model_cfg, pretrained=False), loss_cfg, train_cfg))
    if args.only:
        models = [m for m in models if m[0] in args.only]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        setups = {}
        for variant in args.variants:
            switches = SWITCHES[variant]
            base = TrainConfig(**{**teacher_train.to_dict(), **switches, "epochs": 2, "max_steps_per_epoch": args.steps})
            n_train = args.steps * base.batch_size
            data = subset(PreparedData.load(data_cfg), {"train": n_train, "dev": args.eval_samples,
                                                        "test": args.eval_samples})
            teacher_ckpt, cache_path = tmp / f"teacher-{variant}.pt", tmp / f"cache-{variant}.pt"
            torch.manual_seed(0)
            save_checkpoint(teacher_ckpt, build_model(teacher_cfg, data.vocab.num_classes), teacher_cfg, data.vocab, data.config)
            torch.save(build_teacher_cache(teacher_ckpt, data, base), cache_path)  # also the warm-up
            setups[variant] = (switches, base, data, teacher_ckpt, cache_path)
        # Baseline and optimised alternate, repeat after repeat: drift of the machine's speed hits both alike.
        for repeat in range(args.repeats):
            for name, role, model_cfg, loss_cfg, train_cfg in models:
                for variant, (switches, base, data, teacher_ckpt, cache_path) in setups.items():
                    cache_rate = None
                    if role == "teacher":
                        started = time.perf_counter()
                        build_teacher_cache(teacher_ckpt, data, base)
                        cache_rate = len(data.records["train"]) / (time.perf_counter() - started)
                    cfg = TrainConfig(**{**train_cfg.to_dict(), **switches, "epochs": 2,
                                         "max_steps_per_epoch": args.steps})
                    loss_cfg = loss_cfg or student_configs(params, next(iter(params["students"])), "tuned")[1]
                    result = measure(name, role, model_cfg, loss_cfg, cfg, data, teacher_ckpt, cache_path, tmp)
                    precision = "bf16" if uses_bf16(cfg.precision, resolve_device(cfg.device)) else "fp32"
                    result.update(model=name, backbones=f"{model_cfg.vision} + {model_cfg.text}", variant=variant,
                                  repeat=repeat, cache_build_sps=cache_rate, precision=precision,
                                  ceiling_share=result["train_gflops"] / ceiling[precision])
                    rows.append(result)
                    print(f"{variant:>9} {name:<28} train {result['train_sps']:6.1f}/s  eval {result['eval_sps']:6.1f}/s"
                          f"  outside model {100 * result['outside_model']:4.1f}%  {result['train_gflops']:5.0f} GFLOP/s "
                          f"({100 * result['ceiling_share']:.0f}% of {precision})", flush=True)
    frame = pd.DataFrame(rows)
    table = table_of(frame, args.variants)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
               "torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(),
               "platform": platform.platform(), "ceiling_gflops": ceiling,
               "image_size": data_cfg.image_size, "max_length": data_cfg.max_length, "steps": args.steps}
    print()
    print(f"Machine: {machine['cpu']}, {machine['cores']} cores, {threads} torch threads, torch {torch.__version__} "
          f"({machine['isa']}); ceiling fp32 {ceiling['fp32']:.0f} / bf16 {ceiling['bf16']:.0f} GFLOP/s")
    print(table.to_markdown(index=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


def table_of(frame: pd.DataFrame, variants: list[str]) -> pd.DataFrame:
    """Each variant against the first (medians over the repeats), with the ratios."""
    medians = frame.groupby(["model", "variant"], sort=False).median(numeric_only=True).reset_index()
    labels = frame.drop_duplicates("model").set_index("model")["backbones"]
    medians["backbones"] = medians["model"].map(labels)
    reference = variants[0]
    base = medians[medians.variant == reference].set_index("model")
    rows = []
    for variant in variants[1:]:
        fast = medians[medians.variant == variant].set_index("model")
        for model in base.index:
            b, f = base.loc[model], fast.loc[model]
            rows.append({
                "model": f"{model} ({b.backbones}, {b.parameters_m:.1f}M)",
                "variant": f"{reference} → {variant}",
                "GFLOP/sample train": f"{b.train_gflop_per_sample:.2f}",
                "train samples/s": f"{b.train_sps:.1f} → {f.train_sps:.1f} (×{f.train_sps / b.train_sps:.2f})",
                "train ratio per repeat": ratios(frame, model, "train_sps", reference, variant),
                "eval samples/s": f"{b.eval_sps:.1f} → {f.eval_sps:.1f} (×{f.eval_sps / b.eval_sps:.2f})",
                "cache build samples/s": (f"{b.cache_build_sps:.1f} → {f.cache_build_sps:.1f} "
                                          f"(×{f.cache_build_sps / b.cache_build_sps:.2f})"
                                          if pd.notna(b.get("cache_build_sps")) else ""),
                "achieved GFLOP/s (share of ceiling)": f"{b.train_gflops:.0f} ({100 * b.ceiling_share:.0f}%) → "
                                                       f"{f.train_gflops:.0f} ({100 * f.ceiling_share:.0f}%)",
                "outside the model": f"{100 * b.outside_model:.0f}% → {100 * f.outside_model:.0f}%",
                "first-epoch extra s": f"{b.first_epoch_extra_s:.0f} → {f.first_epoch_extra_s:.0f}",
            })
    return pd.DataFrame(rows)


def ratios(frame: pd.DataFrame, model: str, column: str, reference: str, variant: str) -> str:
    """variant/reference of each repeat: the spread says how much of a ratio is noise."""
    sub = frame[frame.model == model].pivot(index="repeat", columns="variant", values=column)
    return ", ".join(f"{r:.2f}" for r in sub[variant] / sub[reference])


if __name__ == "__main__":
    main()
