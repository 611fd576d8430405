"""Stage functions behind the notebooks: each reads its params.yaml section, calls the engine
and writes exactly the outputs its dvc.yaml stage declares (see dvc.yaml for the layout).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Mapping

import pandas as pd
import yaml

from medkd.data import SPLITS, DataConfig, DataError, PreparedData
from medkd.train import (
    LossConfig, ModelConfig, TrainConfig, atomic_write, distill_student,
    load_or_build_teacher_cache, train_teacher, write_json,
)

VARIANTS = ("tuned", "baseline")


# --------------------------------------------------------------------------- params and paths


def project_root(start: Path | None = None) -> Path:
    """The folder holding dvc.yaml, searched upwards (notebooks may run from notebooks/)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() and (folder / "params.yaml").exists():
            return folder
    raise FileNotFoundError(f"no dvc.yaml + params.yaml in {here} or above")


def load_params(root: Path | None = None) -> dict:
    root = root or project_root()
    with open(root / "params.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


class Paths:
    """Where each stage writes; dvc.yaml declares the same paths."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def data_report(self, dataset: str) -> Path:
        return self.root / "reports" / "data" / dataset

    def teacher_checkpoint(self, dataset: str) -> Path:
        return self.root / "models" / dataset / "teacher.pt"

    def teacher_cache(self, dataset: str) -> Path:
        return self.root / "models" / dataset / "teacher_cache.pt"

    def teacher_report(self, dataset: str) -> Path:
        return self.root / "reports" / "teachers" / dataset

    def student_checkpoint(self, student: str, variant: str) -> Path:
        return self.root / "models" / "students" / student / f"{variant}.pt"

    def student_report(self, student: str) -> Path:
        return self.root / "reports" / "students" / student

    def metrics(self, name: str) -> Path:
        return self.root / "reports" / "metrics" / f"{name}.json"

    def plot(self, name: str) -> Path:
        return self.root / "reports" / "plots" / f"{name}.csv"

    def optuna_report(self) -> Path:
        return self.root / "reports" / "optuna"

    def optuna_models(self) -> Path:
        return self.root / "models" / "optuna"

    def results(self) -> Path:
        return self.root / "reports" / "results"


def data_config(params: Mapping, dataset: str, root: Path) -> DataConfig:
    try:
        section = dict(params["data"][dataset])
    except KeyError:
        raise DataError(f"params.yaml: no data set {dataset!r} under `data:`") from None
    section.setdefault("name", dataset)
    section["root"] = str((root / section["root"]).resolve()) if not os.path.isabs(section["root"]) else section["root"]
    return DataConfig.from_dict(section)


def load_data(params: Mapping, dataset: str, root: Path) -> PreparedData:
    cfg = data_config(params, dataset, root)
    marker = {"medpix": "splitted_dataset", "wound": "metadata_train.csv"}.get(cfg.name, "")
    if not (Path(cfg.root) / marker).exists():
        raise DataError(
            f"data set {dataset!r} is not at {cfg.root}: run `make data` (copies it from the local "
            "mirror in $MEDKD_DATA_MIRROR, default ../shared/data, or downloads it from its public "
            "source), then `dvc repro`"
        )
    return PreparedData.load(cfg)


def train_config(params: Mapping, *sections: Mapping | None) -> TrainConfig:
    """Seed and runtime from the top of params.yaml, then each section's `train` keys in turn."""
    merged = {"seed": params.get("seed", 42), **(params.get("runtime") or {})}
    for section in sections:
        merged.update(section or {})
    return TrainConfig.from_dict(merged)


def _split_fields(values: Mapping) -> tuple[dict, dict, dict]:
    """Route flat hyperparameters to the model, loss and train configs by field name."""
    model_keys = {f.name for f in fields(ModelConfig)}
    loss_keys = {f.name for f in fields(LossConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    model, loss, train = {}, {}, {}
    for key, value in values.items():
        if key in model_keys:
            model[key] = value
        elif key in loss_keys:
            loss[key] = value
        elif key in train_keys:
            train[key] = value
        else:
            raise ValueError(f"hyperparameter {key!r} is not a model, loss or train setting")
    return model, loss, train


def student_configs(params: Mapping, student: str, variant: str, overrides: Mapping | None = None):
    """(ModelConfig, LossConfig, TrainConfig) of one student trained with one variant's hyperparameters."""
    try:
        spec = dict(params["students"][student])
    except KeyError:
        raise KeyError(f"params.yaml: no student {student!r} under `students:`") from None
    distill = params["distill"]
    chosen = distill[variant]
    model_over, loss_over, train_over = _split_fields(overrides or {})
    model = ModelConfig.from_dict({
        "vision": spec["vision"], "text": spec["text"], "pretrained": distill.get("pretrained", True),
        **{k: spec[k] for k in ("vision_weights", "text_weights") if k in spec},
        **chosen.get("model", {}), **model_over,
    })
    loss = LossConfig.from_dict({**chosen.get("loss", {}), **loss_over})
    train = train_config(params, distill.get("train"), chosen.get("train"), train_over)
    return model, loss, train


def compact_metrics(result: Mapping) -> dict:
    """The headline numbers of a metrics.json (no confusion matrices) for `dvc metrics`."""
    out = {"parameters": result["parameters"], "seconds": result["seconds"]}
    for split in ("dev", "test"):
        if split in result:
            out[f"{split}_avg_f1"] = round(result[split]["avg_f1"], 4)
            for task in result["tasks"]:
                out[f"{split}_{task}_f1"] = round(result[split][task]["f1_macro"], 4)
    return out


def _reset_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------- prepare


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare_stage(params: Mapping, dataset: str, root: Path | None = None) -> dict:
    """Validate a data set, write its manifests, vocabulary and a small data report."""
    from medkd import report

    root = root or project_root()
    data = load_data(params, dataset, root)
    out = _reset_dir(Paths(root).data_report(dataset))
    tasks = data.vocab.tasks
    for split in SPLITS:
        rows = [{"index": i, "image_id": r.image_id, "image_sha256": sha256_file(r.image_path),
                 tasks[0]: r.labels[0], tasks[1]: r.labels[1], "text": r.text}
                for i, r in enumerate(data.records[split])]
        pd.DataFrame(rows).to_csv(out / f"manifest_{split}.csv", index=False)
    write_json(out / "vocab.json", data.vocab.to_dict())
    balance = report.class_balance(data)
    balance.to_csv(out / "class_balance.csv")
    text_stats = report.text_statistics(data)
    text_stats.to_csv(out / "text_statistics.csv")
    report.plot_class_balance(balance, out / "class_balance.png")
    report.plot_examples(data, out / "examples.png")
    summary = {"dataset": dataset, "sizes": {s: len(data.records[s]) for s in SPLITS},
               "classes": {t: list(c) for t, c in zip(tasks, data.vocab.classes)},
               "text_fields": list(data.config.text_fields) if data.config.name == "medpix" else [data.config.text_column]}
    (out / "data_report.md").write_text(report.data_report_markdown(summary, balance, text_stats))
    return {"summary": summary, "balance": balance, "text": text_stats, "out": out}


# --------------------------------------------------------------------------- teacher


def teacher_stage(params: Mapping, dataset: str, root: Path | None = None) -> dict:
    """Train the teacher of one data set, then run it once over the training split (the cache)."""
    root = root or project_root()
    paths = Paths(root)
    section = params["teachers"][dataset]
    data = load_data(params, dataset, root)
    model_cfg = ModelConfig.from_dict(section["model"])
    cfg = train_config(params, section.get("train"))
    report_dir = _reset_dir(paths.teacher_report(dataset))
    result = train_teacher(data, model_cfg, cfg, report_dir, checkpoint_path=paths.teacher_checkpoint(dataset))
    load_or_build_teacher_cache(result.checkpoint, data, cfg, paths.teacher_cache(dataset))
    metrics = json.loads((report_dir / "metrics.json").read_text())
    write_json(paths.metrics(f"teacher-{dataset}"), compact_metrics(metrics))
    history = pd.DataFrame(result.history)
    atomic_write(paths.plot(f"teacher-{dataset}"), lambda p: history.to_csv(p, index=False))
    return {"result": result, "metrics": metrics, "history": history}


# --------------------------------------------------------------------------- distill


def distill_stage(params: Mapping, student: str, root: Path | None = None) -> dict:
    """Distil one student config twice: with the study's tuned and with its baseline hyperparameters."""
    root = root or project_root()
    paths = Paths(root)
    dataset = params["students"][student]["dataset"]
    data = load_data(params, dataset, root)
    report_dir = _reset_dir(paths.student_report(student))
    results, histories, summary = {}, {}, {}
    for variant in VARIANTS:
        model_cfg, loss_cfg, cfg = student_configs(params, student, variant)
        result = distill_student(
            data, paths.teacher_checkpoint(dataset), model_cfg, loss_cfg, cfg, report_dir / variant,
            cache_path=paths.teacher_cache(dataset), checkpoint_path=paths.student_checkpoint(student, variant),
            rebuild_stale_cache=False,
        )
        results[variant] = result
        metrics = json.loads((report_dir / variant / "metrics.json").read_text())
        summary[variant] = compact_metrics(metrics)
        histories[variant] = pd.DataFrame(result.history).set_index("epoch")
    tuned, base = summary["tuned"]["test_avg_f1"], summary["baseline"]["test_avg_f1"]
    summary["improvement_vs_baseline_pct"] = round(100 * (tuned - base) / base, 2) if base else None
    write_json(paths.metrics(f"distill-{student}"), summary)
    for variant, history in histories.items():
        atomic_write(paths.plot(f"distill-{student}-{variant}"), lambda p, h=history: h.reset_index().to_csv(p, index=False))
    curves = pd.concat({v: h[["dev_avg_f1", "train_total"]] for v, h in histories.items()}, axis=1)
    curves.columns = [f"{v}_{c}" for v, c in curves.columns]
    return {"results": results, "summary": summary, "curves": curves}


# --------------------------------------------------------------------------- optuna


def suggest(trial, search_space: Mapping[str, Mapping]) -> dict:
    """Sample one value per entry: {type: float|int|categorical, low, high, log, choices}."""
    values = {}
    for name, spec in search_space.items():
        kind = spec.get("type", "float")
        if kind == "float":
            values[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif kind == "int":
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif kind == "categorical":
            values[name] = trial.suggest_categorical(name, list(spec["choices"]))
        else:
            raise ValueError(f"optuna.search_space.{name}: unknown type {kind!r}")
    return values


def _valid_fusion(values: Mapping, base_model: ModelConfig) -> bool:
    dim = values.get("fusion_dim", base_model.fusion_dim)
    heads = values.get("fusion_heads", base_model.fusion_heads)
    return dim % heads == 0


def optuna_stage(params: Mapping, root: Path | None = None) -> dict:
    """Tune a student's distillation hyperparameters on dev average macro-F1 (test never seen)."""
    import optuna

    root = root or project_root()
    paths = Paths(root)
    section = params["optuna"]
    student = section["student"]
    dataset = params["students"][student]["dataset"]
    if section.get("dataset", dataset) != dataset:
        raise ValueError(f"optuna.dataset={section['dataset']!r} but student {student!r} uses {dataset!r}")
    data = load_data(params, dataset, root)
    storage = section.get("storage") or f"sqlite:///{paths.optuna_models() / 'study.db'}"
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    sampler = optuna.samplers.TPESampler(seed=section.get("sampler_seed", params.get("seed", 42)),
                                         n_startup_trials=section.get("n_startup_trials", 3))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=section.get("pruner_startup_trials", 2),
                                         n_warmup_steps=section.get("pruner_warmup_epochs", 0))
    study = optuna.create_study(study_name=section.get("study_name", f"medkd-{student}"), storage=storage,
                                direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True)
    base_model, _, _ = student_configs(params, student, "tuned")
    trial_train = section.get("train", {})

    def objective(trial):
        values = suggest(trial, section["search_space"])
        if not _valid_fusion(values, base_model):
            raise optuna.TrialPruned("fusion_dim not divisible by fusion_heads")
        model_cfg, loss_cfg, cfg = student_configs(params, student, "tuned", {**values, **trial_train})

        def report_epoch(epoch: int, score: float) -> None:
            trial.report(score, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        with tempfile.TemporaryDirectory() as tmp:
            result = distill_student(data, paths.teacher_checkpoint(dataset), model_cfg, loss_cfg, cfg, Path(tmp),
                                     cache_path=paths.teacher_cache(dataset), rebuild_stale_cache=False,
                                     report_epoch=report_epoch, evaluate_test=False)
        return result.dev["avg_f1"]

    finished = [t for t in study.trials if t.state.is_finished()]
    remaining = max(0, int(section["n_trials"]) - len(finished))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=remaining, gc_after_trial=True)

    out = _reset_dir(paths.optuna_report())
    trials = study.trials_dataframe(attrs=("number", "value", "params", "state", "duration"))
    trials["duration_s"] = trials.pop("duration").dt.total_seconds().round(1)
    trials.to_csv(out / "trials.csv", index=False)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial
    write_json(out / "best_params.json", {"trial": best.number, "dev_avg_f1": best.value, "params": best.params})
    from medkd import report

    report.plot_optuna(study, out)
    result_metrics = {"best_dev_avg_f1": round(best.value, 4), "n_trials": len(study.trials),
                      "n_complete": len(complete),
                      "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)}
    if section.get("retrain_best", True):
        model_cfg, loss_cfg, cfg = student_configs(params, student, "tuned", best.params)
        retrained = distill_student(data, paths.teacher_checkpoint(dataset), model_cfg, loss_cfg, cfg,
                                    out / "best", cache_path=paths.teacher_cache(dataset),
                                    rebuild_stale_cache=False, checkpoint_path=paths.optuna_models() / "best.pt")
        best_metrics = compact_metrics(json.loads((out / "best" / "metrics.json").read_text()))
        result_metrics["best_retrained"] = best_metrics
        result_metrics["best_retrained_epochs"] = len(retrained.history)
    write_json(paths.metrics("optuna"), result_metrics)
    return {"study": study, "trials": trials, "best": best, "metrics": result_metrics}
