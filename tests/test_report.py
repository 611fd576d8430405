"""report.py draws from what it is given: tables on hand-made runs, figures written whole."""

import re

import numpy as np
import pandas as pd
import pytest
import yaml

from medkd.catalog.synthetic import make_synthetic_medpix, make_synthetic_wound
from medkd.data.prepared import DataConfig, PreparedData
from medkd.reporting import data_report, figures, page, plots, tables

PNG = b"\x89PNG\r\n\x1a\n"


def _run(dataset, model, variant, f1s, params=1_000_000, tasks=("type", "severity"), seed=42):
    classes = (("A", "B"), ("x", "y", "z"))
    return {"dataset": dataset, "model": model, "variant": variant, "seed": seed, "backbones": "v + t",
            "parameters": params,
            "task1": tasks[0], "task2": tasks[1], "task1_f1": f1s[0], "task2_f1": f1s[1],
            "avg_f1": (f1s[0] + f1s[1]) / 2, "task1_acc": 0.9, "task2_acc": 0.8, "dev_avg_f1": 0.7,
            "best_epoch": 2, "seconds": 12.3, "n_test": 10,
            "confusion1": [[3, 1], [0, 6]], "confusion2": [[2, 0, 0], [1, 3, 0], [0, 0, 4]],
            "classes1": classes[0], "classes2": classes[1],
            "history": pd.DataFrame({"epoch": [1, 2], "dev_avg_f1": [0.5, 0.7], "train_total": [3.0, 2.0],
                                    "train_ce": [1.5, 1.0]})}


@pytest.fixture
def runs():
    return pd.DataFrame([
        _run("wound", "Teacher", "teacher", (0.9, 0.8), params=100_000_000),
        _run("wound", "s1", "tuned", (0.8, 0.6)),
        _run("wound", "s1", "baseline", (0.7, 0.5)),
        _run("wound", "s1", "optuna-best", (0.85, 0.75), params=2_000_000),
    ])


def test_study_table_shows_every_variant_against_the_same_student_alone_rounded_once(runs):
    runs = pd.concat([runs, pd.DataFrame([_run("wound", "s1", "no-kd", (0.75, 0.55))])], ignore_index=True)
    intervals = pd.DataFrame([
        {"name": "s1 tuned − s1 no-kd", "kind": "difference", "estimate": 0.01646, "low": -0.00454, "high": 0.0356,
         "seeds": 3},
        {"name": "s1 optuna-best − s1 no-kd", "kind": "difference", "estimate": 0.10049, "low": 0.0205,
         "high": 0.181, "seeds": 3},
        {"name": "s1 tuned", "kind": "model", "estimate": 0.7, "low": 0.61, "high": 0.79, "seeds": 3},
    ])
    table = tables.study_table(runs, "wound", intervals, shipped={"s1": "no-kd"})
    assert list(table.columns) == ["Model", "Variant", "Parameters", "Seeds", "Test Type F1", "Test Severity F1",
                                   "Avg F1", "Avg F1 95% CI", "Improvement vs same student alone [95% CI]", "Reading"]
    assert table["Model"].tolist() == ["Teacher (v + t)"] + ["Student s1 (v + t)"] * 4
    assert table["Variant"].tolist() == ["reference", "tuned", "baseline", "optuna-best", "no-kd (shipped)"]
    assert "Baseline" not in table["Improvement vs same student alone [95% CI]"].tolist()
    assert table["Parameters"].tolist() == ["100.00M", "1.00M", "1.00M", "2.00M", "1.00M"]
    assert table["Avg F1"].tolist() == ["**0.850**", "**0.700**", "**0.600**", "**0.800**", "**0.650**"]
    # 0.01646 prints +0.016 (rounded once from full precision, not +0.0165 -> +0.017).
    assert table["Improvement vs same student alone [95% CI]"].tolist() == [
        "", "+0.016 [-0.005, +0.036]", "", "+0.100 [+0.021, +0.181]", "(trained alone)"]
    assert table["Reading"].tolist() == ["", "not detectable", "", "better", ""]
    assert table["Avg F1 95% CI"].tolist() == ["", "[0.610, 0.790]", "", "", ""]


