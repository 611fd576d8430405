"""`medkd demo` (`make demo`): a small real model to try in a few minutes, without the study.

The study's primary student (its backbones, pretrained, from the offline weights) with both backbones
frozen: their outputs are computed once (the trunk cache) and only the projections, fusion and heads
train, on the labels alone (the no-KD control's loss), for a few epochs on MedPix-2.0's training split.
It is exported like the study's models (ONNX fp32 and int8, with its preprocessing) to
`models/demo/export/`, and `medkd predict` then classifies a few real test images, shown beside their
true labels. Nothing of the study's outputs is touched; `models/demo/` is not tracked by git or DVC.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from medkd.config.configs import ModelConfig
from medkd.config.params import load_params, project_root
from medkd.config.sections import student_configs
from medkd.config.study import primary_student
from medkd.data.prepared import load_data
from medkd.deploy import onnx_export
from medkd.engine.loop import Distillation, TeacherSource, distill_student
from medkd.models.backbones import build_tokenizer
from medkd.models.checkpoint import load_checkpoint
from medkd.pipeline.paths import Paths

DEMO = Path("models") / "demo"
EPOCHS, LR, BATCH = 8, 1e-3, 32  # frozen trunks: only the heads train, so a larger step and more epochs


def train_demo(root: Path, folder: Path) -> tuple[Path, object]:
    """The primary student with frozen backbones, trained on the labels; (checkpoint, its data)."""
    params = load_params(root)
    student = primary_student(params) or next(iter(params["students"]))
    data = load_data(params, params["students"][student]["dataset"], root)
    model_cfg, loss_cfg, train_cfg = student_configs(params, student, "no-kd" if "no-kd" in params["distill"] else "tuned")
    model_cfg = dataclasses.replace(model_cfg, vision_train_blocks=0, text_train_blocks=0)
    loss_cfg = loss_cfg.model_copy(update={name: None for name in ("kl", "mse", "crd")})  # the labels alone
    train_cfg = dataclasses.replace(train_cfg, epochs=EPOCHS, lr=LR, batch_size=BATCH, probe_every=0)
    print(f"training {student} ({model_cfg.vision} + {model_cfg.text}, both frozen: the heads train) "
          f"for {EPOCHS} epochs on {len(data.records['train'])} {data.config.spec.title} training images", flush=True)
    run = distill_student(data, Distillation(model_cfg, loss_cfg, train_cfg, folder / "run", TeacherSource(),
                                             trunk_dir=Paths(root).trunks()))
    print(f"dev avg macro-F1 {run.dev['avg_f1']:.3f} (best epoch {run.best_epoch}), test {run.test['avg_f1']:.3f}; "
          "the study fine-tunes the backbones' top blocks too (reports/results/results.md)", flush=True)
    return run.checkpoint, data


def export_demo(checkpoint: Path, data, folder: Path) -> Path:
    classifier, payload = load_checkpoint(checkpoint)
    model_cfg = ModelConfig.from_dict(payload["model_config"])
    tokenizer = build_tokenizer(model_cfg.text, model_cfg.text_weights)
    sample = data.dataset("test", {onnx_export.ROLE: tokenizer}).collate([0, 1])
    return onnx_export.export_model(classifier.float().eval(), model_cfg, tokenizer, sample,
                                    onnx_export.Preprocessing.of(data.config, data.vocab), folder)


def cases(data, count: int) -> pd.DataFrame:
    """`count` test images, as many different (task 1, task 2) labels as there are, with their captions."""
    chosen, seen = [], set()
    for record in data.records["test"]:
        if record.labels not in seen:
            chosen.append(record)
            seen.add(record.labels)
        if len(chosen) == count:
            break
    tasks = data.vocab.tasks
    return pd.DataFrame([{"image": str(r.image_path), "text": r.text, f"{tasks[0]}_true": r.labels[0],
                          f"{tasks[1]}_true": r.labels[1]} for r in chosen])


def demo(root: Path | None = None, count: int = 6) -> int:
    started = time.perf_counter()
    root = (root or project_root()).resolve()
    folder = root / DEMO
    checkpoint, data = train_demo(root, folder)
    exported = export_demo(checkpoint, data, folder / "export")
    print(f"exported to {exported.relative_to(root)} (ONNX fp32 and int8, preprocessing, tokenizer)", flush=True)
    table = cases(data, count)
    table[["image", "text"]].to_csv(folder / "cases.csv", index=False)
    command = ["medkd", "predict", str(exported.relative_to(root)), "--csv", str((folder / "cases.csv").relative_to(root)),
               "--out", str((folder / "predictions.csv").relative_to(root))]
    print(f"$ {shlex.join(command)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "medkd", *command[1:]], cwd=root)
    if done.returncode:
        return done.returncode
    predicted = pd.read_csv(folder / "predictions.csv")
    rows = [["image", *(f"{task}: true -> predicted (probability)" for task in data.vocab.tasks)]]
    for (_, case), (_, pred) in zip(table.iterrows(), predicted.iterrows()):
        rows.append([Path(case["image"]).name, *(
            f"{case[f'{task}_true']} -> {pred[f'{task}_pred']} ({pred[f'{task}_prob']:.2f})"
            + ("" if pred[f"{task}_pred"] == case[f"{task}_true"] else "  WRONG") for task in data.vocab.tasks)])
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    print("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows))
    print(f"demo done in {time.perf_counter() - started:.0f} s; try it on your own image: medkd predict "
          f"{exported.relative_to(root)} --image <file> --text '<caption>'")
    return 0
