"""The study's figures (PNG): the Optuna search, F1 per model and class, size and latency against F1,
confusions, training curves, what drives the student."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from medkd.reporting.plots import log_x_axis, save_figure
from medkd.reporting.tables import NO_KD, PROBE, TEACHER_MEMBER, model_groups, run_names


def plot_search(trials: pd.DataFrame, importances: Mapping, out: Path, n_startup_trials: int = 0) -> None:
    """The search's two figures, from what stage search wrote (trials.csv, importances.json)."""
    plot_search_history(trials, Path(out) / "optimization_history.png", n_startup_trials)
    plot_importances(importances, Path(out) / "param_importances.png")


def plot_search_history(trials: pd.DataFrame, path: Path, n_startup_trials: int = 0) -> None:
    """Each trial's dev score by trial number (pruned trials at their last reported epoch), the
    best-so-far line, and the random start-up trials shaded: does TPE improve on random draws?"""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    trials = trials.sort_values("number")
    complete = trials[trials.state == "COMPLETE"]
    pruned = trials[(trials.state == "PRUNED") & trials.last_step_value.notna()]
    if n_startup_trials:
        ax.axvspan(-0.5, n_startup_trials - 0.5, color="0.9", zorder=0, label=f"random start-up ({n_startup_trials})")
    if len(complete):
        ax.scatter(complete.number, complete.value, color="C0", s=40, zorder=3, label="complete")
        best = trials.value.where(trials.state == "COMPLETE").cummax().ffill()
        ax.step(trials.number, best, where="post", color="C3", label="best so far")
    if len(pruned):
        ax.scatter(pruned.number, pruned.last_step_value, marker="x", color="C1", s=40, zorder=3,
                   label="pruned (last epoch's score)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial number", ylabel="dev average macro-F1",
           title=f"Optuna search: {len(trials)} trials ({len(complete)} complete, {len(pruned)} pruned)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the axes: covers no trial
    save_figure(fig, path)


def plot_importances(found: Mapping, path: Path) -> None:
    """The search's fANOVA importances (stage search computes them, seeded), largest on top."""
    importances = found.get("importances")
    if not importances:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No importances: {found.get('reason', 'none computed')}", ha="center", va="center",
                wrap=True)
        save_figure(fig, path)
        return
    names = sorted(importances, key=importances.get)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="C0")
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize=8)
    complete = found.get("complete_trials", 0)
    caveat = " (indicative only: few trials)" if complete < 20 else ""
    ax.set(xlabel="importance (share of the dev score's variance)", xlim=(0, max(importances.values()) * 1.2))
    ax.set_title(f"Hyperparameter importances (fANOVA), {complete} complete trials{caveat}", fontsize=10)
    save_figure(fig, path)


def plot_f1_per_model(runs: pd.DataFrame, path: Path) -> None:
    """Test macro-F1 of each model (bars: mean over its seeds; whiskers: their standard deviation)."""
    datasets = runs.dataset.unique()
    # each panel as tall as its rows, so a data set with few models does not get stretched bars
    heights = [1.6 + 0.5 * len(runs[runs.dataset == d][["model", "variant"]].drop_duplicates()) for d in datasets]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(9, sum(heights)), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": heights})
    for ax, dataset in zip(axes[:, 0], datasets):
        sub = runs[runs.dataset == dataset]
        t1, t2 = sub.iloc[0]["task1"], sub.iloc[0]["task2"]
        labels = run_names(sub)
        long = pd.DataFrame({"run": labels * 3,
                             "metric": [f"{t1} F1"] * len(sub) + [f"{t2} F1"] * len(sub) + ["avg F1"] * len(sub),
                             "F1": list(sub.task1_f1) + list(sub.task2_f1) + list(sub.avg_f1)})
        sns.barplot(long, y="run", x="F1", hue="metric", ax=ax, errorbar="sd", capsize=0.2, err_kws={"linewidth": 1})
        ax.set_xlim(0, 1)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="test macro-F1")
        ax.set_title(f"{dataset}: test macro-F1 per model (mean over seeds, whiskers ± 1 std where several)")
        ax.set_ylabel("")
    save_figure(fig, path)


