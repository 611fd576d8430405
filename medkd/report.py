"""Tables and figures: the data report, the study's results tables, and their plots.

A leaf on the stage side: it draws from what it is given (prepared data, a runs table, params,
an Optuna study) and reads no run files itself; `medkd.stages.results` collects the runs, with
every F1 recomputed from the per-sample prediction files (`medkd.metrics.load_run`).
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter  # noqa: E402
from sklearn.metrics import precision_recall_fscore_support  # noqa: E402

from optuna.exceptions import ExperimentalWarning  # noqa: E402
from optuna.visualization.matplotlib import plot_param_importances  # noqa: E402

from medkd.data import PreparedData, load_image, mask_words  # noqa: E402
from medkd.datasets import SPLITS, label_word_pattern  # noqa: E402
from medkd.files import atomic_write  # noqa: E402
from medkd.params import get_path  # noqa: E402
from medkd.stats import LEVEL, N_RESAMPLES, paired_intervals  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _log_x(ax) -> None:
    """A log x axis labelled in plain numbers at 1, 2, 3, 5 x 10^k, all in one font size and each with its
    grid line (matplotlib's default labels only the powers of ten, so a 5-70 ms range shows one label)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


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
    for split in SPLITS:  # the texts as the models see them (after `mask_terms`)
        texts = mask_words([r.text for r in data.records[split]], data.config.mask_terms, "[MASK]")
        words = np.array([len(text.split()) for text in texts])
        row = {"n": len(words), "words_mean": round(float(words.mean()), 1),
               "words_median": float(np.median(words)), "words_max": int(words.max())}
        for task, pattern in patterns.items():
            if pattern is not None:
                row[f"names_{task}_pct"] = round(
                    100 * np.mean([bool(pattern.search(text)) for text in texts]), 1)
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


def plot_optuna(study, out: Path, n_startup_trials: int = 0) -> None:
    with warnings.catch_warnings():  # optuna flags its matplotlib plots as experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        plot_search_history(study, Path(out) / "optimization_history.png", n_startup_trials)
        _plot_importances(study, Path(out) / "param_importances.png")


def plot_search_history(study, path: Path, n_startup_trials: int = 0) -> None:
    """Each trial's dev score by trial number (pruned trials at their last reported epoch), the
    best-so-far line, and the random start-up trials shaded: does TPE improve on random draws?"""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    trials = sorted(study.trials, key=lambda t: t.number)
    complete = [(t.number, t.value) for t in trials if t.state.name == "COMPLETE"]
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in trials
              if t.state.name == "PRUNED" and t.intermediate_values]
    if n_startup_trials:
        ax.axvspan(-0.5, n_startup_trials - 0.5, color="0.9", zorder=0, label=f"random start-up ({n_startup_trials})")
    if complete:
        ax.scatter(*zip(*complete), color="C0", s=40, zorder=3, label="complete")
        best, line = -np.inf, []
        for t in trials:
            if t.state.name == "COMPLETE":
                best = max(best, t.value)
            line.append((t.number, best if np.isfinite(best) else np.nan))
        ax.step(*zip(*line), where="post", color="C3", label="best so far")
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", color="C1", s=40, zorder=3, label="pruned (last epoch's score)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial number", ylabel="dev average macro-F1",
           title=f"Optuna search: {len(trials)} trials ({len(complete)} complete, {len(pruned)} pruned)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the axes: covers no trial
    _save(fig, path)


def _plot_importances(study, path: Path) -> None:
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
        try:
            ax = plot_param_importances(study)
            for text in list(ax.figure.texts):  # optuna's own titles: ours below replaces them
                text.remove()
            for loc in ("left", "center", "right"):
                ax.set_title("", loc=loc)
            caveat = " (indicative only: few trials)" if len(complete) < 20 else ""
            ax.set_title(f"Hyperparameter importances (fANOVA), {len(complete)} complete trials{caveat}", fontsize=10)
            _save(ax.figure, path)
            return
        except (RuntimeError, ValueError) as err:  # e.g. a parameter with a single value
            reason = str(err)
    else:
        reason = "fewer than two distinct completed trials"
    fig, ax = plt.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, f"No importances: {reason}", ha="center", va="center", wrap=True)
    _save(fig, path)


