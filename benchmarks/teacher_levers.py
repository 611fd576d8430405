"""Which teacher leads its students? The levers of docs/teacher.md, measured on dev with their cost.

Each recipe trains the teacher of params.yaml (its backbones, pretrained) on the real training split,
once per seed, and records per seed: dev avg macro-F1, the epoch kept, the seconds it took, and how
sure the teacher is of its answers (mean top-class probability per task) on the training images,
which are all that distillation reads, and on dev. Several seeds are also scored as an ensemble
(the members' logits averaged: Hinton et al.), and every recipe is compared with the primary student
trained alone (its committed no-KD runs, or --student runs), as a paired dev interval over images and
seeds. Dev only: test is never read. Results: benchmarks/results/teacher_levers.json, the dev
predictions under benchmarks/results/teacher_levers/, and a table on stdout.

    .venv/bin/python benchmarks/teacher_levers.py --only frozen-112 frozen-224
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from medkd.config.configs import data_config
from medkd.config.loss_terms import LossConfig
from medkd.config.sections import teacher_configs
from medkd.data.prepared import PreparedData
from medkd.engine.loop import train_teacher
from medkd.engine.probe import linear_probe
from medkd.engine.teacher_cache import build_teacher_cache
from medkd.scoring.metrics import metrics_from_predictions
from medkd.scoring.stats import paired_intervals
from medkd.util.environment import cpu_model

# name: image size, trainable blocks (both backbones), lr, epochs, seeds, label smoothing
RECIPES = {
    "frozen-112": dict(image_size=112, blocks=0, lr=1e-3, epochs=30, seeds=[42], smoothing=0.0),
    "frozen-224": dict(image_size=224, blocks=0, lr=1e-3, epochs=30, seeds=[42], smoothing=0.0),
    "top2-224": dict(image_size=224, blocks=2, lr=1.05e-4, epochs=6, seeds=[42], smoothing=0.0),
    "frozen-224-x3": dict(image_size=224, blocks=0, lr=1e-3, epochs=30, seeds=[42, 43, 44], smoothing=0.0),
    "frozen-224-x5": dict(image_size=224, blocks=0, lr=1e-3, epochs=30, seeds=[42, 43, 44, 45, 46], smoothing=0.0),
    "frozen-224-smooth": dict(image_size=224, blocks=0, lr=1e-3, epochs=30, seeds=[42], smoothing=0.1),
    "frozen-224-smooth-x5": dict(image_size=224, blocks=0, lr=1e-3, epochs=30, seeds=[42, 43, 44, 45, 46],
                                 smoothing=0.1),
    "top2-224-x3": dict(image_size=224, blocks=2, lr=1.05e-4, epochs=6, seeds=[42, 43, 44], smoothing=0.0),
}
TASK_KEYS = ("logits_modality", "logits_location")


def confidence(probabilities: list[np.ndarray]) -> list[float]:
    """Mean top-class probability per task."""
    return [round(float(p.max(axis=1).mean()), 4) for p in probabilities]


def frame_probabilities(frame: pd.DataFrame, data: PreparedData) -> list[np.ndarray]:
    return [frame[[f"{task}_prob_{c}" for c in classes]].to_numpy()
            for task, classes in zip(data.vocab.tasks, data.vocab.classes)]


def ensemble_frame(frames: list[pd.DataFrame], data: PreparedData) -> pd.DataFrame:
    """The members' logits averaged (log-probabilities: a logit up to a constant per image), as a frame."""
    out = frames[0][["index", "image_id"]].copy()
    for task, classes in zip(data.vocab.tasks, data.vocab.classes):
        columns = [f"{task}_prob_{c}" for c in classes]
        logits = np.mean([np.log(np.clip(f[columns].to_numpy(), 1e-12, None)) for f in frames], axis=0)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        out[f"{task}_true"] = frames[0][f"{task}_true"]
        out[f"{task}_pred"] = [classes[k] for k in probs.argmax(axis=1)]
        for k, c in enumerate(classes):
            out[f"{task}_prob_{c}"] = probs[:, k]
    return out


