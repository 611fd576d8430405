"""Tables and figures: the data report, the study's results tables, and their plots.

Every F1 in the results tables is recomputed here from the committed per-sample prediction
files, never copied from a metrics file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from medkd.data import SPLITS, PreparedData, Vocab  # noqa: E402
from medkd.train import metrics_from_predictions  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def _save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


# --------------------------------------------------------------------------- data report


def class_balance(data: PreparedData) -> pd.DataFrame:
    """Samples per (task, class) and split."""
    rows = []
    for split in SPLITS:
        for t, task in enumerate(data.vocab.tasks):
            counts = pd.Series([r.labels[t] for r in data.records[split]]).value_counts()
            for cls in data.vocab.classes[t]:
                rows.append({"task": task, "class": cls, "split": split, "n": int(counts.get(cls, 0))})
    return pd.DataFrame(rows).pivot_table(index=["task", "class"], columns="split", values="n")[list(SPLITS)]


# Words that name a MedPix modality inside free text (a caption saying "CT" gives the label away).
_MODALITY_WORDS = re.compile(r"\b(CT|MR|MRI|T1|T2|FLAIR|DWI|ADC)\b")


def text_statistics(data: PreparedData) -> pd.DataFrame:
    """Words per text and, for MedPix, how often the text names the modality itself."""
    rows = {}
    for split in SPLITS:
        words = np.array([len(r.text.split()) for r in data.records[split]])
        row = {"n": len(words), "words_mean": round(float(words.mean()), 1),
               "words_median": float(np.median(words)), "words_max": int(words.max())}
        if data.config.name == "medpix":
            row["names_modality_pct"] = round(
                100 * np.mean([bool(_MODALITY_WORDS.search(r.text)) for r in data.records[split]]), 1)
        rows[split] = row
    return pd.DataFrame(rows).T


def plot_class_balance(balance: pd.DataFrame, path: Path) -> None:
    tasks = balance.index.get_level_values(0).unique()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        balance.loc[task].plot.barh(ax=ax)
        ax.set_title(f"{task}: samples per class and split")
        ax.set_xlabel("samples")
    _save(fig, path)


def plot_examples(data: PreparedData, path: Path, per_class: int = 3) -> None:
    """A few training images per task-1 class, titled with both labels."""
    records = data.records["train"]
    classes = data.vocab.classes[0]
    fig, axes = plt.subplots(len(classes), per_class, figsize=(2.6 * per_class, 2.8 * len(classes)), squeeze=False)
    from medkd.data import load_image

    for row, cls in enumerate(classes):
        chosen = [r for r in records if r.labels[0] == cls][:per_class]
        for col in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(chosen):
                r = chosen[col]
                ax.imshow(load_image(r.image_path, 160).transpose(1, 2, 0))
                ax.set_title(f"{r.labels[0]} / {r.labels[1]}"[:40], fontsize=8)
    _save(fig, path)


def data_report_markdown(summary: Mapping, balance: pd.DataFrame, text_stats: pd.DataFrame) -> str:
    lines = [f"# Data report: {summary['dataset']}", "",
             f"Split sizes: {summary['sizes']}. Text input: {summary['text_fields']}.", "",
             "## Classes per split", "", balance.to_markdown(), "", "## Text", "", text_stats.to_markdown(), ""]
    if "names_modality_pct" in text_stats.columns:
        lines += ["`names_modality_pct`: share of texts that name the modality (CT, MR, T1, ...). The "
                  "leakage guard refuses label fields; free-text captions that mention the modality "
                  "are the study's input as published, so the modality task is partly solvable from text.", ""]
    lines += ["![class balance](class_balance.png)", "", "![examples](examples.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- optuna figures


def plot_optuna(study, out: Path) -> None:
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    ax = plot_optimization_history(study)
    ax.set_title("Optuna: dev average macro-F1 per trial")
    _save(ax.figure, Path(out) / "optimization_history.png")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
        try:
            ax = plot_param_importances(study)
            ax.set_title("Optuna: hyperparameter importances (fANOVA)")
            _save(ax.figure, Path(out) / "param_importances.png")
            return
        except (RuntimeError, ValueError) as err:  # e.g. a parameter with a single value
            reason = str(err)
    else:
        reason = "fewer than two distinct completed trials"
    fig, ax = plt.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, f"No importances: {reason}", ha="center", va="center", wrap=True)
    _save(fig, Path(out) / "param_importances.png")


# --------------------------------------------------------------------------- results


def load_run(run_dir: Path) -> dict:
    """A finished run's metrics.json plus test metrics recomputed from predictions_test.csv."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tasks = metrics["tasks"]
    frame = pd.read_csv(run_dir / "predictions_test.csv")
    classes = tuple(tuple(sorted(c.removeprefix(f"{t}_prob_") for c in frame.columns
                                 if c.startswith(f"{t}_prob_"))) for t in tasks)
    vocab = Vocab(tuple(tasks), classes)
    history = pd.read_csv(run_dir / "history.csv") if (run_dir / "history.csv").exists() else None
    return {"metrics": metrics, "test": metrics_from_predictions(frame, vocab), "vocab": vocab, "history": history}


