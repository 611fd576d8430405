"""The study's tables: per-model results over seeds, paired intervals, per-class scores, ablations,
caption masking, hyperparameters, what drives the student, deployment and its goals.

Drawn from what it is given (a runs table, params, deployment records); it reads no run files
itself: `medkd.stages.report` collects the runs, every F1 recomputed from the per-sample
prediction files (`medkd.scoring.metrics.load_run`)."""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
from sklearn.metrics import precision_recall_fscore_support

from medkd.config.params import get_path
from medkd.config.study import OPTUNA_BEST
from medkd.scoring.stats import LEVEL, N_RESAMPLES, paired_intervals

NO_KD = "no-kd"  # the variant name of the control trained without the teacher (params.yaml `distill.no-kd`)
# Variants compared with the teacher and with the no-KD control (ablations are compared with their base).
MAIN_VARIANTS = ("tuned", "baseline", NO_KD, OPTUNA_BEST)


PROBE = "linear-probe"  # the teacher's baseline: logistic regression on its frozen backbones (medkd.engine.probe)
TEACHER_MEMBER = "teacher-member"  # one member of an ensemble teacher, measured alone (one row per seed)
# Variants that are no student's, and their labels.
REFERENCES = {"teacher": "teacher", TEACHER_MEMBER: "teacher member", PROBE: "linear probe"}


def run_label(model: str, variant: str) -> str:
    return REFERENCES.get(variant, f"{model} {variant}")


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


def _interval(low: float, high: float) -> str:
    """A difference's interval, signed and rounded once: "[-0.004, +0.030]"."""
    return f"[{low:+.3f}, {high:+.3f}]"


def _signed(estimate: float, low: float, high: float) -> str:
    """A difference and its interval, each rounded once: "+0.012 [-0.004, +0.030]"."""
    return f"{estimate:+.3f} {_interval(low, high)}"


def _reading(low: float, high: float, above: str, below: str) -> str:
    """`above` when the whole interval is above 0, `below` when wholly below, else "not detectable"."""
    return above if low > 0 else below if high < 0 else "not detectable"


