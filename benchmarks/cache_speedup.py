"""Distillation steps/second with the teacher-output cache vs. running the teacher every step.

Same data, student, loss and seed for both; only where the teacher's outputs come from
differs. Weights are random (speed does not depend on them), so no download is needed.

    .venv/bin/python benchmarks/cache_speedup.py --steps 20 [--medpix ../shared/data/medpix-2.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medkd.catalog.synthetic import make_synthetic_medpix
from medkd.data.prepared import DataConfig, PreparedData
from medkd.engine.loop import Distillation, TeacherSource, TrainConfig, distill_student, save_checkpoint
from medkd.engine.losses import LossConfig
from medkd.models.classifier import ModelConfig, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="efficientnet-lite1+mpnet-base")
    parser.add_argument("--student", default="mobilenetv2+minilm")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="training steps timed per mode")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--medpix", default=None,
                        help="a MedPix-2.0 folder (real captions, real images); default: synthetic data")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_train = args.batch_size * args.steps
        root = args.medpix or make_synthetic_medpix(tmp / "data", sizes=(n_train, 16, 16), image_size=args.image_size)
        data = PreparedData.load(DataConfig("medpix", str(root), image_size=args.image_size,
                                            max_length=args.max_length))
        # Time the same number of samples either way: the first n_train training records.
        data.records["train"] = data.records["train"][:n_train]
        data.labels["train"] = data.labels["train"][:n_train]
        for split in ("dev", "test"):
            data.records[split], data.labels[split] = data.records[split][:32], data.labels[split][:32]
        for split in ("train", "dev", "test"):
            data.images(split)
        t_vision, t_text = args.teacher.split("+")
        s_vision, s_text = args.student.split("+")
        teacher_cfg = ModelConfig(t_vision, t_text, fusion_dim=384, fusion_heads=8)
        student_cfg = ModelConfig(s_vision, s_text, fusion_dim=384, fusion_layers=2, fusion_heads=4)
        teacher_path = tmp / "teacher.pt"
        save_checkpoint(teacher_path, build_model(teacher_cfg, data.vocab.num_classes), teacher_cfg, data.vocab, data)
        cfg = TrainConfig(epochs=1, batch_size=args.batch_size, device=args.device, precision=args.precision,
                          max_steps_per_epoch=args.steps, lr=1.05e-4)
        rates = {}
        for mode, use_cache in (("live", False), ("cached", True)):
            started = time.perf_counter()
            source = TeacherSource(teacher_path, cache_path=tmp / "cache.pt", live=not use_cache)
            run = distill_student(data, Distillation(student_cfg, LossConfig(nce_k=256), cfg, tmp / mode, source,
                                                     evaluate_test=False))
            loop = run.history[0]["train_seconds"]
            rates[mode] = args.steps / loop
            print(f"{mode:>6}: {rates[mode]:.2f} steps/s ({loop:.1f} s for {args.steps} steps; "
                  f"whole call incl. cache build + dev eval {time.perf_counter() - started:.1f} s)")
        print(f"teacher {args.teacher}, student {args.student}, {args.image_size}px, {args.max_length} tokens, "
              f"batch {args.batch_size}, precision={args.precision}, device={cfg.device}, threads={torch.get_num_threads()}")
        print(f"cached/live speed ratio: {rates['cached'] / rates['live']:.2f}x")


if __name__ == "__main__":
    main()