def collect_runs(params: Mapping, paths) -> pd.DataFrame:
    """One row per finished run: teachers, students (tuned and baseline), the Optuna best."""
    rows = []
    for dataset in params.get("teachers", {}):
        run = load_run(paths.teacher_report(dataset))
        rows.append(_row(dataset, "Teacher", "teacher", run, params["teachers"][dataset]["model"]))
    for student, spec in params.get("students", {}).items():
        for variant in ("tuned", "baseline"):
            run_dir = paths.student_report(student) / variant
            if run_dir.exists():
                rows.append(_row(spec["dataset"], student, variant, load_run(run_dir), spec))
    best_dir = paths.optuna_report() / "best"
    if best_dir.exists():
        student = params["optuna"]["student"]
        spec = params["students"][student]
        rows.append(_row(spec["dataset"], student, "optuna-best", load_run(best_dir), spec))
    return pd.DataFrame(rows)


def _row(dataset, name, variant, run, spec) -> dict:
    tasks = run["metrics"]["tasks"]
    test = run["test"]
    return {
        "dataset": dataset, "model": name, "variant": variant,
        "backbones": f"{spec['vision']} + {spec['text']}",
        "parameters": run["metrics"]["parameters"],
        "task1": tasks[0], "task2": tasks[1],
        "task1_f1": test[tasks[0]]["f1_macro"], "task2_f1": test[tasks[1]]["f1_macro"],
        "avg_f1": test["avg_f1"], "task1_acc": test[tasks[0]]["accuracy"], "task2_acc": test[tasks[1]]["accuracy"],
        "dev_avg_f1": run["metrics"]["dev"]["avg_f1"], "best_epoch": run["metrics"]["best_epoch"],
        "seconds": run["metrics"]["seconds"], "n_test": test["n"],
        "confusion1": test[tasks[0]]["confusion"], "confusion2": test[tasks[1]]["confusion"],
        "classes1": run["vocab"].classes[0], "classes2": run["vocab"].classes[1],
        "history": run["history"],
    }