def test_all_runs_table_is_rounded_and_complete(runs):
    table = tables.all_runs_table(runs)
    assert len(table) == 4 and "confusion1" not in table.columns
    assert table.loc[1, "avg_f1"] == 0.7


def test_hyperparameter_table_reads_each_row_at_its_key_path():
    params = yaml.safe_load("""
teachers: {medpix: {model: {dropout: 0.185}, train: {lr: 4.79e-05}}}
distill:
  tuned: {model: {fusion_dim: 384, fusion_layers: 2, fusion_heads: 4, dropout: 0.238},
          loss: {ce: {weight: 1.0}, kl: {weight: 0.518, temperature: 3.19}, mse: {weight: 112.4}, crd: {weight: 10.0}},
          train: {lr: 1.05e-04}}
  baseline: {model: {fusion_dim: 256, fusion_layers: 1, fusion_heads: 8, dropout: 0.1},
             loss: {ce: {weight: 1.0}, kl: {weight: 1.0, temperature: 2.0}, mse: {weight: 100.0}, crd: {weight: 10.0}},
             train: {lr: 3.0e-04}}
""")
    best = {"params": {"loss.kl.weight": 0.3123, "model.fusion_layers": 3}}
    table = tables.hyperparameter_table(params, best).set_index("Parameter")
    assert table.loc["KL weight (alpha)"].tolist() == ["1", "0.518", "0.312"]
    assert table.loc["MSE weight (beta)"].tolist() == ["100", "112", ""]
    assert table.loc["T (temperature)", "Optimized"] == "3.19"
    assert table.loc["Teacher LR"].tolist() == ["1e-05", "4.79e-05", ""]
    assert table.loc["Student fusion layers"].tolist() == ["1", "2", "3"]
    assert table.loc["Teacher dropout", "Optimized"] == "0.185"


@pytest.fixture(scope="module")
def medpix(tmp_path_factory):
    root = make_synthetic_medpix(tmp_path_factory.mktemp("medpix"), sizes=(10, 4, 4), image_size=16)
    return PreparedData.load(DataConfig("medpix", str(root), image_size=16))


def test_class_balance_counts_each_class_per_split(medpix):
    balance = data_report.class_balance(medpix)
    for t, task in enumerate(medpix.vocab.tasks):
        for split in ("train", "dev", "test"):
            counts = pd.Series([r.labels[t] for r in medpix.records[split]]).value_counts()
            assert balance.loc[task][split].to_dict() == {c: counts.get(c, 0) for c in medpix.vocab.classes[t]}


def test_text_statistics_counts_captions_that_name_the_label(medpix, tmp_path):
    stats = data_report.text_statistics(medpix)
    assert stats.loc["train", "names_modality_pct"] == 0.0  # synthetic captions never say CT/MR
    records = medpix.records["train"]
    texts = ["an MRI of the head", "CT shows", "computed", "T2 FLAIR", "xct", "mr"] + [r.text for r in records[6:]]
    medpix.records["train"] = [type(r)(r.image_id, r.image_path, text, r.labels) for r, text in zip(records, texts)]
    try:
        stats = data_report.text_statistics(medpix)
    finally:
        medpix.records["train"] = records
    # Whole upper-case words only: "MRI", "CT", "T2" count; "computed", "xct" and "mr" do not.
    assert stats.loc["train", "names_modality_pct"] == pytest.approx(100 * 3 / 10, abs=0.05)
    words = np.array([len(t.split()) for t in texts])
    assert stats.loc["train", "words_mean"] == round(float(words.mean()), 1)


def test_wound_statistics_have_no_label_word_column(tmp_path):
    root = make_synthetic_wound(tmp_path / "wound", sizes=(8, 4, 4), image_size=16)
    stats = data_report.text_statistics(PreparedData.load(DataConfig("wound", str(root), image_size=16)))
    assert not [c for c in stats.columns if c.startswith("names_")]