# --------------------------------------------------------------------------- results


NO_KD = "no-kd"  # the variant name of the control trained without the teacher (params.yaml `distill.no-kd`)
OPTUNA_BEST = "optuna-best"  # the retrained best trial of the search (stage optuna)
# Variants compared with the teacher and with the no-KD control (ablations are compared with their base).
MAIN_VARIANTS = ("tuned", "baseline", NO_KD, OPTUNA_BEST)


def run_label(model: str, variant: str) -> str:
    return "teacher" if variant == "teacher" else f"{model} {variant}"


def model_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, variant): the seeds' mean and std (ddof=1; NaN for one seed) of
    each F1, the number of seeds, and the first run's other columns."""
    keys = ["dataset", "model", "variant"]
    f1s = ["task1_f1", "task2_f1", "avg_f1"]
    grouped = runs.groupby(keys, sort=False)
    first = grouped.first().drop(columns=f1s)
    stats = grouped[f1s].agg(["mean", "std"])
    stats.columns = [c if s == "mean" else f"{c}_std" for c, s in stats.columns]
    return first.join(stats).assign(seeds=grouped.size()).reset_index()


def _mean_std(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def _ci(row: pd.Series | None) -> str:
    if row is None:
        return ""
    sign = "+" if row.kind == "difference" else ""
    return f"[{row.low:{sign}.3f}, {row.high:{sign}.3f}]"


def study_table(runs: pd.DataFrame, dataset: str, intervals: pd.DataFrame | None = None) -> pd.DataFrame:
    """The study's format: Model | Parameters | Task-1 F1 | Task-2 F1 | Avg F1 | Improvement, then
    "vs no-KD" (avg F1 minus that of the same student trained without the teacher) where a `no-kd`
    variant ran, and with `intervals` (`interval_table`) the 95% interval columns.

    Teacher first; each student with the tuned hyperparameters, its improvement relative to the same
    student trained with the baseline hyperparameters; then the Optuna-best retrain. F1s are means ±
    std over the seeds a model was trained with (the seed count in "Seeds").
    """
    groups = model_groups(runs[runs.dataset == dataset])
    t1, t2 = groups.iloc[0]["task1"], groups.iloc[0]["task2"]
    by = groups.set_index(["model", "variant"])
    ci = intervals.set_index("name") if intervals is not None else None

    def interval(name: str) -> pd.Series | None:
        return ci.loc[name] if ci is not None and name in ci.index else None

    rows = []
    for r in groups[groups.variant.isin(["teacher", "tuned", OPTUNA_BEST])].itertuples():
        label = run_label(r.model, r.variant)
        if r.variant == "teacher":
            name, improvement, gain_ci = f"Teacher ({r.backbones})", "Baseline", ""
        else:
            name = f"Student ({r.backbones})" + (" [Optuna best]" if r.variant == OPTUNA_BEST else "")
            base = by.avg_f1.get((r.model, "baseline"))
            improvement = f"{100 * (r.avg_f1 - base) / base:+.1f}% vs baseline" if base else "n/a"
            gain_ci = _ci(interval(f"{label} − {run_label(r.model, 'baseline')}"))
        row = {"Model": name, "Parameters": f"{r.parameters / 1e6:.2f}M", "Seeds": r.seeds,
               f"Test {t1.capitalize()} F1": _mean_std(r.task1_f1, r.task1_f1_std, r.seeds),
               f"Test {t2.capitalize()} F1": _mean_std(r.task2_f1, r.task2_f1_std, r.seeds),
               "Avg F1": f"**{_mean_std(r.avg_f1, r.avg_f1_std, r.seeds)}**", "Improvement": improvement}
        if ci is not None:
            row["Avg F1 95% CI"] = _ci(interval(label))
            row["vs baseline 95% CI"] = gain_ci
        if (groups.variant == NO_KD).any():  # the distillation's own effect
            control = by.avg_f1.get((r.model, NO_KD)) if r.variant != "teacher" else None
            row["vs no-KD"] = f"{r.avg_f1 - control:+.3f}" if control is not None else ""
            if ci is not None:
                row["vs no-KD 95% CI"] = (_ci(interval(f"{label} − {run_label(r.model, NO_KD)}"))
                                          if control is not None else "")
        rows.append(row)
    return pd.DataFrame(rows)


def interval_table(runs: pd.DataFrame, dataset: str, seed: int = 0, n_resamples: int = N_RESAMPLES,
                   bases: Mapping[str, str | None] | None = None) -> pd.DataFrame:
    """Test avg macro-F1 of every model of `dataset` (seed-averaged) and the differences the study's
    claims rest on, with paired bootstrap 95% intervals over the test images (`medkd.stats`):
    each student − teacher, tuned − baseline, Optuna best − tuned, KD − no-KD, and each other
    variant − its `base:` (the ablations; `bases` from `medkd.stages.schema.variant_bases`)."""
    sub = runs[runs.dataset == dataset]
    t1, t2 = sub.iloc[0]["task1"], sub.iloc[0]["task2"]
    frames = {run_label(model, variant): list(group.predictions)
              for (model, variant), group in sub.groupby(["model", "variant"], sort=False)}
    differences = []
    for model, variant in dict.fromkeys(zip(sub.model, sub.variant)):
        if variant == "teacher":
            continue
        label = run_label(model, variant)

        def add(other: str, label=label, model=model) -> None:
            if run_label(model, other) in frames:
                differences.append((label, run_label(model, other)))

        if variant in MAIN_VARIANTS:
            if "teacher" in frames:
                differences.append((label, "teacher"))
            if variant == "tuned":
                add("baseline")
            if variant == OPTUNA_BEST:
                add("tuned")
            if variant != NO_KD:
                add(NO_KD)
        elif (bases or {}).get(variant):
            add(bases[variant])
    table = paired_intervals(frames, [t1, t2], differences, n_resamples=n_resamples, seed=seed)
    table["reading"] = [("" if kind == "model" else "detectable" if detectable else "no detectable difference")
                        for kind, detectable in zip(table["kind"], table.get("detectable", [None] * len(table)))]
    return table.drop(columns=["detectable"], errors="ignore").round(4)


def interval_markdown(table: pd.DataFrame) -> str:
    shown = pd.DataFrame({
        "Avg F1 of": table["name"],
        "Seeds": table["seeds"],
        "Estimate": [f"{v:+.3f}" if k == "difference" else f"{v:.3f}" for v, k in zip(table.estimate, table.kind)],
        f"{100 * LEVEL:.0f}% interval": [_ci(r) for _, r in table.iterrows()],
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
    """Every run, one row per seed."""
    cols = ["dataset", "model", "variant", "seed", "backbones", "parameters", "task1_f1", "task2_f1", "avg_f1",
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


def _run_names(frame: pd.DataFrame) -> list[str]:
    return [f"{m} [{v}]" for m, v in zip(frame.model, frame.variant)]


def plot_f1_per_model(runs: pd.DataFrame, path: Path) -> None:
    """Test macro-F1 of each model (bars: mean over its seeds; whiskers: their standard deviation)."""
    datasets = runs.dataset.unique()
    n_models = max(len(runs[runs.dataset == d][["model", "variant"]].drop_duplicates()) for d in datasets)
    fig, axes = plt.subplots(len(datasets), 1, figsize=(9, (1.6 + 0.5 * n_models) * len(datasets)), squeeze=False,
                             layout="constrained")
    for ax, dataset in zip(axes[:, 0], datasets):
        sub = runs[runs.dataset == dataset]
        t1, t2 = sub.iloc[0]["task1"], sub.iloc[0]["task2"]
        labels = _run_names(sub)
        long = pd.DataFrame({"run": labels * 3,
                             "metric": [f"{t1} F1"] * len(sub) + [f"{t2} F1"] * len(sub) + ["avg F1"] * len(sub),
                             "F1": list(sub.task1_f1) + list(sub.task2_f1) + list(sub.avg_f1)})
        sns.barplot(long, y="run", x="F1", hue="metric", ax=ax, errorbar="sd", capsize=0.2, err_kws={"linewidth": 1})
        ax.set_xlim(0, 1)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="test macro-F1")
        ax.set_title(f"{dataset}: test macro-F1 per model (mean over seeds, whiskers ± 1 std where several)")
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
                rows.append({"dataset": r.dataset, "model": r.model, "variant": r.variant,
                             "seed": getattr(r, "seed", None), "task": task, "class": name,
                             "precision": precision[k], "recall": recall[k], "f1": f1[k], "support": int(support[k])})
    return pd.DataFrame(rows).round(4)


def plot_per_class_f1(per_class: pd.DataFrame, path: Path) -> None:
    """Heat maps of per-class test F1 (mean over seeds): models down, classes (with their test
    support) across, a panel per data set and task."""
    panels = list(per_class[["dataset", "task"]].drop_duplicates().itertuples(index=False))
    n_runs = per_class[["model", "variant"]].drop_duplicates().shape[0]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, (2.2 + 0.38 * n_runs) * len(panels)), squeeze=False,
                             layout="constrained")
    for ax, (dataset, task) in zip(axes[:, 0], panels):
        sub = per_class[(per_class.dataset == dataset) & (per_class.task == task)]
        support = sub.groupby("class")["support"].max()
        grid = sub.assign(run=_run_names(sub)).pivot_table(index="run", columns="class", values="f1", sort=False)
        grid.columns = [f"{textwrap.fill(c, 14)}\n(n={support[c]})" for c in grid.columns]  # long names wrap
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f",
                    cbar_kws={"label": "test F1 (mean over seeds)"})
        ax.set_title(f"{dataset}: per-class test F1, {task}")
        ax.set_xlabel("class (test support)")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=0)
    _save(fig, path)


