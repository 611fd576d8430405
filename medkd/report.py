"""Tables and figures: the data report, the study's results tables, and their plots.

A leaf on the stage side: it draws from what it is given (prepared data, a runs table, params,
an Optuna study) and reads no run files itself; `medkd.stages.results` collects the runs, with
every F1 recomputed from the per-sample prediction files (`medkd.metrics.load_run`).
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from sklearn.metrics import precision_recall_fscore_support  # noqa: E402

from optuna.exceptions import ExperimentalWarning  # noqa: E402
from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances  # noqa: E402

from medkd.data import PreparedData, load_image  # noqa: E402
from medkd.datasets import SPLITS, label_word_pattern  # noqa: E402
from medkd.files import atomic_write  # noqa: E402
from medkd.params import get_path  # noqa: E402
from medkd.stats import LEVEL, N_RESAMPLES, paired_intervals  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


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


def text_statistics(data: PreparedData) -> pd.DataFrame:
    """Words per text and, for each task whose spec lists label words (MedPix: the modality),
    how often the text names that label itself (`names_<task>_pct`)."""
    patterns = {task: label_word_pattern(data.config.spec, task) for task in data.vocab.tasks}
    rows = {}
    for split in SPLITS:
        words = np.array([len(r.text.split()) for r in data.records[split]])
        row = {"n": len(words), "words_mean": round(float(words.mean()), 1),
               "words_median": float(np.median(words)), "words_max": int(words.max())}
        for task, pattern in patterns.items():
            if pattern is not None:
                row[f"names_{task}_pct"] = round(
                    100 * np.mean([bool(pattern.search(r.text)) for r in data.records[split]]), 1)
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
    for column in (c for c in text_stats.columns if c.startswith("names_")):
        task = column.removeprefix("names_").removesuffix("_pct")
        lines += [f"`{column}`: share of texts that name the {task} label themselves. The leakage guard "
                  f"refuses label fields; free text that mentions the {task} is the study's input as "
                  f"published, so the {task} task is partly solvable from text.", ""]
    lines += ["![class balance](class_balance.png)", "", "![examples](examples.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- optuna figures


def plot_optuna(study, out: Path) -> None:
    with warnings.catch_warnings():  # optuna flags its matplotlib plots as experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        _plot_optuna(study, out)


def _plot_optuna(study, out: Path) -> None:
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


NO_KD = "no-kd"  # the variant name of the control trained without the teacher (params.yaml `distill.no-kd`)


def study_table(runs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The study's format: Model | Parameters | Task-1 F1 | Task-2 F1 | Avg F1 | Improvement.

    Teacher first; each student with the tuned hyperparameters, its improvement relative to the
    same student trained with the baseline hyperparameters; then the Optuna-best retrain. With a
    `no-kd` variant in the runs, a column "vs no-KD": avg F1 minus that of the same student
    trained without the teacher.
    """
    sub = runs[runs.dataset == dataset]
    t1, t2 = sub.iloc[0]["task1"], sub.iloc[0]["task2"]
    baseline = sub[sub.variant == "baseline"].set_index("model")["avg_f1"]
    no_kd = sub[sub.variant == NO_KD].set_index("model")["avg_f1"]
    rows = []
    for _, r in sub[sub.variant.isin(["teacher", "tuned", "optuna-best"])].iterrows():
        if r.variant == "teacher":
            label, improvement = f"Teacher ({r.backbones})", "Baseline"
        else:
            suffix = " [Optuna best]" if r.variant == "optuna-best" else ""
            label = f"Student ({r.backbones}){suffix}"
            base = baseline.get(r.model)
            improvement = f"{100 * (r.avg_f1 - base) / base:+.1f}% vs baseline" if base else "n/a"
        row = {"Model": label, "Parameters": f"{r.parameters / 1e6:.2f}M",
               f"Test {t1.capitalize()} F1": f"{r.task1_f1:.3f}",
               f"Test {t2.capitalize()} F1": f"{r.task2_f1:.3f}",
               "Avg F1": f"**{r.avg_f1:.3f}**", "Improvement": improvement}
        if len(no_kd):  # the distillation's own effect: the same student trained without the teacher
            control = no_kd.get(r.model) if r.variant != "teacher" else None
            row["vs no-KD"] = f"{r.avg_f1 - control:+.3f}" if control is not None else ""
        rows.append(row)
    return pd.DataFrame(rows)


def run_label(model: str, variant: str) -> str:
    return "teacher" if variant == "teacher" else f"{model} {variant}"