def test_figures_are_written_whole(runs, medpix, tmp_path):
    figures.plot_f1_per_model(runs, tmp_path / "f1.png")
    figures.plot_params_vs_f1(runs, tmp_path / "size.png")
    figures.plot_confusions(runs, tmp_path / "confusion.png")
    figures.plot_training_curves(runs, tmp_path / "curves.png")
    data_report.plot_class_balance(data_report.class_balance(medpix), tmp_path / "balance.png")
    data_report.plot_examples(medpix, tmp_path / "examples.png")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["balance.png", "confusion.png", "curves.png", "examples.png", "f1.png", "size.png"]
    assert all((tmp_path / name).read_bytes().startswith(PNG) for name in written)


def test_log_axes_label_1_2_3_5_steps_in_plain_numbers_and_one_size():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.scatter([4.7, 12.0, 66.0], [0.6, 0.7, 0.8])
    plots.log_x_axis(ax)
    fig.canvas.draw()
    low, high = ax.get_xlim()
    shown = [(tick.get_loc(), tick.label1.get_text(), tick.label1.get_fontsize()) for tick in ax.xaxis.get_major_ticks()
             if low <= tick.get_loc() <= high]
    assert [text for _, text, _ in shown] == ["5", "10", "20", "30", "50"]
    assert all(loc == float(text) for loc, text, _ in shown)
    assert len({size for _, _, size in shown}) == 1
    assert not any(tick.label1.get_text() for tick in ax.xaxis.get_minor_ticks())
    plt.close(fig)


def _deployment(model, int8_change, paired=None, int8_ci=None):
    d = {"model": model, "int8": {"avg_f1_change": int8_change, **({"avg_f1_change_ci95": int8_ci} if int8_ci else {})}}
    if paired is not None:
        d["speedup_vs_teacher"] = {"speedup": paired[0], "ci95": list(paired[1:])}
    return d


def test_deployment_goals_judge_each_speed_up_by_its_interval_and_each_int8_change():
    deployments = [_deployment("teacher-medpix", -0.007, int8_ci=[-0.012, 0.002]),
                   _deployment("s-fast", 0.0, (5.3, 5.0, 5.6), int8_ci=[-0.004, 0.004]),
                   _deployment("s-close", -0.01, (5.24, 4.97, 5.55)),
                   _deployment("s-slow", -0.0101, (4.51, 4.31, 4.82), int8_ci=[-0.02, -0.011]),
                   _deployment("s-unpaired", 0.002)]
    assert [tables.speedup_verdict(d.get("speedup_vs_teacher"), 5.0) for d in deployments[1:]] == [
        "met", "not detectable", "missed", "not measured"]
    assert tables.speedup_verdict({"ci95": [4.2, 4.99]}, 5.0) == "missed"
    assert tables.speedup_verdict({"ci95": [6.1, 7.0]}, 6.5) == "not detectable"
    speed, int8 = tables.deployment_goals(deployments, 5.0, 0.01)[2:]
    assert speed == ("- **Speed-up ≥ 5× over the teacher** (batch 1, 1 thread): met by 1 of 4 students; "
                     "not detectable: s-close (5.24× [4.97, 5.55]); missed: s-slow (4.51× [4.31, 4.82]); "
                     "not measured: s-unpaired.")
    # By the paired interval of each change (a record without one: its point estimate, -0.01 being within a
    # 0.01 allowance); the teacher counts for int8 (it is exported too).
    assert int8 == ("- **int8 costs at most 0.01 avg F1** (the whole 95% interval of its change from fp32, over the "
                    "test images, above −0.01): met by 3 of 5 models; not detectable: teacher-medpix (-0.007 [-0.012, "
                    "+0.002]); missed: s-slow (-0.010 [-0.020, -0.011]).")
    lines = tables.deployment_goals(deployments[:2], 5.0, 0.02)
    assert lines[2].endswith("met by 1 of 1 students.") and lines[3].endswith("met by 2 of 2 models.")