def run_recipe(name: str, recipe: dict, params: dict, dataset: str, trunks: Path, out: Path) -> dict:
    cfg = dataclasses.replace(data_config(params, dataset, Path.cwd()), image_size=recipe["image_size"])
    data = PreparedData.load(cfg)
    model_cfg, train_cfg = teacher_configs(params, dataset)
    model_cfg = dataclasses.replace(model_cfg, vision_train_blocks=recipe["blocks"], text_train_blocks=recipe["blocks"])
    loss = LossConfig.from_dict({"ce": {"weight": 1.0, "class_weights": "balanced",
                                        "label_smoothing": recipe["smoothing"]}})
    seeds, frames = [], []
    for seed in recipe["seeds"]:
        cfg_seed = dataclasses.replace(train_cfg, lr=recipe["lr"], epochs=recipe["epochs"], seed=seed)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = train_teacher(data, model_cfg, cfg_seed, Path(tmp), trunk_dir=trunks, loss_cfg=loss)
            seconds = time.perf_counter() - started
            cache = build_teacher_cache(result.checkpoint, data, cfg_seed, trunk_dir=trunks)
            dev = pd.read_csv(Path(tmp) / "predictions_dev.csv")
        train_probs = [torch.softmax(cache["outputs"][k], dim=1).numpy() for k in TASK_KEYS]
        folder = out / name / f"seed-{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        dev.to_csv(folder / "predictions_dev.csv", index=False)
        frames.append(dev)
        seeds.append({"seed": seed, "dev_avg_f1": round(result.dev["avg_f1"], 4), "best_epoch": result.best_epoch,
                      "dev_by_epoch": [round(h["dev_avg_f1"], 4) for h in result.history],
                      "seconds": round(seconds, 1), "train_confidence": confidence(train_probs),
                      "dev_confidence": confidence(frame_probabilities(dev, data))})
        print(f"{name} seed {seed}: dev {seeds[-1]['dev_avg_f1']:.4f} (epoch {result.best_epoch}), "
              f"{seconds:.0f} s, confidence train {seeds[-1]['train_confidence']} dev {seeds[-1]['dev_confidence']}",
              flush=True)
    row = {"recipe": name, **{k: v for k, v in recipe.items() if k != "seeds"}, "seeds": seeds,
           "dev_avg_f1_mean": round(float(np.mean([s["dev_avg_f1"] for s in seeds])), 4)}
    if len(frames) > 1:
        ensemble = ensemble_frame(frames, data)
        ensemble.to_csv(out / name / "ensemble_predictions_dev.csv", index=False)
        row["ensemble_dev_avg_f1"] = round(metrics_from_predictions(ensemble, data.vocab)["avg_f1"], 4)
        row["ensemble_dev_confidence"] = confidence(frame_probabilities(ensemble, data))
    return row


def versus_student(rows: list[dict], student: list[Path], out: Path, tasks) -> list[dict]:
    """Each recipe (its ensemble where it has one) minus the student trained alone: dev, paired over
    images and the student's seeds (and the teacher's, for a recipe run on several without an ensemble)."""
    frames = {"student": [pd.read_csv(p) for p in student]}
    for row in rows:
        folder = out / row["recipe"]
        ensemble = folder / "ensemble_predictions_dev.csv"
        frames[row["recipe"]] = [pd.read_csv(ensemble)] if ensemble.exists() else [
            pd.read_csv(p) for p in sorted(folder.glob("seed-*/predictions_dev.csv"))]
    table = paired_intervals(frames, tasks, [(row["recipe"], "student") for row in rows])
    found = table[table.kind == "difference"].set_index("name")
    for row in rows:
        r = found.loc[f"{row['recipe']} − student"]
        row["minus_student_alone_dev"] = [round(r.estimate, 4), round(r.low, 4), round(r.high, 4)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--dataset", default="medpix")
    parser.add_argument("--only", nargs="*", default=None, help=f"recipes to run (default: all): {', '.join(RECIPES)}")
    parser.add_argument("--probe", nargs="*", type=int, default=[], help="image sizes to fit the linear probe at")
    parser.add_argument("--student", nargs="*", type=Path, default=sorted(
        Path("reports/students/mobilenetv2-minilm/no-kd").glob("seed-*/predictions_dev.csv")),
                        help="dev predictions of the student trained alone, one file per seed")
    parser.add_argument("--trunks", type=Path, default=Path(".medkd/trunks"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_levers.json"))
    args = parser.parse_args()
    params = yaml.safe_load(args.params.read_text())
    folder = args.out.with_suffix("")
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {"recipes": [], "probes": []}
    chosen = args.only if args.only is not None else list(RECIPES)
    rows = [r for r in earlier["recipes"] if r["recipe"] not in chosen]
    probes = [p for p in earlier["probes"] if p["image_size"] not in args.probe]
    machine = {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    for size in args.probe:
        cfg = dataclasses.replace(data_config(params, args.dataset, Path.cwd()), image_size=size)
        model_cfg, train_cfg = teacher_configs(params, args.dataset)
        probe = linear_probe(PreparedData.load(cfg), model_cfg, train_cfg, trunk_dir=args.trunks)
        probes.append({"image_size": size, "C": probe.c, "dev_avg_f1": round(probe.metrics["dev"]["avg_f1"], 4),
                       "seconds": probe.metrics["seconds"]})
        print(f"probe {size} px: dev {probes[-1]['dev_avg_f1']:.4f} (C {probe.c}, {probe.metrics['seconds']:.0f} s)")
    for name in chosen:
        shutil.rmtree(folder / name, ignore_errors=True)
        rows.append(run_recipe(name, RECIPES[name], params, args.dataset, args.trunks, folder))
        args.out.write_text(json.dumps({"machine": machine, "recipes": rows, "probes": probes}, indent=1) + "\n")
    tasks = PreparedData.load(data_config(params, args.dataset, Path.cwd())).vocab.tasks
    if rows and args.student:
        rows = versus_student(rows, args.student, folder, tasks)
    args.out.write_text(json.dumps({"machine": machine, "student_alone": [str(p) for p in args.student],
                                    "recipes": rows, "probes": probes}, indent=1) + "\n")
    table = pd.DataFrame([{"recipe": r["recipe"], "dev (mean)": r["dev_avg_f1_mean"],
                           "ensemble dev": r.get("ensemble_dev_avg_f1"),
                           "− student alone [95%]": r.get("minus_student_alone_dev"),
                           "seconds/seed": round(np.mean([s["seconds"] for s in r["seeds"]])),
                           "train conf.": r["seeds"][0]["train_confidence"], "dev conf.": r["seeds"][0]["dev_confidence"]}
                          for r in rows])
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
