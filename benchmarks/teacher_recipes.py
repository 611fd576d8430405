"""Which teacher is worth distilling? Teacher recipes on dev, beside the frozen-trunk linear probe.

Trains the teacher of params.yaml with each recipe (trainable depth, learning rate, epochs,
class-balanced CE) on the real data and records its dev avg macro-F1 and cost; then fits the
study's baseline probe: a logistic regression per task on the teacher backbones' frozen pooled
features (image and text, standardised), C chosen on dev: `medkd.engine.probe`, as stage `teacher` fits it. Dev
only: the probe predicts test as the stage does, but this script records dev numbers alone.
Results: benchmarks/results/teacher_recipes.json and a table on stdout.

    .venv/bin/python benchmarks/teacher_recipes.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import yaml

from medkd.config.loss_terms import LossConfig
from medkd.config.sections import teacher_configs
from medkd.data.prepared import load_data
from medkd.engine.loop import train_teacher
from medkd.engine.probe import linear_probe
from medkd.util.environment import cpu_model

# (name, trainable blocks of both backbones, lr, epochs, class weights)
RECIPES = [
    ("default: top 2, lr 4.8e-4, 2 epochs", 2, 4.79e-4, 2, "none"),
    ("top 2, 4 epochs", 2, 4.79e-4, 4, "none"),
    ("top 2, 4 epochs, balanced CE", 2, 4.79e-4, 4, "balanced"),
    ("top 4, 4 epochs, balanced CE", 4, 4.79e-4, 4, "balanced"),
    ("top 2, 6 epochs, balanced CE", 2, 4.79e-4, 6, "balanced"),
    ("top 2, 10 epochs, balanced CE", 2, 4.79e-4, 10, "balanced"),
    ("frozen trunks, lr 1e-3, 30 epochs, balanced CE", 0, 1.0e-3, 30, "balanced"),
    ("top 2, lr 1e-3, 10 epochs, balanced CE", 2, 1.0e-3, 10, "balanced"),
    ("top 2, lr 1.05e-4 (the students'), 6 epochs, balanced CE", 2, 1.05e-4, 6, "balanced"),
    ("top 2, lr 2e-4, 10 epochs, balanced CE", 2, 2.0e-4, 10, "balanced"),
]


def probe_summary(data, model_cfg, cfg, folder: Path) -> dict:
    """The study's own baseline (`medkd.engine.probe`, as stage `teacher` fits it), dev numbers only."""
    result = linear_probe(data, model_cfg, cfg, trunk_dir=folder)
    dev = result.metrics["dev"]
    return {"C": result.c, "dev_avg_f1": dev["avg_f1"], "dev_task_f1": [dev[t]["f1_macro"] for t in data.vocab.tasks],
            "dev_avg_f1_by_C": result.metrics["dev_avg_f1_by_C"], "seconds": result.metrics["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--dataset", default="medpix")
    parser.add_argument("--only", nargs="*", type=int, default=None, help="recipe numbers to run (default: all; "
                                                                           "none: the probe alone)")
    parser.add_argument("--trunks", type=Path, default=None, help="trunk cache folder to reuse between "
                                                                   "invocations (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_recipes.json"))
    args = parser.parse_args()
    params = yaml.safe_load(args.params.read_text())
    data = load_data(params, args.dataset, Path.cwd())
    model_cfg, train_cfg = teacher_configs(params, args.dataset)
    machine = {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    # Recipes run earlier on the same machine kind stay in the file; a recipe run again replaces its row.
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {}
    chosen = {name for number, (name, *_) in enumerate(RECIPES) if args.only is None or number in args.only}
    rows = [r for r in earlier.get("recipes", []) if earlier.get("machine") == machine and r["recipe"] not in chosen]
    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "probe": probe, "recipes": rows}, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.trunks or Path(tmp) / "trunks"
        probe = probe_summary(data, model_cfg, train_cfg, folder)
        print(f"linear probe (C {probe['C']}): dev {probe['dev_avg_f1']:.4f} ({probe['seconds']:.0f} s)", flush=True)
        save()
        for number, (name, blocks, lr, epochs, weights) in enumerate(RECIPES):
            if args.only is not None and number not in args.only:
                continue
            cfg = replace(train_cfg, lr=lr, epochs=epochs)
            recipe_cfg = replace(model_cfg, vision_train_blocks=blocks, text_train_blocks=blocks)
            started = time.perf_counter()
            result = train_teacher(data, recipe_cfg, cfg, Path(tmp) / f"recipe{number}", trunk_dir=folder,
                                   loss_cfg=LossConfig.from_dict({"ce": {"weight": 1.0, "class_weights": weights}}))
            history = pd.DataFrame(result.history)
            rows.append({"recipe": name, "train_blocks": blocks, "lr": lr, "epochs": epochs, "class_weights": weights,
                         "dev_avg_f1": result.dev["avg_f1"], "best_epoch": result.best_epoch,
                         "dev_by_epoch": history["dev_avg_f1"].round(4).tolist(),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(f"{name}: dev {result.dev['avg_f1']:.4f} (best epoch {result.best_epoch}) in {rows[-1]['seconds']} s",
                  flush=True)
            save()
    if rows:
        print(pd.DataFrame(rows)[["recipe", "dev_avg_f1", "best_epoch", "seconds"]].to_markdown(index=False))


if __name__ == "__main__":
    main()