def interval_table(runs: pd.DataFrame, dataset: str, seed: int = 0, n_resamples: int = N_RESAMPLES) -> pd.DataFrame:
    """Test avg macro-F1 of every run of `dataset` and the differences the study's claims rest on
    (each student − teacher, tuned − baseline, Optuna best − tuned, KD − no-KD), with paired bootstrap 95%
    intervals over the test images (`medkd.stats`)."""
    sub = runs[runs.dataset == dataset]
    t1, t2 = sub.iloc[0]["task1"], sub.iloc[0]["task2"]
    frames = {run_label(r.model, r.variant): r.predictions for r in sub.itertuples()}
    differences = []
    for r in sub[sub.variant != "teacher"].itertuples():
        label = run_label(r.model, r.variant)
        if "teacher" in frames:
            differences.append((label, "teacher"))
        if r.variant == "tuned" and run_label(r.model, "baseline") in frames:
            differences.append((label, run_label(r.model, "baseline")))
        if r.variant == "optuna-best" and run_label(r.model, "tuned") in frames:
            differences.append((label, run_label(r.model, "tuned")))
        if r.variant in ("tuned", "optuna-best") and run_label(r.model, NO_KD) in frames:
            differences.append((label, run_label(r.model, NO_KD)))
    table = paired_intervals(frames, [t1, t2], differences, n_resamples=n_resamples, seed=seed)
    table["reading"] = [("" if kind == "model" else "detectable" if detectable else "no detectable difference")
                        for kind, detectable in zip(table["kind"], table.get("detectable", [None] * len(table)))]
    return table.drop(columns=["detectable"], errors="ignore").round(4)


def interval_markdown(table: pd.DataFrame) -> str:
    shown = pd.DataFrame({
        "Avg F1 of": table["name"],
        "Estimate": [f"{v:+.3f}" if k == "difference" else f"{v:.3f}" for v, k in zip(table.estimate, table.kind)],
        f"{100 * LEVEL:.0f}% interval": [f"[{lo:+.3f}, {hi:+.3f}]" if k == "difference" else f"[{lo:.3f}, {hi:.3f}]"
                                         for lo, hi, k in zip(table.low, table.high, table.kind)],
        "Reading": table["reading"],
    })
    return shown.to_markdown(index=False, disable_numparse=True)  # keep the signs of differences


def environment_lines(runs: pd.DataFrame) -> list[str]:
    """Where the runs ran (from each run's metrics.json): the numbers reproduce exactly only on the
    same hardware and software."""
    envs = [e for e in runs.get("environment", pd.Series(dtype=object)) if isinstance(e, Mapping)]
    if not envs:
        return []
    distinct = {repr(sorted((k, str(v)) for k, v in e.items())) for e in envs}
    e = envs[0]
    versions = ", ".join(f"{k} {v}" for k, v in e.get("versions", {}).items())
    return ["## Environment", "",
            f"CPU {e.get('cpu')} (torch kernels: {e.get('cpu_isa')}), {e.get('cpu_count')} cores, "
            f"{e.get('torch_threads')} torch threads; GPU {e.get('gpu') or 'none'}; {e.get('precision')}; "
            f"Python {e.get('python')}; {versions}.",
            "" if len(distinct) == 1 else f"Runs of this report ran in {len(distinct)} different environments "
                                          "(see each run's metrics.json).", ""]


def all_runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    cols = ["dataset", "model", "variant", "backbones", "parameters", "task1_f1", "task2_f1", "avg_f1",
            "task1_acc", "task2_acc", "dev_avg_f1", "best_epoch", "seconds", "n_test"]
    return runs[cols].round(4)


# The study's baseline teacher settings; the pipeline trains no baseline teacher, the table quotes them.
STUDY_TEACHER_BASELINE = {"train.lr": 1e-5, "model.dropout": 0.1}
# (row label, key path inside a distill variant; None: a teacher-only row)
HYPERPARAMETER_ROWS = (
    ("KL weight (alpha)", "loss.weights.kl"),
    ("MSE weight (beta)", "loss.weights.mse"),
    ("CRD weight (gamma)", "loss.weights.crd"),
    ("T (temperature)", "loss.temperature"),
    ("Teacher LR", None, "train.lr"),
    ("Student LR", "train.lr"),
    ("Fusion dim", "model.fusion_dim"),
    ("Student fusion layers", "model.fusion_layers"),
    ("Student fusion heads", "model.fusion_heads"),
    ("Teacher dropout", None, "model.dropout"),
    ("Student dropout", "model.dropout"),
)