def plot_per_class_f1(per_class: pd.DataFrame, path: Path) -> None:
    """Heat maps of per-class test F1 (mean over seeds): models down, classes (with their test
    support) across, a panel per data set and task."""
    panels = list(per_class[["dataset", "task"]].drop_duplicates().itertuples(index=False))
    heights = [2.2 + 0.38 * per_class[per_class.dataset == dataset][["model", "variant"]].drop_duplicates().shape[0]
               for dataset, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights)), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": heights})
    for ax, (dataset, task) in zip(axes[:, 0], panels):
        sub = per_class[(per_class.dataset == dataset) & (per_class.task == task)]
        support = sub.groupby("class")["support"].max()
        grid = sub.assign(run=run_names(sub)).pivot_table(index="run", columns="class", values="f1", sort=False)
        grid.columns = [f"{textwrap.fill(c, 14)}\n(n={support[c]})" for c in grid.columns]  # long names wrap
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f",
                    cbar_kws={"label": "test F1 (mean over seeds)"})
        ax.set_title(f"{dataset}: per-class test F1, {task}")
        ax.set_xlabel("class (test support)")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=0)
    save_figure(fig, path)


def plot_params_vs_f1(runs: pd.DataFrame, path: Path) -> None:
    """Size against test average macro-F1 (seed means) of each teacher and every variant of each
    student; models by marker (with their data set where there are several), variants by colour."""
    groups = model_groups(runs[~runs.variant.isin([TEACHER_MEMBER, PROBE])])
    named = _dataset_prefix(groups)
    groups = groups.assign(params_m=groups.parameters / 1e6, model=[f"{named(r)}{r.model}" for r in groups.itertuples()])
    fig, ax = plt.subplots(figsize=(8.5, 4.8), layout="constrained")
    sns.scatterplot(groups, x="params_m", y="avg_f1", hue="variant", style="model", s=90, ax=ax)
    log_x_axis(ax)
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel("test average macro-F1 (mean over seeds)")
    ax.set_title("Size vs. test average macro-F1")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    save_figure(fig, path)


def _dataset_prefix(chosen: pd.DataFrame):
    """A run's label prefix: its data set where the runs come from several ("medpix-scarce: "), else nothing."""
    several = "dataset" in chosen and chosen.dataset.nunique() > 1
    return lambda r: f"{r.dataset}: " if several else ""


def plot_confusions(chosen: pd.DataFrame, path: Path) -> None:
    """Test confusion matrices of the runs `chosen` (one row each): the teacher, each student's shipped
    run, the distilled ones (the report picks them)."""
    fig, axes = plt.subplots(len(chosen), 2, figsize=(11, 4.4 * len(chosen)), squeeze=False, layout="constrained")
    named = _dataset_prefix(chosen)
    for (ax1, ax2), (_, r) in zip(axes, chosen.iterrows()):
        for ax, key, cls, task in ((ax1, "confusion1", r.classes1, r.task1), (ax2, "confusion2", r.classes2, r.task2)):
            names = [textwrap.fill(c, 12) for c in cls]
            sns.heatmap(np.array(r[key]), annot=True, fmt="d", cbar=False, xticklabels=names, yticklabels=names,
                        cmap="Blues", ax=ax, annot_kws={"fontsize": 8})
            seed = "" if r.variant == "teacher" else f", seed {r.seed}"
            ax.set_title(f"{named(r)}{r.model} [{r.variant}{seed}]{r.get('role', '')}: {task}", fontsize=9)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.tick_params(axis="x", rotation=0, labelsize=7)
            ax.tick_params(axis="y", rotation=0, labelsize=7)
    save_figure(fig, path)