def plot_params_vs_f1(runs: pd.DataFrame, path: Path) -> None:
    """Size against test average macro-F1 (seed means) of the teacher and each student's tuned,
    baseline, no-KD and Optuna-best models; students by marker, variants by colour."""
    groups = model_groups(runs[runs.variant.isin(["teacher", *MAIN_VARIANTS])])
    groups = groups.assign(params_m=groups.parameters / 1e6)
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    sns.scatterplot(groups, x="params_m", y="avg_f1", hue="variant", style="model", s=90, ax=ax)
    _log_x(ax)
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel("test average macro-F1 (mean over seeds)")
    ax.set_title("Size vs. accuracy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _save(fig, path)


def plot_confusions(runs: pd.DataFrame, path: Path) -> None:
    """Test confusion matrices of the teacher and each student's tuned model (its first seed)."""
    chosen = runs[runs.variant.isin(["teacher", "tuned"])].drop_duplicates(["dataset", "model", "variant"])
    fig, axes = plt.subplots(len(chosen), 2, figsize=(11, 4.4 * len(chosen)), squeeze=False, layout="constrained")
    for (ax1, ax2), (_, r) in zip(axes, chosen.iterrows()):
        for ax, key, cls, task in ((ax1, "confusion1", r.classes1, r.task1), (ax2, "confusion2", r.classes2, r.task2)):
            names = [textwrap.fill(c, 12) for c in cls]
            sns.heatmap(np.array(r[key]), annot=True, fmt="d", cbar=False, xticklabels=names, yticklabels=names,
                        cmap="Blues", ax=ax, annot_kws={"fontsize": 8})
            seed = "" if r.variant == "teacher" else f", seed {r.seed}"
            ax.set_title(f"{r.model} [{r.variant}{seed}]: {task}", fontsize=9)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.tick_params(axis="x", rotation=0, labelsize=7)
            ax.tick_params(axis="y", rotation=0, labelsize=7)
    _save(fig, path)


def plot_training_curves(runs: pd.DataFrame, path: Path) -> None:
    """Dev average macro-F1 and the training cross-entropy (the one loss every run has, unweighted)
    per epoch: the teacher and each student's tuned and no-KD model (first seed)."""
    chosen = runs[runs.variant.isin(["teacher", "tuned", NO_KD])].drop_duplicates(["dataset", "model", "variant"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    for _, r in chosen.iterrows():
        h = r.history
        if h is None or h.empty:
            continue
        style = {"linestyle": "--" if r.variant == NO_KD else "-", "marker": "o"}
        ax1.plot(h.epoch, h.dev_avg_f1, label=f"{r.model} [{r.variant}]", **style)
        if "train_ce" in h:
            ax2.plot(h.epoch, h.train_ce, **style)
    ax1.set(title="dev average macro-F1", xlabel="epoch", ylabel="macro-F1")
    ax2.set(title="training cross-entropy (sum of both tasks)", xlabel="epoch", ylabel="cross-entropy")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*ax1.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    _save(fig, path)


def plot_loss_drivers(probes: Mapping[str, pd.DataFrame], path: Path) -> None:
    """What drives the student: each weighted loss term's value and its share of the gradient norm
    on the student's parameters over training, one row per run (e.g. tuned vs baseline)."""
    fig, axes = plt.subplots(len(probes), 2, figsize=(12, 3.6 * len(probes)), squeeze=False, layout="constrained")
    for (ax1, ax2), (name, frame) in zip(axes, probes.items()):
        terms = list(dict.fromkeys(frame.term))
        values = frame.pivot_table(index="step", columns="term", values="weighted_value", sort=False)[terms]
        norms = frame.pivot_table(index="step", columns="term", values="grad_norm", sort=False)[terms]
        share = norms.div(norms.sum(axis=1), axis=0)
        for term in terms:
            ax1.plot(values.index, values[term], marker=".", label=term)
        ax1.set(yscale="log", title=f"{name}: weighted loss terms", xlabel="training step",
                ylabel="weight × term (log scale)")
        ax1.legend(fontsize=8)
        ax2.stackplot(share.index, share.T.values, labels=terms, alpha=0.85)
        ax2.set(ylim=(0, 1), title=f"{name}: share of the gradient norm", xlabel="training step",
                ylabel="‖∇ weighted term‖ / Σ")
        ax2.legend(fontsize=8, loc="upper right")
    _save(fig, path)


def loss_driver_summary(probes: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per run and term: mean weighted value and mean share of the gradient norm over all probes."""
    rows = []
    for name, frame in probes.items():
        share = frame.grad_norm / frame.groupby("step").grad_norm.transform("sum")
        summary = frame.assign(share=share).groupby("term", sort=False)[["weighted_value", "share"]].mean()
        rows += [{"run": name, "term": term, "mean weighted value": v.weighted_value, "mean gradient share": v.share}
                 for term, v in summary.iterrows()]
    return pd.DataFrame(rows).round(4)


def ablation_table(intervals: pd.DataFrame, bases: Mapping[str, str | None]) -> pd.DataFrame:
    """The ablations (variants compared with their `base:` rather than with the teacher): each one's
    avg F1 and its difference to the base with the interval."""
    rows = []
    models = intervals[intervals.kind == "model"].set_index("name")
    for r in intervals[intervals.kind == "difference"].itertuples():
        a, b = r.name.split(" − ")
        variant = next((v for v in bases if a.endswith(f" {v}") and v not in MAIN_VARIANTS), None)
        if variant is None or not b.endswith(f" {bases[variant]}"):
            continue
        rows.append({"Model": a, "Seeds": int(models.loc[a, "seeds"]), "Avg F1": f"{models.loc[a, 'estimate']:.3f}",
                     "Compared with": b, "Difference": f"{r.estimate:+.3f}", "95% interval": _ci(r),
                     "Reading": r.reading})
    return pd.DataFrame(rows)


def masking_table(runs: pd.DataFrame, masked: Mapping[str, str], seed: int = 0,
                  n_resamples: int = N_RESAMPLES) -> pd.DataFrame:
    """What masking the label words costs: each model trained on a masked data set (`masked`:
    {masked data set: the same data unmasked}) against the same model and variant trained on the
    unmasked one, paired on the shared test images."""
    rows = []
    for masked_set, plain_set in masked.items():
        m, p = runs[runs.dataset == masked_set], runs[runs.dataset == plain_set]
        if m.empty or p.empty:
            continue
        t1, t2 = m.iloc[0]["task1"], m.iloc[0]["task2"]
        for (backbones, variant), group in m.groupby(["backbones", "variant"], sort=False):
            twin = p[(p.backbones == backbones) & (p.variant == variant)]
            if twin.empty:
                continue
            table = paired_intervals({"masked": list(group.predictions), "plain": list(twin.predictions)}, [t1, t2],
                                     [("masked", "plain")], n_resamples=n_resamples, seed=seed).set_index("name")
            diff = table.loc["masked − plain"]
            rows.append({"Model": f"{backbones} [{variant}]", "Unmasked": f"{table.loc['plain', 'estimate']:.3f}",
                         "Masked": f"{table.loc['masked', 'estimate']:.3f}", "Change": f"{diff.estimate:+.3f}",
                         "95% interval": f"[{diff.low:+.3f}, {diff.high:+.3f}]",
                         "Reading": "detectable" if diff.detectable else "no detectable difference"})
    return pd.DataFrame(rows)


def gamma_finding(drivers: pd.DataFrame) -> str:
    """One plain sentence per run on how much of the gradient the CRD term carries."""
    crd = drivers[drivers.term == "crd"]
    if crd.empty:
        return ""
    parts = [f"{r.run}: γ·CRD averages {r['mean weighted value']:.3g} and carries "
             f"{100 * r['mean gradient share']:.0f}% of the summed per-term gradient norms" for _, r in crd.iterrows()]
    ce = drivers[drivers.term == "ce"].set_index("run")["mean gradient share"]
    dominant = all(r["mean gradient share"] > ce.get(r.run, 1.0) for _, r in crd.iterrows())
    verdict = ("With these weights the contrastive term, not the KL term that α and T scale, drives the student's "
               "gradient; α and T, the knobs that separate tuned from baseline, barely steer training."
               if dominant else "CRD does not dominate the gradient with these weights.")
    return "; ".join(parts) + ". " + verdict


def deployment_table(deployments: Sequence[Mapping]) -> pd.DataFrame:
    """One row per exported model (the export stages' deployment.json): size, single-thread CPU
    latency, speed-up against its data set's teacher, test avg F1 in fp32 and int8."""
    rows = []
    for d in sorted(deployments, key=lambda d: (not d["model"].startswith("teacher-"), d["parameters"])):
        fp32, int8 = d["fp32"], d.get("int8")
        lat = fp32["latency_1_thread"]
        row = {"Model": f"{d['model']} ({d['backbones']})", "Parameters": f"{d['parameters'] / 1e6:.2f}M",
               "MB fp32": f"{fp32['mb']:.1f}", "MB int8": f"{int8['mb']:.1f}" if int8 else "",
               "p50 / p95 ms (1 thread)": f"{lat['p50_ms']:.1f} / {lat['p95_ms']:.1f}",
               "int8 p50 ms": f"{int8['latency_1_thread']['p50_ms']:.1f}" if int8 else "",
               "Speed-up vs teacher [95% CI]": speedup_cell(d),
               "Avg F1 fp32": f"{fp32['avg_f1']:.3f}", "Avg F1 int8": f"{int8['avg_f1']:.3f}" if int8 else "",
               "int8 ΔF1": f"{int8['avg_f1_change']:+.3f}" if int8 else "",
               "max |Δlogit| vs PyTorch": f"{d['parity']['max_abs_logit_diff']:.1e}"}
        rows.append(row)
    return pd.DataFrame(rows)


def speedup_cell(deployment: Mapping) -> str:
    """A student's paired speed-up over its teacher (timed alternately in the student's export stage)
    with its bootstrap interval; a teacher is its own reference."""
    if deployment["model"].startswith("teacher-"):
        return "1×"
    paired = deployment.get("speedup_vs_teacher")
    if paired is None:
        return ""
    low, high = paired["ci95"]
    return f"{paired['speedup']:.2f}× [{low:.2f}, {high:.2f}]"


def speedup_verdict(paired: Mapping | None, goal: float) -> str:
    """Whether a paired speed-up reaches `goal`: "met" when its whole 95% interval is at or above it,
    "missed" when the whole interval is below, otherwise "not detectable" (the interval contains it)."""
    if paired is None:
        return "not measured"
    low, high = paired["ci95"]
    if low >= goal:
        return "met"
    return "missed" if high < goal else "not detectable"


def deployment_goals(deployments: Sequence[Mapping], speedup_goal: float, int8_max_f1_drop: float) -> list[str]:
    """The deployment goals read off the export stages' measurements: each student's paired speed-up
    over its teacher against `speedup_goal` (by its interval), and each model's int8 avg-F1 change
    against `-int8_max_f1_drop` (a point estimate: both F1s come from the same test images)."""
    students = sorted((d for d in deployments if not d["model"].startswith("teacher-")), key=lambda d: d["model"])
    lines = ["Goals (`export.speedup_goal`, `export.int8_max_f1_drop` in params.yaml); a speed-up meets its goal "
             "when its whole 95% interval is at or above it:", ""]
    if students:
        by_verdict: dict[str, list[Mapping]] = {}
        for d in students:
            by_verdict.setdefault(speedup_verdict(d.get("speedup_vs_teacher"), speedup_goal), []).append(d)
        met = by_verdict.pop("met", [])
        named = {verdict: ", ".join(d["model"] + (f" ({speedup_cell(d)})" if speedup_cell(d) else "") for d in ds)
                 for verdict, ds in by_verdict.items()}
        lines.append(f"- **Speed-up ≥ {speedup_goal:g}× over the teacher** (batch 1, 1 thread): met by {len(met)} of "
                     f"{len(students)} students" + "".join(f"; {v}: {names}" for v, names in named.items()) + ".")
    quantized = [d for d in deployments if "int8" in d]
    if quantized:
        over = [f"{d['model']} ({d['int8']['avg_f1_change']:+.3f})" for d in quantized
                if d["int8"]["avg_f1_change"] < -int8_max_f1_drop]
        worst = min(d["int8"]["avg_f1_change"] for d in quantized)
        missed = "; missed: " + ", ".join(over) if over else ""
        lines.append(f"- **int8 costs at most {int8_max_f1_drop:g} avg F1**: met by {len(quantized) - len(over)} of "
                     f"{len(quantized)} models (largest change {worst:+.3f}){missed}.")
    return lines


def plot_latency_vs_f1(deployments: Sequence[Mapping], path: Path) -> None:
    """Single-thread batch-1 latency against test avg F1 (fp32 and int8), marker area by parameters;
    the line joins the Pareto front (no other model both faster and better)."""
    points = []
    for d in deployments:
        for kind in ("fp32", "int8"):
            if kind in d:
                points.append({"model": d["model"], "kind": kind, "ms": d[kind]["latency_1_thread"]["p50_ms"],
                               "f1": d[kind]["avg_f1"], "parameters (M)": round(d["parameters"] / 1e6, 1)})
    frame = pd.DataFrame(points)
    fig, ax = plt.subplots(figsize=(8.5, 5), layout="constrained")
    sns.scatterplot(frame, x="ms", y="f1", hue="model", style="kind", size="parameters (M)", sizes=(40, 400), ax=ax,
                    alpha=0.85)
    front, best = [], -np.inf
    for _, r in frame.sort_values(["ms", "f1"], ascending=[True, False]).iterrows():
        if r.f1 > best:
            front.append((r.ms, r.f1))
            best = r.f1
    ax.plot(*zip(*front), color="0.4", linestyle="--", linewidth=1, label="Pareto front")
    _log_x(ax)
    ax.set(xlabel="batch-1 latency, ONNX Runtime, 1 CPU thread (ms, p50, log scale)",
           ylabel="test average macro-F1", title="Latency vs. accuracy of the exported models")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _save(fig, path)


def results_markdown(runs: pd.DataFrame, params: Mapping, hyper: pd.DataFrame, optuna_metrics: Mapping | None,
                     intervals: Mapping[str, pd.DataFrame] | None = None,
                     ablations: Mapping[str, pd.DataFrame] | None = None, masking: pd.DataFrame | None = None,
                     drivers: pd.DataFrame | None = None, deployment: pd.DataFrame | None = None,
                     goals: Sequence[str] = ()) -> str:
    lines = ["# Results", "",
             "Regenerated by `dvc repro` from `params.yaml` (stage `report`). F1 = test macro-F1, "
             "recomputed from the per-sample prediction files under `reports/`. A model trained with several "
             "seeds shows mean ± standard deviation over them; its interval is that of the seed-averaged model.",
             ""]
    for dataset in runs.dataset.unique():
        table = study_table(runs, dataset, (intervals or {}).get(dataset))
        lines += [f"## {dataset}", "", table.to_markdown(index=False), ""]
    lines += ["Improvement: the student's average F1 with the study's tuned hyperparameters relative to the "
              "same student trained with the study's baseline ones. vs no-KD: minus the same student trained "
              "with cross-entropy alone (no teacher), same schedule and seeds.", ""]
    for dataset, table in (intervals or {}).items():
        lines += [f"## How sure: {dataset}", "",
                  f"Paired bootstrap over the test images ({N_RESAMPLES} resamples, fixed seed): every model is "
                  "scored on the same resamples, so a difference's interval reflects how the two models differ "
                  "on the images. Where it contains 0 the difference is not detectable with this test set.", "",
                  interval_markdown(table), ""]
    for dataset, table in (ablations or {}).items():
        if len(table):
            lines += [f"## Ablations: {dataset}", "", "Each variant against the variant it is built from (`base:`).",
                      "", table.to_markdown(index=False, disable_numparse=True), ""]
    if masking is not None and len(masking):
        lines += ["## Caption masking", "", "The label words of `mask_terms` replaced by the tokenizer's mask token "
                  "in train, dev and test text, against the same model trained on the captions as published.", "",
                  masking.to_markdown(index=False, disable_numparse=True), ""]
    if drivers is not None and len(drivers):
        lines += ["## What drives the student", "", gamma_finding(drivers), "",
                  drivers.to_markdown(index=False), "", "![what drives the student](loss_drivers.png)", ""]
    if deployment is not None and len(deployment):
        lines += ["## Deployment", "", "Each model exported to ONNX (`medkd/export.py`; students: their tuned run, first "
                  "seed), timed with ONNX Runtime on this machine's CPU on real test samples (batch 1, after a "
                  "warm-up). Speed-up: each student and its teacher timed alternately on the same test samples in the "
                  "student's export stage (1 thread), the teacher's p50 over the student's, with a 95% block-bootstrap "
                  "interval over the timed pairs (this measurement's timing noise only); the p50 columns come from "
                  "each model's own stage. int8: ONNX Runtime's dynamic quantization of the matrix products. "
                  "F1s are of the exported fp32 model (the training runs evaluate with bf16 autocast, so they "
                  "differ slightly). Parity: the largest logit difference to "
                  "PyTorch eager fp32 over the test split (the goal is 1e-4; the stage fails above "
                  "`export.parity_tolerance`).", "",
                  deployment.to_markdown(index=False, disable_numparse=True), "", *goals, "",
                  "![latency vs F1](latency_vs_f1.png)", ""]
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