def hyperparameter_table(params: Mapping, best: Mapping | None = None) -> pd.DataFrame:
    """Baseline vs optimized (the study's values), and this run's Optuna best where present.

    Optuna's parameters are named by the same key paths as the distill variants (`loss.weights.kl`).
    """
    distill = params["distill"]
    teacher = next(iter(params["teachers"].values()))
    rows = []
    for label, path, *teacher_path in HYPERPARAMETER_ROWS:
        if path is None:
            rows.append((label, STUDY_TEACHER_BASELINE[teacher_path[0]], get_path(teacher, teacher_path[0], None), None))
        else:
            rows.append((label, get_path(distill["baseline"], path, None), get_path(distill["tuned"], path, None), path))
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


def per_class_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Precision, recall, F1 and test support of every class of every task, for every run (from its
    per-sample predictions): where a run's average F1 comes from, and which rare class it misses."""
    rows = []
    for r in runs.itertuples():
        for task in (r.task1, r.task2):
            true, pred = r.predictions[f"{task}_true"], r.predictions[f"{task}_pred"]
            classes = sorted(set(true) | set(pred))
            precision, recall, f1, support = precision_recall_fscore_support(true, pred, labels=classes,
                                                                             zero_division=0)
            for k, name in enumerate(classes):
                rows.append({"dataset": r.dataset, "model": r.model, "variant": r.variant, "task": task,
                             "class": name, "precision": precision[k], "recall": recall[k], "f1": f1[k],
                             "support": int(support[k])})
    return pd.DataFrame(rows).round(4)


def plot_per_class_f1(per_class: pd.DataFrame, path: Path) -> None:
    """Heat maps of per-class test F1: runs down, classes (with their test support) across, a panel
    per data set and task."""
    panels = per_class[["dataset", "task"]].drop_duplicates().itertuples(index=False)
    panels = list(panels)
    n_runs = per_class.groupby(["dataset", "task"]).apply(lambda g: g[["model", "variant"]].drop_duplicates().shape[0],
                                                          include_groups=False).max()
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, (2.2 + 0.38 * n_runs) * len(panels)), squeeze=False,
                             layout="constrained")
    for ax, (dataset, task) in zip(axes[:, 0], panels):
        sub = per_class[(per_class.dataset == dataset) & (per_class.task == task)]
        support = sub.groupby("class")["support"].max()
        grid = sub.assign(run=[f"{m} [{v}]" for m, v in zip(sub.model, sub.variant)]).pivot_table(
            index="run", columns="class", values="f1", sort=False)
        grid.columns = [f"{textwrap.fill(c, 14)}\n(n={support[c]})" for c in grid.columns]  # long names wrap
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f",
                    cbar_kws={"label": "test F1"})
        ax.set_title(f"{dataset}: per-class test F1, {task}")
        ax.set_xlabel("class (test support)")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=0)
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


def results_markdown(runs: pd.DataFrame, params: Mapping, hyper: pd.DataFrame, optuna_metrics: Mapping | None,
                     intervals: Mapping[str, pd.DataFrame] | None = None) -> str:
    lines = ["# Results", "",
             "Regenerated by `dvc repro` from `params.yaml` (stage `report`). F1 = test macro-F1, "
             "recomputed from the per-sample prediction files under `reports/`.", ""]
    for dataset in runs.dataset.unique():
        lines += [f"## {dataset}", "", study_table(runs, dataset).to_markdown(index=False), ""]
    lines += ["Improvement: the student's average F1 with the study's tuned hyperparameters relative to the "
              "same student trained with the study's baseline ones.", ""]
    for dataset, table in (intervals or {}).items():
        lines += [f"## How sure: {dataset}", "",
                  f"Paired bootstrap over the test images ({N_RESAMPLES} resamples, fixed seed): every run is "
                  "scored on the same resamples, so a difference's interval reflects how the two models differ "
                  "on the images. Where it contains 0 the difference is not detectable with this test set.", "",
                  interval_markdown(table), ""]
    lines += environment_lines(runs)
    lines += ["## All runs", "", all_runs_table(runs).to_markdown(index=False), "",
              "## Hyperparameters", "", hyper.to_markdown(index=False), ""]
    if optuna_metrics:
        lines += [f"Optuna: {optuna_metrics['n_trials']} trials ({optuna_metrics['n_complete']} complete, "
                  f"{optuna_metrics['n_pruned']} pruned), best dev average F1 {optuna_metrics['best_dev_avg_f1']:.3f}.",
                  "", "![optuna history](../optuna/optimization_history.png)",
                  "![optuna importances](../optuna/param_importances.png)", ""]
    lines += ["## Figures", "", "![F1 per model](f1_per_model.png)", "", "![per-class F1](per_class_f1.png)", "",
              "![parameters vs F1](params_vs_f1.png)", "",
              "![training curves](training_curves.png)", "", "![confusion matrices](confusion_matrices.png)", ""]
    return "\n".join(lines)