def plot_training_curves(chosen: pd.DataFrame, path: Path) -> None:
    """Dev average macro-F1 and the training cross-entropy (the one loss every run has, unweighted) per
    epoch of the runs `chosen`: the teacher, each student's shipped run, the distilled ones."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    named = _dataset_prefix(chosen)
    for _, r in chosen.iterrows():
        h = r.history
        if h is None or h.empty:
            continue
        members = ""
        if "member" in h:  # an ensemble teacher: its members' mean per epoch (each keeps its own best epoch)
            members = f" (mean of its {h.member.nunique()} members)"
            h = h.groupby("epoch", as_index=False).mean(numeric_only=True)
        style = {"linestyle": "-" if r.variant in ("teacher", NO_KD) else "--", "marker": "o"}
        line, = ax1.plot(h.epoch, h.dev_avg_f1, label=f"{named(r)}{r.model} [{r.variant}]{r.get('role', '')}{members}", **style)
        best = h.dev_avg_f1.idxmax()
        ax1.plot(h.epoch[best], h.dev_avg_f1[best], marker="*", markersize=13, color=line.get_color(), zorder=4)
        if "train_ce" in h:
            ax2.plot(h.epoch, h.train_ce, color=line.get_color(), **style)
    ax1.set(title="dev average macro-F1 (★: the epoch kept)", xlabel="epoch", ylabel="macro-F1")
    ax2.set(title="training cross-entropy (sum of both tasks)", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*ax1.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9)
    save_figure(fig, path)


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
        ax2.stackplot(share.index, share.T.values, labels=terms, alpha=0.85)
        ax2.set(ylim=(0, 1), title=f"{name}: share of the gradient norm", xlabel="training step",
                ylabel="‖∇ weighted term‖ / Σ")
        ax2.legend(title="loss term", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def plot_latency_vs_f1(deployments: Sequence[Mapping], path: Path) -> None:
    """Single-thread batch-1 latency against test avg F1 of each exported model: colour for the model, a
    circle for fp32 and a triangle for int8 (the model's size written beside its fp32 point); the dashed
    line joins the Pareto front (no other export both faster and better)."""
    points = []
    for d in deployments:
        for kind in ("fp32", "int8"):
            if kind in d:
                points.append({"model": d["model"], "kind": kind, "ms": d[kind]["latency_1_thread"]["p50_ms"],
                               "f1": d[kind]["avg_f1"], "parameters": d["parameters"] / 1e6})
    frame = pd.DataFrame(points)
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    colours = dict(zip(frame.model.unique(), sns.color_palette(n_colors=frame.model.nunique())))
    markers = {"fp32": "o", "int8": "^"}
    for (model, kind), group in frame.groupby(["model", "kind"], sort=False):
        ax.scatter(group.ms, group.f1, color=colours[model], marker=markers[kind], s=70, edgecolor="white", zorder=3)
        if kind == "fp32":
            for r in group.itertuples():
                ax.annotate(f"{r.parameters:.1f}M", (r.ms, r.f1), xytext=(6, 4), textcoords="offset points",
                            fontsize=8, color=colours[model])
    front, best = [], -np.inf
    for _, r in frame.sort_values(["ms", "f1"], ascending=[True, False]).iterrows():
        if r.f1 > best:
            front.append((r.ms, r.f1))
            best = r.f1
    ax.plot(*zip(*front), color="0.4", linestyle="--", linewidth=1, zorder=2)
    log_x_axis(ax)
    ax.set(xlabel="batch-1 latency, ONNX Runtime, 1 CPU thread (ms, p50, log scale)",
           ylabel="test average macro-F1", title="Latency vs. test average macro-F1 of the exported models")
    fig.legend([plt.Line2D([], [], color=c, marker="o", linestyle="") for c in colours.values()], colours,
               title="model (its size beside it)", loc="outside right upper", fontsize=8, title_fontsize=8)
    fig.legend([plt.Line2D([], [], color="0.3", marker=m, linestyle="") for m in markers.values()]
               + [plt.Line2D([], [], color="0.4", linestyle="--")], [*markers, "Pareto front"], title="export",
               loc="outside right lower", fontsize=8, title_fontsize=8)
    save_figure(fig, path)