def test_data_report_markdown_explains_label_word_columns(medpix):
    summary = {"dataset": "medpix", "sizes": {"train": 10}, "text_fields": ["Caption"]}
    text = data_report.data_report_markdown(summary, data_report.class_balance(medpix), data_report.text_statistics(medpix))
    assert "`names_modality_pct`: share of texts that name the modality label" in text
    assert "![class balance](class_balance.png)" in text


def test_interval_table_pairs_the_claims_and_says_what_is_not_detectable():
    ids = [f"i{k}" for k in range(12)]
    truth = {"type": ["A", "B"] * 6, "severity": ["x", "y", "z"] * 4}

    def predictions(wrong_type):
        return pd.DataFrame({"image_id": ids, "type_true": truth["type"], "severity_true": truth["severity"],
                             "severity_pred": truth["severity"],
                             "type_pred": [{"A": "B", "B": "A"}[t] if wrong_type else t for t in truth["type"]]})

    rows = [_run("wound", "Teacher", "teacher", (1.0, 1.0)), _run("wound", "s1", "tuned", (1.0, 1.0)),
            _run("wound", "s1", "no-kd", (0.0, 1.0))]
    for row, wrong in zip(rows, (False, False, True)):
        row["predictions"] = predictions(wrong)
    table = tables.interval_table(pd.DataFrame(rows), "wound", n_resamples=300).set_index("name")
    assert list(table.index) == ["teacher", "s1 tuned", "s1 no-kd", "s1 tuned − teacher",
                                 "s1 tuned − s1 no-kd", "s1 no-kd − teacher"]
    assert table.loc["s1 tuned − teacher", ["estimate", "low", "high"]].tolist() == [0.0, 0.0, 0.0]
    assert table.loc["s1 tuned − teacher", "reading"] == "no detectable difference"
    # no-kd gets every type wrong (type F1 0, severity F1 1): 0.5 below tuned on every resample.
    assert table.loc["s1 tuned − s1 no-kd", ["estimate", "low", "high"]].tolist() == [0.5, 0.5, 0.5]
    assert table.loc["s1 tuned − s1 no-kd", "reading"] == "detectable"
    markdown = tables.interval_markdown(table.reset_index())
    assert re.search(r"\| s1 tuned − teacher +\| 1 +\| \+0\.000 +\| \[\+0\.000, \+0\.000\] +\| no detectable difference +\|",
                     markdown), markdown


def test_per_class_table_counts_each_class_of_each_run(tmp_path):
    frame = pd.DataFrame({"image_id": list("abcdef"), "type_true": list("AABBBB"), "type_pred": list("ABBBBA"),
                          "severity_true": list("xxyyzz"), "severity_pred": list("xxyyzz")})
    row = _run("wound", "s1", "tuned", (0.0, 1.0))
    row["predictions"] = frame
    table = tables.per_class_table(pd.DataFrame([row])).set_index(["task", "class"])
    # type A: 1 of 2 found (recall 0.5), 1 of 2 predicted A right (precision 0.5); B: 3 of 4, 3 of 4.
    assert table.loc[("type", "A"), ["precision", "recall", "f1", "support"]].tolist() == [0.5, 0.5, 0.5, 2]
    assert table.loc[("type", "B"), ["precision", "recall", "f1", "support"]].tolist() == [0.75, 0.75, 0.75, 4]
    assert (table.loc["severity", "f1"] == 1.0).all() and table.loc["severity", "support"].tolist() == [2, 2, 2]
    figures.plot_per_class_f1(table.reset_index(), tmp_path / "per_class.png")
    assert (tmp_path / "per_class.png").read_bytes().startswith(PNG)