def study_table(runs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The study's format: Model | Parameters | Task-1 F1 | Task-2 F1 | Avg F1 | Improvement.

    Teacher first; each student with the tuned hyperparameters, its improvement relative to the
    same student trained with the baseline hyperparameters; then the Optuna-best retrain.
    """
    sub = runs[runs.dataset == dataset]
    t1, t2 = sub.iloc[0]["task1"], sub.iloc[0]["task2"]
    baseline = sub[sub.variant == "baseline"].set_index("model")["avg_f1"]
    rows = []
    for _, r in sub[sub.variant.isin(["teacher", "tuned", "optuna-best"])].iterrows():
        if r.variant == "teacher":
            label, improvement = f"Teacher ({r.backbones})", "Baseline"
        else:
            suffix = " [Optuna best]" if r.variant == "optuna-best" else ""
            label = f"Student ({r.backbones}){suffix}"
            base = baseline.get(r.model)
            improvement = f"{100 * (r.avg_f1 - base) / base:+.1f}% vs baseline" if base else "n/a"
        rows.append({"Model": label, "Parameters": f"{r.parameters / 1e6:.2f}M",
                     f"Test {t1.capitalize()} F1": f"{r.task1_f1:.3f}",
                     f"Test {t2.capitalize()} F1": f"{r.task2_f1:.3f}",
                     "Avg F1": f"**{r.avg_f1:.3f}**", "Improvement": improvement})
    return pd.DataFrame(rows)


def all_runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    cols = ["dataset", "model", "variant", "backbones", "parameters", "task1_f1", "task2_f1", "avg_f1",
            "task1_acc", "task2_acc", "dev_avg_f1", "best_epoch", "seconds", "n_test"]
    return runs[cols].round(4)


# The study's baseline teacher settings; the pipeline trains no baseline teacher, the table quotes them.
STUDY_TEACHER_BASELINE = {"lr": 1e-5, "dropout": 0.1}


def hyperparameter_table(params: Mapping, best: Mapping | None = None) -> pd.DataFrame:
    """Baseline vs optimized (the study's values), and this run's Optuna best where present."""
    d = params["distill"]
    teacher = next(iter(params["teachers"].values()))
    rows = [
        ("alpha (KL weight)", d["baseline"]["loss"].get("alpha"), d["tuned"]["loss"].get("alpha"), "alpha"),
        ("beta (MSE weight)", d["baseline"]["loss"].get("beta"), d["tuned"]["loss"].get("beta"), "beta"),
        ("gamma (CRD weight)", d["baseline"]["loss"].get("gamma"), d["tuned"]["loss"].get("gamma"), "gamma"),
        ("T (temperature)", d["baseline"]["loss"].get("temperature"), d["tuned"]["loss"].get("temperature"), "temperature"),
        ("Teacher LR", STUDY_TEACHER_BASELINE["lr"], teacher["train"].get("lr"), None),
        ("Student LR", d["baseline"]["train"].get("lr"), d["tuned"]["train"].get("lr"), "lr"),
        ("Fusion dim", d["baseline"]["model"].get("fusion_dim"), d["tuned"]["model"].get("fusion_dim"), "fusion_dim"),
        ("Student fusion layers", d["baseline"]["model"].get("fusion_layers"), d["tuned"]["model"].get("fusion_layers"), "fusion_layers"),
        ("Student fusion heads", d["baseline"]["model"].get("fusion_heads"), d["tuned"]["model"].get("fusion_heads"), "fusion_heads"),
        ("Teacher dropout", STUDY_TEACHER_BASELINE["dropout"], teacher["model"].get("dropout"), None),
        ("Student dropout", d["baseline"]["model"].get("dropout"), d["tuned"]["model"].get("dropout"), "dropout"),
    ]
    table = pd.DataFrame(rows, columns=["Parameter", "Baseline", "Optimized", "key"])
    if best:
        table["Optuna best (this run)"] = [
            _fmt(best["params"].get(key)) if key and key in best["params"] else "" for key in table["key"]]
    table["Baseline"] = table["Baseline"].map(_fmt)
    table["Optimized"] = table["Optimized"].map(_fmt)
    return table.drop(columns="key")


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def plot_f1_per_model(runs: pd.DataFrame, path: Path) -> None:
    datasets = runs.dataset.unique()
    fig, axes = plt.subplots(len(datasets), 1, figsize=(9, 3.2 + 0.45 * len(runs) / len(datasets)), squeeze=False)
    for ax, dataset in zip(axes[:, 0], datasets):
        sub = runs[runs.dataset == dataset]
        t1, t2 = sub.iloc[0]["task1"], sub.iloc[0]["task2"]
        labels = [f"{m} [{v}]" for m, v in zip(sub.model, sub.variant)]
        long = pd.DataFrame({"run": labels * 3,
                             "metric": [f"{t1} F1"] * len(sub) + [f"{t2} F1"] * len(sub) + ["avg F1"] * len(sub),
                             "F1": list(sub.task1_f1) + list(sub.task2_f1) + list(sub.avg_f1)})
        sns.barplot(long, y="run", x="F1", hue="metric", ax=ax)
        ax.set_xlim(0, 1)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="test macro-F1")
        ax.set_title(f"{dataset}: test macro-F1 per model")
        ax.set_ylabel("")
    _save(fig, path)


def plot_params_vs_f1(runs: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.scatterplot(runs.assign(params_m=runs.parameters / 1e6), x="params_m", y="avg_f1", hue="variant",
                    style="dataset", s=90, ax=ax)
    for _, r in runs.iterrows():
        ax.annotate(r.model, (r.parameters / 1e6, r.avg_f1), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel("test average macro-F1")
    ax.set_title("Size vs. accuracy")
    _save(fig, path)


def plot_confusions(runs: pd.DataFrame, path: Path) -> None:
    chosen = runs[runs.variant.isin(["teacher", "tuned"])]
    fig, axes = plt.subplots(len(chosen), 2, figsize=(10, 3.6 * len(chosen)), squeeze=False)
    for (ax1, ax2), (_, r) in zip(axes, chosen.iterrows()):
        for ax, key, cls, task in ((ax1, "confusion1", r.classes1, r.task1), (ax2, "confusion2", r.classes2, r.task2)):
            short = [c[:12] for c in cls]
            sns.heatmap(np.array(r[key]), annot=True, fmt="d", cbar=False, xticklabels=short, yticklabels=short,
                        cmap="Blues", ax=ax)
            ax.set_title(f"{r.model} [{r.variant}]: {task}", fontsize=9)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
    _save(fig, path)


def plot_training_curves(runs: pd.DataFrame, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for _, r in runs.iterrows():
        h = r.history
        if h is None or h.empty:
            continue
        label = f"{r.model} [{r.variant}]"
        ax1.plot(h.epoch, h.dev_avg_f1, marker="o", label=label)
        ax2.plot(h.epoch, h.train_total, marker="o", label=label)
    ax1.set(title="dev average macro-F1", xlabel="epoch")
    ax2.set(title="training loss (total)", xlabel="epoch", yscale="log")
    ax1.legend(fontsize=7)
    _save(fig, path)


def results_markdown(runs: pd.DataFrame, params: Mapping, hyper: pd.DataFrame, optuna_metrics: Mapping | None) -> str:
    lines = ["# Results", "",
             "Regenerated by `dvc repro` from `params.yaml` (stage `report`). F1 = test macro-F1, "
             "recomputed from the per-sample prediction files under `reports/`.", ""]
    for dataset in runs.dataset.unique():
        lines += [f"## {dataset}", "", study_table(runs, dataset).to_markdown(index=False), ""]
    lines += ["Improvement: the student's average F1 with the study's tuned hyperparameters relative to the "
              "same student trained with the study's baseline ones.", "",
              "## All runs", "", all_runs_table(runs).to_markdown(index=False), "",
              "## Hyperparameters", "", hyper.to_markdown(index=False), ""]
    if optuna_metrics:
        lines += [f"Optuna: {optuna_metrics['n_trials']} trials ({optuna_metrics['n_complete']} complete, "
                  f"{optuna_metrics['n_pruned']} pruned), best dev average F1 {optuna_metrics['best_dev_avg_f1']:.3f}.",
                  "", "![optuna history](../optuna/optimization_history.png)",
                  "![optuna importances](../optuna/param_importances.png)", ""]
    lines += ["## Figures", "", "![F1 per model](f1_per_model.png)", "", "![parameters vs F1](params_vs_f1.png)", "",
              "![training curves](training_curves.png)", "", "![confusion matrices](confusion_matrices.png)", ""]
    return "\n".join(lines)


def report_stage(params: Mapping, root: Path | None = None) -> dict:
    from medkd.pipeline import Paths, _reset_dir, project_root

    root = root or project_root()
    paths = Paths(root)
    out = _reset_dir(paths.results())
    runs = collect_runs(params, paths)
    best_file = paths.optuna_report() / "best_params.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else None
    optuna_file = paths.metrics("optuna")
    optuna_metrics = json.loads(optuna_file.read_text()) if optuna_file.exists() else None
    hyper = hyperparameter_table(params, best)
    tables = {}
    for dataset in runs.dataset.unique():
        tables[dataset] = study_table(runs, dataset)
        tables[dataset].to_csv(out / f"table_{dataset}.csv", index=False)
    all_runs_table(runs).to_csv(out / "all_runs.csv", index=False)
    hyper.to_csv(out / "hyperparameters.csv", index=False)
    plot_f1_per_model(runs, out / "f1_per_model.png")
    plot_params_vs_f1(runs, out / "params_vs_f1.png")
    plot_confusions(runs, out / "confusion_matrices.png")
    plot_training_curves(runs, out / "training_curves.png")
    (out / "results.md").write_text(results_markdown(runs, params, hyper, optuna_metrics))
    return {"runs": runs, "tables": tables, "hyper": hyper, "out": out}