def study_table(runs: pd.DataFrame, dataset: str, intervals: pd.DataFrame | None = None,
                shipped: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The study's format, one row per model and variant: Model | Variant | Parameters | Seeds | Task-1 F1 |
    Task-2 F1 | Avg F1 (mean ± std over seeds) | its 95% interval | Improvement: the difference to the same
    student trained alone (its `no-kd` variant, same schedule and seeds) with the paired interval.

    The teacher first (an ensemble's members after it), then its linear probe, then every student with
    every variant it trained, the one its export stage ships (`shipped`: {student: variant}) marked.
    Every number is formatted once from full precision.
    """
    groups = model_groups(runs[runs.dataset == dataset])
    t1, t2 = groups.iloc[0]["task1"], groups.iloc[0]["task2"]
    ci = intervals.set_index("name") if intervals is not None else None
    diffs = intervals[intervals.kind == "difference"].set_index("name") if intervals is not None else None
    rows = []
    for r in groups.itertuples():
        label = run_label(r.model, r.variant)
        improvement = reading = ""
        if r.variant == "teacher":
            members = getattr(r, "members", 1)
            members = 1 if pd.isna(members) else int(members)
            size = getattr(r, "image_size", None)
            name = (f"Teacher ({f'ensemble of {members}, ' if members > 1 else ''}"
                    f"{f'{int(size)} px, ' if size and not pd.isna(size) else ''}{r.backbones})")
            variant = "reference"
        elif r.variant == TEACHER_MEMBER:
            name, variant = "Teacher member (each alone)", "reference"
        elif r.variant == PROBE:
            name, variant = f"Linear probe (the teacher's frozen {r.backbones})", "reference"
        else:
            name = f"Student {r.model} ({r.backbones})"
            variant = r.variant + (" (shipped)" if (shipped or {}).get(r.model) == r.variant else "")
            found = _difference(diffs, label, run_label(r.model, NO_KD)) if diffs is not None else None
            if r.variant == NO_KD:
                improvement = "(trained alone)"
            elif found is not None:
                estimate, low, high, _ = found
                improvement, reading = _signed(estimate, low, high), _reading(low, high, "better", "worse")
        row = {"Model": name, "Variant": variant, "Parameters": f"{r.parameters / 1e6:.2f}M", "Seeds": r.seeds,
               f"Test {t1.capitalize()} F1": _mean_std(r.task1_f1, r.task1_f1_std, r.seeds),
               f"Test {t2.capitalize()} F1": _mean_std(r.task2_f1, r.task2_f1_std, r.seeds),
               "Avg F1": f"**{_mean_std(r.avg_f1, r.avg_f1_std, r.seeds)}**"}
        if ci is not None:
            row["Avg F1 95% CI"] = _ci(ci.loc[label] if label in ci.index else None)
        row["Improvement vs same student alone [95% CI]"] = improvement
        row["Reading"] = reading
        rows.append(row)
    return pd.DataFrame(rows)


def interval_table(runs: pd.DataFrame, dataset: str, seed: int = 0, n_resamples: int = N_RESAMPLES,
                   bases: Mapping[str, str | None] | None = None) -> pd.DataFrame:
    """Test avg macro-F1 of every model of `dataset` (seed-averaged) and the differences the study's
    claims rest on, with paired bootstrap 95% intervals over the test images and seeds (`medkd.scoring.stats`):
    each student − teacher, Optuna best − tuned, KD − no-KD, and each other
    variant − its `base:` (the ablations; `bases` from `medkd.config.study.variant_bases`)."""
    sub = runs[runs.dataset == dataset]
    t1, t2 = sub.iloc[0]["task1"], sub.iloc[0]["task2"]
    frames = {run_label(model, variant): list(group.predictions)
              for (model, variant), group in sub.groupby(["model", "variant"], sort=False)}
    differences = [("teacher", REFERENCES[other]) for other in (TEACHER_MEMBER, PROBE)
                   if {"teacher", REFERENCES[other]} <= frames.keys()]
    for model, variant in dict.fromkeys(zip(sub.model, sub.variant)):
        if variant in REFERENCES:
            continue
        label = run_label(model, variant)

        def add(other: str, label=label, model=model) -> None:
            if run_label(model, other) in frames:
                differences.append((label, run_label(model, other)))

        if variant in MAIN_VARIANTS:
            if "teacher" in frames:
                differences.append((label, "teacher"))
            if variant == OPTUNA_BEST:
                add("tuned")
            if variant != NO_KD:
                add(NO_KD)
        else:
            if (bases or {}).get(variant):
                add(bases[variant])
            if variant != NO_KD and (bases or {}).get(variant) != NO_KD:
                add(NO_KD)  # every variant against the same student trained alone (the claims)
    table = paired_intervals(frames, [t1, t2], differences, n_resamples=n_resamples, seed=seed)
    table["reading"] = [("" if kind == "model" else "detectable" if detectable else "no detectable difference")
                        for kind, detectable in zip(table["kind"], table.get("detectable", [None] * len(table)))]
    return table.drop(columns=["detectable"], errors="ignore")  # full precision: every table rounds once


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


FIDELITY = ("agree_dev_task1", "agree_dev_task2", "agree_test_task1", "agree_test_task2", "kl_dev")


def all_runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run, one row per seed; a student's with its fidelity to its teacher (`FIDELITY`: agreement of
    predicted classes per split and task, dev KL(teacher || student))."""
    cols = ["dataset", "model", "variant", "seed", "backbones", "parameters", "task1_f1", "task2_f1", "avg_f1",
            "task1_acc", "task2_acc", "dev_avg_f1", "best_epoch", "seconds", "n_test",
            *(c for c in FIDELITY if c in runs)]
    return runs[cols].round(4)


def fidelity_table(runs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Per student and variant (mean over seeds): how often it predicts its teacher's class, on dev and on
    test (per task), and its dev KL(teacher || student), beside its test avg F1: a variant that agrees more
    than the same student alone did take something from the teacher, whether or not it scores higher."""
    sub = runs[(runs.dataset == dataset) & ~runs.variant.isin(list(REFERENCES))]
    if not len(sub) or "kl_dev" not in sub:
        return pd.DataFrame()
    t1, t2 = sub.iloc[0]["task1"], sub.iloc[0]["task2"]
    grouped = sub.groupby(["model", "variant"], sort=False)
    means = grouped[[*FIDELITY, "avg_f1"]].mean()
    return pd.DataFrame([{
        "Student": model, "Variant": variant, "Seeds": len(grouped.get_group((model, variant))),
        f"Agreement dev {t1}": f"{r.agree_dev_task1:.3f}", f"Agreement dev {t2}": f"{r.agree_dev_task2:.3f}",
        f"Agreement test {t1}": f"{r.agree_test_task1:.3f}", f"Agreement test {t2}": f"{r.agree_test_task2:.3f}",
        "Dev KL to teacher (nats)": f"{r.kl_dev:.3f}", "Test avg F1": f"{r.avg_f1:.3f}",
    } for (model, variant), r in means.iterrows()])


# The study's baseline teacher settings; the pipeline trains no baseline teacher, the table quotes them.
STUDY_TEACHER_BASELINE = {"train.lr": 1e-5, "model.dropout": 0.1}


# (row label, key path inside a distill variant; None: a teacher-only row)
HYPERPARAMETER_ROWS = (
    ("KL weight (alpha)", "loss.kl.weight"),
    ("MSE weight (beta)", "loss.mse.weight"),
    ("CRD weight (gamma)", "loss.crd.weight"),
    ("T (temperature)", "loss.kl.temperature"),
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

    Optuna's parameters are named by the same key paths as the distill variants (`loss.kl.weight`).
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
            fmt(best["params"].get(key)) if key and key in best["params"] else "" for key in table["key"]]
    table["Baseline"] = table["Baseline"].map(fmt)
    table["Optimized"] = table["Optimized"].map(fmt)
    return table.drop(columns="key")


def fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def run_names(frame: pd.DataFrame) -> list[str]:
    return [f"{m} [{v}]" for m, v in zip(frame.model, frame.variant)]


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


def loss_driver_summary(probes: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per run and term: mean weighted value and mean share of the gradient norm over all probes."""
    rows = []
    for name, frame in probes.items():
        share = frame.grad_norm / frame.groupby("step").grad_norm.transform("sum")
        summary = frame.assign(share=share).groupby("term", sort=False)[["weighted_value", "share"]].mean()
        rows += [{"run": name, "term": term, "mean weighted value": v.weighted_value, "mean gradient share": v.share}
                 for term, v in summary.iterrows()]
    return pd.DataFrame(rows).round(4)


KL_ONLY = "kl-only"  # Hinton KD: CE + alpha KL at the study's T (params.yaml `distill.kl-only`)
CLAIMS = (  # (claim, the student's variant or the teacher, against the same student trained alone)
    ("Distillation (Hinton: CE + α·KL) helps the student", KL_ONLY),
    ("The study's combined loss (CE + KL + MSE + CRD, its tuned weights) helps", "tuned"),
    ("The searched loss weights help", OPTUNA_BEST),
)
MIN_CLAIM_SEEDS = 3
TEACHER_LEAD_GOAL = 0.02  # the teacher's dev lead over the best student trained alone that makes it worth distilling


def claims_table(intervals: pd.DataFrame, students: Sequence[str]) -> pd.DataFrame:
    """The study's questions about distillation, each as one paired comparison of a student (the primary
    one, the positive controls) with the same student trained alone (no-KD, CE only), with its interval
    over test images and seeds.

    A comparison with fewer than `MIN_CLAIM_SEEDS` seeds on either arm is shown but read as
    "too few seeds": seed-to-seed variation can flip it between machines."""
    rows = []
    diffs = intervals[intervals.kind == "difference"].set_index("name")
    for student in students:
        control = run_label(student, NO_KD)
        for claim, variant in CLAIMS:
            arm = run_label(student, variant)
            found = _difference(diffs, arm, control)
            if found is None:
                continue
            estimate, low, high, seeds = found
            reading = ("too few seeds (fewer than 3 on an arm)" if seeds < MIN_CLAIM_SEEDS
                       else _reading(low, high, "yes", "no: it hurts"))
            rows.append({"Student": student, "Claim": claim, "Compared": f"{arm} − {control}",
                         "Seeds (fewer arm)": seeds, "Difference": f"{estimate:+.3f}",
                         "95% interval": _interval(low, high), "Reading": reading})
    return pd.DataFrame(rows)


def _difference(diffs: pd.DataFrame, arm: str, other: str) -> tuple[float, float, float, int] | None:
    """`arm − other` (estimate, low, high, seeds of the fewer arm) from an interval table's differences,
    whichever way round it was stored."""
    if f"{arm} − {other}" in diffs.index:
        r = diffs.loc[f"{arm} − {other}"]
        return r.estimate, r.low, r.high, int(r.seeds)
    if f"{other} − {arm}" in diffs.index:
        r = diffs.loc[f"{other} − {arm}"]
        return -r.estimate, -r.high, -r.low, int(r.seeds)
    return None


def teacher_comparisons(runs: pd.DataFrame, dataset: str, split: str, seed: int = 0,
                        n_resamples: int = N_RESAMPLES) -> pd.DataFrame:
    """The teacher − its linear probe, − its members alone, − each student trained alone (no-KD) on one
    split ("dev": the prediction files' dev half), as `paired_intervals` differences (images × seeds)."""
    sub = runs[runs.dataset == dataset]
    column = "dev_predictions" if split == "dev" else "predictions"
    frames = {run_label(model, variant): list(group[column])
              for (model, variant), group in sub.groupby(["model", "variant"], sort=False)
              if variant in REFERENCES or variant == NO_KD}
    if "teacher" not in frames or any(f is None for fs in frames.values() for f in fs):
        return pd.DataFrame()
    pairs = [("teacher", other) for other in frames if other != "teacher"]
    if not pairs:
        return pd.DataFrame()
    t1, t2 = sub.iloc[0]["task1"], sub.iloc[0]["task2"]
    table = paired_intervals(frames, [t1, t2], pairs, n_resamples=n_resamples, seed=seed)
    return table[table.kind == "difference"]


def teacher_table(test: pd.DataFrame, dev: pd.DataFrame) -> pd.DataFrame:
    """Is the teacher worth distilling? The teacher against its own linear probe (what its pretrained
    backbones give without training), its members alone (an ensemble's), and each student trained alone
    (no-KD), on dev (where the teacher is chosen) and on test; `teacher_comparisons` of each split. The
    teacher answers as one model: its intervals cover the test images and the other arm's seeds."""
    rows = []
    by_split = {"dev": dev.set_index("name") if len(dev) else None, "test": test.set_index("name") if len(test) else None}
    names = [n.split(" − ", 1)[1] for n in (test if len(test) else dev).name if n.startswith("teacher − ")]
    for other in names:
        row = {"Compared": f"teacher − {other}"}
        for split, diffs in by_split.items():
            found = _difference(diffs, "teacher", other) if diffs is not None else None
            if found is None:
                row[f"{split.capitalize()} difference [95% CI]"] = ""
                continue
            estimate, low, high, seeds = found
            row["Seeds (fewer arm)"] = seeds
            row[f"{split.capitalize()} difference [95% CI]"] = _signed(estimate, low, high)
            row[f"{split.capitalize()} reading"] = _reading(low, high, "teacher better", "teacher worse")
        rows.append(row)
    return pd.DataFrame(rows)


def teacher_lead(runs: pd.DataFrame, dev: pd.DataFrame, dataset: str) -> str | None:
    """The goal line: the teacher's dev lead over the best student trained alone (highest mean dev avg F1
    over its seeds), against `TEACHER_LEAD_GOAL` and its paired dev interval."""
    alone = runs[(runs.dataset == dataset) & (runs.variant == NO_KD)]
    if not len(alone) or not len(dev):
        return None
    best = alone.groupby("model", sort=False).dev_avg_f1.mean().idxmax()
    found = _difference(dev.set_index("name"), "teacher", run_label(best, NO_KD))
    if found is None:
        return None
    estimate, low, high, _ = found
    met = estimate >= TEACHER_LEAD_GOAL and low > 0
    seeds = int((alone.model == best).sum())  # the student's; the fewer arm is the teacher, one model
    return (f"Teacher lead on dev over the best student trained alone ({best}, {seeds} seed{'s' * (seeds != 1)}): "
            f"{_signed(estimate, low, high)}; goal: at least +{TEACHER_LEAD_GOAL:.2f} with an interval above 0: "
            f"**{'met' if met else 'not met'}**.")


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
                         "95% interval": _interval(diff.low, diff.high),
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
        row = {"Model": f"{d['model']} ({d['backbones']})", "Run": d.get("run", ""),
               "Parameters": f"{d['parameters'] / 1e6:.2f}M",
               "MB fp32": f"{fp32['mb']:.1f}", "MB int8": f"{int8['mb']:.1f}" if int8 else "",
               "p50 / p95 ms (1 thread)": f"{lat['p50_ms']:.1f} / {lat['p95_ms']:.1f}",
               "int8 p50 ms": f"{int8['latency_1_thread']['p50_ms']:.1f}" if int8 else "",
               "Speed-up vs teacher [95% CI]": speedup_cell(d),
               "Avg F1 fp32": f"{fp32['avg_f1']:.3f}", "Avg F1 int8": f"{int8['avg_f1']:.3f}" if int8 else "",
               "int8 ΔF1 [95% CI]": int8_cell(int8) if int8 else "",
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


def int8_verdict(int8: Mapping, max_drop: float) -> str:
    """met: the int8 change's whole interval is above −max_drop; missed: wholly below; else not detectable
    (a record without an interval is read by its point estimate)."""
    low, high = int8.get("avg_f1_change_ci95") or [int8["avg_f1_change"]] * 2
    return "met" if low >= -max_drop else "missed" if high < -max_drop else "not detectable"


def int8_cell(int8: Mapping) -> str:
    interval = int8.get("avg_f1_change_ci95")
    return _signed(int8["avg_f1_change"], *interval) if interval else f"{int8['avg_f1_change']:+.3f}"


def deployment_goals(deployments: Sequence[Mapping], speedup_goal: float, int8_max_f1_drop: float) -> list[str]:
    """The deployment goals read off the export stages' measurements: each student's paired speed-up
    over its teacher against `speedup_goal` (by its interval), and each model's int8 avg-F1 change
    against `-int8_max_f1_drop` (by its paired interval over the test images)."""
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
        by_verdict = {}
        for d in quantized:
            by_verdict.setdefault(int8_verdict(d["int8"], int8_max_f1_drop), []).append(
                f"{d['model']} ({int8_cell(d['int8'])})")
        met = len(by_verdict.pop("met", []))
        lines.append(f"- **int8 costs at most {int8_max_f1_drop:g} avg F1** (the whole 95% interval of its change from "
                     f"fp32, over the test images, above −{int8_max_f1_drop:g}): met by {met} of {len(quantized)} models"
                     + "".join(f"; {verdict}: {', '.join(names)}" for verdict, names in by_verdict.items()) + ".")
    return lines