def test_results_name_the_environment_and_flag_mixed_ones(runs):
    env = {"cpu": "AMD EPYC", "cpu_isa": "AVX512", "cpu_count": 2, "torch_threads": 2, "gpu": None,
           "precision": "bf16 autocast", "python": "3.11.7", "versions": {"torch": "2.14.1"}}
    same = runs.assign(environment=[env] * len(runs))
    lines = "\n".join(tables.environment_lines(same))
    assert "CPU AMD EPYC (torch kernels: AVX512), 2 cores, 2 torch threads; GPU none; bf16 autocast" in lines
    assert "different environments" not in lines
    mixed = runs.assign(environment=[env] * (len(runs) - 1) + [{**env, "cpu_isa": "AVX512_BF16_AMX"}])
    assert "ran in 2 different environments" in "\n".join(tables.environment_lines(mixed))
    assert tables.environment_lines(runs) == []  # runs from before environments were recorded


def test_a_runs_own_facts_do_not_make_another_environment(runs):
    # The teacher's and a student's trunk caches differ in size; the probe records no world size.
    env = {"cpu": "AMD EPYC", "cpu_isa": "AVX2", "cpu_count": 2, "torch_threads": 2, "gpu": None,
           "precision": "fp32", "python": "3.11.7", "versions": {"torch": "2.14.1"}}
    recorded = [{**env, "world_size": 1, "trunk_cache_mb": 331.2}, {**env, "world_size": 1, "trunk_cache_mb": 180.9},
                env] + [{**env, "world_size": 1}] * (len(runs) - 3)
    machines = [page.machine_environment(e) for e in recorded]
    assert "different environments" not in "\n".join(tables.environment_lines(runs.assign(environment=machines)))
    two_ranks = machines[:-1] + [{**env, "world_size": 2}]
    assert "ran in 2 different environments" in "\n".join(
        tables.environment_lines(runs.assign(environment=two_ranks)))


def test_models_with_several_seeds_show_mean_and_std_and_every_seed_in_all_runs(runs):
    seeds = pd.DataFrame([_run("wound", "s1", "tuned", (0.9, 0.7), seed=7), _run("wound", "s1", "tuned", (0.7, 0.5),
                                                                                 seed=8)])
    table = tables.study_table(pd.concat([runs, seeds], ignore_index=True), "wound").set_index(["Model", "Variant"])
    # tuned avg F1 over seeds 42, 7, 8: 0.70, 0.80, 0.60 -> mean 0.70, std 0.10.
    tuned = table.loc[("Student s1 (v + t)", "tuned")]
    assert tuned["Avg F1"] == "**0.700 ± 0.100**"
    assert tuned["Seeds"] == 3 and tuned["Test Type F1"] == "0.800 ± 0.100"
    assert table.loc[("Teacher (v + t)", "reference"), "Avg F1"] == "**0.850**"
    all_runs = tables.all_runs_table(pd.concat([runs, seeds], ignore_index=True))
    assert all_runs[all_runs.variant == "tuned"].seed.tolist() == [42, 7, 8]


def _predicted(rows, right):
    """Give each run predictions on 12 test images: `right[k]` of its type labels correct."""
    ids = [f"i{k}" for k in range(12)]
    truth = ["A", "B"] * 6
    for row, n in zip(rows, right):
        row["predictions"] = pd.DataFrame({"image_id": ids, "type_true": truth, "severity_true": ["x"] * 12,
                                           "severity_pred": ["x"] * 12,
                                           "type_pred": truth[:n] + [{"A": "B", "B": "A"}[t] for t in truth[n:]]})
    return pd.DataFrame(rows)


def test_ablations_are_compared_with_their_base_and_interval_tables_with_seeds():
    runs = _predicted([_run("wound", "Teacher", "teacher", (1, 1)), _run("wound", "s1", "tuned", (1, 1)),
                       _run("wound", "s1", "tuned", (1, 1), seed=7), _run("wound", "s1", "no-kd", (1, 1)),
                       _run("wound", "s1", "no-crd", (1, 1))], right=[12, 12, 12, 12, 0])
    bases = {"tuned": None, "baseline": None, "no-kd": "tuned", "no-crd": "tuned"}
    table = tables.interval_table(runs, "wound", n_resamples=200, bases=bases).set_index("name")
    assert table.loc["s1 tuned", "seeds"] == 2 and table.loc["s1 no-crd", "seeds"] == 1
    assert "s1 no-crd − s1 tuned" in table.index and "s1 no-crd − teacher" not in table.index
    assert "s1 tuned − s1 no-kd" in table.index and "s1 no-kd − s1 tuned" not in table.index
    # no-crd gets every type wrong: type F1 0, severity F1 1 -> avg 0.5, 0.5 below tuned on every resample.
    assert table.loc["s1 no-crd − s1 tuned", ["estimate", "low", "high"]].tolist() == [-0.5, -0.5, -0.5]
    ablations = tables.ablation_table(table.reset_index(), bases)
    assert ablations.to_dict("records") == [{
        "Model": "s1 no-crd", "Seeds": 1, "Avg F1": "0.500", "Compared with": "s1 tuned", "Difference": "-0.500",
        "95% interval": "[-0.500, -0.500]", "Reading": "detectable"}]


def test_masking_table_pairs_each_model_with_its_unmasked_twin():
    plain = _predicted([_run("medpix", "Teacher", "teacher", (1, 1)), _run("medpix", "s1", "tuned", (1, 1))],
                       right=[12, 12])
    masked = _predicted([_run("medpix-masked", "Teacher", "teacher", (1, 1)),
                         _run("medpix-masked", "s1-masked", "tuned", (1, 1))], right=[12, 0])
    table = tables.masking_table(pd.concat([plain, masked], ignore_index=True), {"medpix-masked": "medpix"},
                                 n_resamples=100)
    assert table[["Model", "Unmasked", "Masked", "Change", "Reading"]].values.tolist() == [
        ["v + t [teacher]", "1.000", "1.000", "+0.000", "no detectable difference"],
        ["v + t [tuned]", "1.000", "0.500", "-0.500", "detectable"]]


def test_loss_drivers_average_each_terms_value_and_gradient_share(tmp_path):
    probes = {"s [tuned]": pd.DataFrame({"step": [0, 0, 10, 10], "epoch": 1, "term": ["ce", "crd"] * 2,
                                         "weighted_value": [2.0, 100.0, 1.0, 50.0],
                                         "grad_norm": [1.0, 3.0, 1.0, 1.0]})}
    summary = tables.loss_driver_summary(probes).set_index("term")
    # Shares per step: (1/4, 3/4) then (1/2, 1/2) -> means 0.375 and 0.625.
    assert summary.loc["crd", ["mean weighted value", "mean gradient share"]].tolist() == [75.0, 0.625]
    assert summary.loc["ce", "mean gradient share"] == 0.375
    assert "carries 62% of" in tables.gamma_finding(summary.reset_index())
    assert "drives the student's gradient" in tables.gamma_finding(summary.reset_index())
    figures.plot_loss_drivers(probes, tmp_path / "drivers.png")
    assert (tmp_path / "drivers.png").read_bytes().startswith(PNG)


def test_search_figures_are_drawn_from_what_the_search_stage_wrote(tmp_path):
    """Stage search writes trials.csv and importances.json; the report draws the figures from them."""
    import optuna

    from medkd.stages.search import importances, trials_table
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for k in range(5):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1),
                           "y": optuna.distributions.FloatDistribution(0, 1)})
        trial.report(0.1 * k + 0.01, 1)
        if k == 3:
            study.tell(trial, None, state=optuna.trial.TrialState.PRUNED)
        else:
            trial.report(0.1 * k, 2)
            study.tell(trial, 0.1 * k)
    trials = trials_table(study)
    assert trials.loc[3, "state"] == "PRUNED" and trials.loc[3, "last_step"] == 1
    assert trials.loc[3, "last_step_value"] == pytest.approx(0.31)
    assert trials.loc[4, "last_step"] == 2 and trials.loc[4, "last_step_value"] == pytest.approx(0.4)
    found = importances(study, seed=0)
    assert found["complete_trials"] == 4 and set(found["importances"]) == {"x", "y"}
    assert importances(study, seed=0) == found  # seeded: the same study, the same numbers
    trials.to_csv(tmp_path / "trials.csv", index=False)
    figures.plot_search(pd.read_csv(tmp_path / "trials.csv"), found, tmp_path, n_startup_trials=2)
    assert (tmp_path / "optimization_history.png").read_bytes().startswith(PNG)
    assert (tmp_path / "param_importances.png").read_bytes().startswith(PNG)
    figures.plot_importances({"complete_trials": 1, "importances": None, "reason": "too few"}, tmp_path / "none.png")
    assert (tmp_path / "none.png").read_bytes().startswith(PNG)


def _differences(rows) -> pd.DataFrame:
    return pd.DataFrame([{"name": n, "kind": "difference", "estimate": e, "low": lo, "high": hi, "seeds": s,
                          "reading": ""} for n, e, lo, hi, s in rows])


def test_the_claims_table_asks_each_question_against_the_student_trained_alone():
    intervals = _differences([
        ("s kl-only − s no-kd", 0.02, -0.01, 0.05, 3), ("s tuned − s no-kd", -0.10, -0.14, -0.06, 3),
        ("s no-kd − s optuna-best", -0.03, -0.05, -0.01, 2), ("s no-kd − teacher", 0.05, 0.02, 0.08, 1),
    ])
    table = tables.claims_table(intervals, ["s", "absent"])
    # The teacher is no claim: its own table says what its intervals cover. A student without runs has no row.
    assert table["Compared"].tolist() == ["s kl-only − s no-kd", "s tuned − s no-kd", "s optuna-best − s no-kd"]
    assert table["Student"].tolist() == ["s"] * 3
    assert table["Reading"].tolist() == ["not detectable", "no: it hurts", "too few seeds (fewer than 3 on an arm)"]
    assert table.iloc[2]["Difference"] == "+0.030" and table.iloc[2]["95% interval"] == "[+0.010, +0.050]"  # negated
    assert table.iloc[0]["95% interval"] == "[-0.010, +0.050]"


def test_the_teacher_table_sets_the_teacher_against_its_probe_and_each_student_alone_on_dev_and_test():
    test = _differences([("teacher − linear probe", 0.04, 0.01, 0.07, 1), ("teacher − a no-kd", -0.05, -0.08, -0.02, 3),
                         ("teacher − b no-kd", 0.01, -0.02, 0.03, 1)])
    dev = _differences([("teacher − linear probe", 0.02, -0.01, 0.05, 1), ("teacher − a no-kd", 0.03, 0.004, 0.06, 3),
                        ("teacher − b no-kd", 0.0, -0.03, 0.03, 1)])
    table = tables.teacher_table(test, dev)
    assert table["Compared"].tolist() == ["teacher − linear probe", "teacher − a no-kd", "teacher − b no-kd"]
    assert table["Test difference [95% CI]"].tolist() == ["+0.040 [+0.010, +0.070]", "-0.050 [-0.080, -0.020]",
                                                          "+0.010 [-0.020, +0.030]"]
    assert table["Test reading"].tolist() == ["teacher better", "teacher worse", "not detectable"]
    assert table["Dev reading"].tolist() == ["not detectable", "teacher better", "not detectable"]
    # The lead goal: over the student alone with the best mean dev avg F1 (a: 0.80 against b's 0.75), naming
    # the student's own seeds (the interval's fewer arm may be the teacher's one model).
    runs = pd.DataFrame([{"dataset": "d", "model": m, "variant": "no-kd", "dev_avg_f1": f}
                         for m, f in (("a", 0.79), ("a", 0.81), ("b", 0.75))])
    assert tables.teacher_lead(runs, dev, "d") == (
        "Teacher lead on dev over the best student trained alone (a, 2 seeds): +0.030 [+0.004, +0.060]; goal: at "
        "least +0.02 with an interval above 0: **met**.")
    runs.loc[runs.model == "b", "dev_avg_f1"] = 0.9
    assert tables.teacher_lead(runs, dev, "d").endswith("(b, 1 seed): +0.000 [-0.030, +0.030]; goal: at least +0.02 "
                                                        "with an interval above 0: **not met**.")
