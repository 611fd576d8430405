"""Stages `export-teacher@<dataset>` and `export@<student>`: a trained model as an ONNX folder
(`medkd.deploy.onnx_export`), its parity with PyTorch on the whole test split, its CPU latency, size and
int8 cost, measured on real test samples; a student's speed-up is timed against the exported
teacher of its data set in the same stage (`onnx_export.paired_speedup`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd
import torch

from medkd.config.configs import ModelConfig
from medkd.config.params import project_root
from medkd.config.sections import teacher_plan
from medkd.config.stage_settings import export_section
from medkd.config.study import TEACHER_PREFIX, Run, backbones_of, exported_models, student_runs
from medkd.data.prepared import PreparedData, load_data, make_loader
from medkd.deploy import onnx_export
from medkd.deploy.predictor import PredictError, Predictor, load_predictor
from medkd.models.backbones import build_tokenizer
from medkd.models.checkpoint import load_checkpoint
from medkd.models.classifier import count_parameters
from medkd.pipeline.paths import Paths, restore_or_rerun
from medkd.scoring.metrics import predictions_frame
from medkd.scoring.stats import paired_intervals
from medkd.util import progress
from medkd.util.environment import cpu_has_vnni
from medkd.util.files import atomic_write, replace_dir, reset_dir, write_json, write_text
from medkd.util.stored import UnreadableFile

TEACHER_ROLE = "teacher"  # the token role of the exported teacher's inputs in a student's stage
BEST_VARIANT = "best"  # export.variant: each student's run a user would pick, chosen on dev (`pick_run`)
STUDY_F1_TOLERANCE = 0.005  # exported fp32 test avg F1 vs the study's evaluation of the run
DATA_SETTINGS = ("image_size", "max_length", "mask_terms")  # how a model reads the test split


@dataclass(frozen=True)
class Deployed:
    """The run an export stage ships, and how it was picked."""

    checkpoint: Path
    dataset: str
    run: str  # "teacher" or the student's run name, <variant>/seed-<s>
    metrics: Path  # the study's own metrics of that run (its dev and test evaluation)
    selection: Mapping | None = None  # a student's: the rule and every variant's mean dev avg F1


def deployed_run(params: Mapping, paths: Paths, model: str) -> Deployed:
    """The model an export stage ships: a teacher, or the student's run that `export.variant` picks
    (`best`: by dev avg F1, see `pick_run`; a variant's name: that variant's first seed)."""
    if model.startswith(TEACHER_PREFIX) and model.removeprefix(TEACHER_PREFIX) in params.get("teachers", {}):
        dataset = model.removeprefix(TEACHER_PREFIX)
        return Deployed(paths.teacher_checkpoint(dataset), dataset, "teacher",
                        paths.teacher_report(dataset) / "metrics.json")
    runs = student_runs(params, model)
    variant = export_section(params).variant
    selection = None
    if variant == BEST_VARIANT:
        metrics = {run: json.loads((paths.student_report(model) / run.name / "metrics.json").read_text())
                   for run in runs}
        run, selection = pick_run(metrics)
    else:
        run = next(r for r in runs if r.variant == variant)
    return Deployed(paths.student_checkpoint(model, run.name), params["students"][model]["dataset"], run.name,
                    paths.student_report(model) / run.name / "metrics.json", selection)


def pick_run(metrics: Mapping[Run, Mapping]) -> tuple[Run, dict]:
    """What a user would ship, chosen on dev only: the variant with the highest mean dev avg F1 over
    its seeds (a tie, to 1e-4, goes to the variant with fewer parameters, then to the earlier one),
    and of that variant the seed with the highest dev avg F1 (ties: the first)."""
    by_variant: dict[str, list[Run]] = {}
    for run in metrics:
        by_variant.setdefault(run.variant, []).append(run)
    mean_dev = {v: sum(metrics[r]["dev"]["avg_f1"] for r in rs) / len(rs) for v, rs in by_variant.items()}
    size = {v: metrics[rs[0]]["parameters"] for v, rs in by_variant.items()}
    order = list(by_variant)
    best = max(order, key=lambda v: (round(mean_dev[v], 4), -size[v], -order.index(v)))
    run = max(by_variant[best], key=lambda r: (metrics[r]["dev"]["avg_f1"], -by_variant[best].index(r)))
    return run, {"rule": "best mean dev avg F1 over seeds (ties: fewer parameters), then its best dev seed",
                 "variant": best, "mean_dev_avg_f1": {v: round(f, 4) for v, f in mean_dev.items()}}


def study_agreement(exported_f1: float, metrics: Mapping, tolerance: float = STUDY_F1_TOLERANCE) -> dict:
    """The exported fp32 model's test avg F1 against the study's own evaluation of the same run. Both
    compute in fp32 when the run did, so they must agree (to `tolerance`: a logit at 1e-6 from a tie
    may flip one image); a bf16 run is reported, not checked."""
    study, precision = metrics["test"]["avg_f1"], metrics.get("environment", {}).get("precision")
    result = {"study_test_avg_f1": round(study, 4), "difference": round(exported_f1 - study, 4),
              "checked": precision == "fp32", "tolerance": tolerance}
    if result["checked"] and abs(exported_f1 - study) > tolerance:
        raise onnx_export.ExportError(f"the exported fp32 model scores test avg F1 {exported_f1:.4f}, the study's fp32 "
                                 f"evaluation of the same run {study:.4f}: they differ by more than {tolerance}")
    return result


def export_stage(params: Mapping, model: str, root: Path | None = None) -> dict:
    """Export one model (a teacher, or a student's run of `export.variant`) and measure what a user of
    the export gets: parity with PyTorch, test F1, latency and throughput, int8, the speed-up over its teacher."""
    root = root or project_root()
    paths = Paths(root)
    section = export_section(params)
    if model not in exported_models(params):
        return not_exported(paths, model)
    trained = _trained_model(params, paths, model, root)
    data, classifier, tokenizer = trained.data, trained.classifier, trained.tokenizer
    teacher = None if trained.run == "teacher" else exported_teacher(
        paths, trained.dataset, data.at_image_size(teacher_plan(params, trained.dataset).image_size).config)
    progress.update("exporting to ONNX (fp32 and int8)", fraction=0.05, force=True)
    test = data.dataset("test", {onnx_export.ROLE: tokenizer})
    batches = list(make_loader(test, section.throughput_batch, shuffle=False))
    singles = list(make_loader(test, 1, shuffle=False))
    folder = onnx_export.export_model(classifier, trained.model_cfg, tokenizer, batches[0],
                                      onnx_export.Preprocessing.of(data.config, data.vocab), paths.export_model(model),
                                      int8=section.int8, int8_reduce_range=section.int8_reduce_range)
    progress.update("parity with PyTorch on the test split", fraction=0.3, force=True)
    timing = dict(runs=section.latency_runs, warmup=section.warmup)
    sessions = {t: onnx_export.session(folder / onnx_export.FP32, t) for t in section.threads}
    eager = onnx_export.score(lambda b: onnx_export.eager_logits(classifier, b), test)
    fp32 = onnx_export.score(_ort(sessions[max(section.threads)]), test)
    traced = onnx_export.export_form(classifier)
    parity = onnx_export.check_parity(onnx_export.score(lambda b: onnx_export.eager_logits(traced, b), test), fp32,
                                 section.parity_tolerance, trained=eager)
    progress.update("latency and throughput", fraction=0.45, force=True)
    result = {
        "model": model, "run": trained.run, "checkpoint": str(trained.checkpoint.relative_to(root)),
        "backbones": backbones_of(trained.model_cfg.to_dict()),
        "parameters": count_parameters(classifier), "n_test": len(test), "parity": parity,
        "fp32": {"mb": onnx_export.file_mb(folder / onnx_export.FP32), "avg_f1": round(fp32.avg_f1(), 4),
                 **{f"latency_{t}_thread{'s' if t > 1 else ''}": onnx_export.latency(_ort(sessions[t]), singles, **timing)
                    for t in section.threads},
                 f"throughput_batch{section.throughput_batch}_per_s": onnx_export.throughput(
                     _ort(sessions[max(section.threads)]), batches)},
        "eager_avg_f1": round(eager.avg_f1(), 4),
        "study": study_agreement(fp32.avg_f1(), json.loads(trained.deployed.metrics.read_text())),
        **({"selection": trained.deployed.selection} if trained.deployed.selection else {}),
        "cpu_vnni": cpu_has_vnni(),
    }
    progress.update("the speed-up over the teacher, then PyTorch's own latency and int8", fraction=0.65, force=True)
    if teacher is not None:
        teacher_test = data.at_image_size(teacher.image_size).dataset("test", {TEACHER_ROLE: teacher.tokenizer})
        pairs = list(zip(singles, make_loader(teacher_test, 1, shuffle=False)))
        result["speedup_vs_teacher"] = _speedup_over_teacher(folder, sessions, teacher, trained.dataset, pairs, timing)
    result["torch_eager"] = {"latency_1_thread": _eager_latency_one_thread(classifier, singles, timing)}
    report_dir = reset_dir(paths.export_report(model))
    if section.int8:
        result["int8"] = {**_int8_measurements(folder, test, singles, timing, fp32, data, report_dir),
                          "reduce_range": section.int8_reduce_range}
    write_json(report_dir / "deployment.json", result)
    write_json(paths.metrics(f"export-{model}"), lean_metrics(result))
    return {"result": result, "folder": folder}


def not_exported(paths: Paths, model: str) -> dict:
    """The stage of a model marked `export: false`: its outputs say so, and nothing is exported."""
    result = {"model": model, "exported": False, "why": "export: false in params.yaml (a control, not a product)"}
    replace_dir(paths.export_model(model), lambda folder: write_text(folder / "NOT_EXPORTED.txt", result["why"] + "\n"))
    write_json(reset_dir(paths.export_report(model)) / "deployment.json", result)
    write_json(paths.metrics(f"export-{model}"), {"exported": False})
    return {"result": result, "folder": paths.export_model(model)}


@dataclass
class _Trained:
    """The checkpoint an export stage ships, read as it was trained."""

    checkpoint: Path
    dataset: str
    run: str  # "teacher" or the student's run name
    data: PreparedData
    classifier: torch.nn.Module
    model_cfg: ModelConfig
    tokenizer: object
    deployed: Deployed


def _trained_model(params: Mapping, paths: Paths, model: str, root: Path) -> _Trained:
    deployed = deployed_run(params, paths, model)
    checkpoint, dataset, run = deployed.checkpoint, deployed.dataset, deployed.run
    data = load_data(params, dataset, root)
    if run == "teacher":
        data = data.at_image_size(teacher_plan(params, dataset).image_size)
    stage = f"teacher@{dataset}" if run == "teacher" else f"distill@{model}"
    try:
        classifier, payload = load_checkpoint(checkpoint)
    except UnreadableFile as err:
        raise UnreadableFile(f"checkpoint {err}; to restore or rebuild it: "
                             f"{restore_or_rerun(root, checkpoint, stage)}") from None
    changed = changed_data_setting(payload["data"], data.config)  # the test split is read as the model was trained
    if changed:
        key, trained, now = changed
        raise onnx_export.ExportError(f"{checkpoint} was trained with data.{dataset}.{key} = {trained!r}, "
                                      f"params.yaml now says {now!r}: re-run its training stage first")
    model_cfg = ModelConfig.from_dict(payload["model_config"])
    tokenizer = build_tokenizer(model_cfg.text, model_cfg.text_weights)
    return _Trained(checkpoint, dataset, run, data, classifier.float().eval(), model_cfg, tokenizer, deployed)


def _ort(session):
    return lambda batch: session.run(None, onnx_export.onnx_inputs(batch))


def _speedup_over_teacher(folder: Path, sessions: Mapping, teacher: Predictor, dataset: str, pairs, timing) -> dict:
    """The student's paired speed-up over its teacher's export, both on one thread (whatever
    `export.threads` lists), timed alternately on the same test samples; `pairs`: (the student's batch,
    the teacher's batch) of each sample, each read as its model reads it (the teacher may take larger images)."""
    single_thread = _ort(sessions.get(1) or onnx_export.session(folder / onnx_export.FP32, 1))

    def run_teacher(pair):
        return teacher.logits(*onnx_export.onnx_inputs(pair[1], TEACHER_ROLE).values())

    return {"teacher": f"{TEACHER_PREFIX}{dataset}", "threads": 1, "teacher_image_size": teacher.image_size,
            **onnx_export.paired_speedup(lambda pair: single_thread(pair[0]), run_teacher, pairs, **timing)}


def _eager_latency_one_thread(classifier: torch.nn.Module, singles, timing) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return onnx_export.latency(lambda b: onnx_export.eager_logits(classifier, b), singles, **timing)
    finally:
        torch.set_num_threads(threads)


def _int8_measurements(folder: Path, test, singles, timing, fp32: onnx_export.Scored, data, report_dir: Path) -> dict:
    """The int8 model's size, latency and test F1, and its F1 change from fp32 with a paired bootstrap
    interval over the test images (both models' per-image predictions are written beside)."""
    int8 = onnx_export.session(folder / onnx_export.INT8, 1)
    quantized = onnx_export.score(_ort(int8), test)
    frames = {kind: scored_frame(scored, data) for kind, scored in (("fp32", fp32), ("int8", quantized))}
    for kind, frame in frames.items():
        atomic_write(report_dir / f"predictions_test_{kind}.csv", lambda p, f=frame: f.to_csv(p, index=False))
    change = paired_intervals(frames, data.vocab.tasks, [("int8", "fp32")]).iloc[-1]
    return {"mb": onnx_export.file_mb(folder / onnx_export.INT8), "avg_f1": round(quantized.avg_f1(), 4),
            "latency_1_thread": onnx_export.latency(_ort(int8), singles, **timing),
            "avg_f1_change": round(quantized.avg_f1() - fp32.avg_f1(), 4),
            "avg_f1_change_ci95": [round(change.low, 4), round(change.high, 4)]}


def scored_frame(scored: onnx_export.Scored, data) -> pd.DataFrame:
    """An export's test logits as the study's per-image prediction frame (the split's order)."""
    records = data.records["test"]
    return predictions_frame(torch.arange(len(records)), [torch.from_numpy(l) for l in scored.logits],
                             [r.image_id for r in records], data.labels["test"], data.vocab)


def exported_teacher(paths: Paths, dataset: str, data_config) -> Predictor:
    """The data set's exported teacher (1 thread), the reference of a student's paired speed-up;
    refused unless it reads the test split as the student does."""
    folder = paths.export_model(f"{TEACHER_PREFIX}{dataset}")
    try:
        teacher = load_predictor(folder, threads=1)
    except PredictError as err:
        raise onnx_export.ExportError(f"the teacher's export is needed to time the student against it: {err} "
                                 f"(run `dvc repro export-teacher@{dataset}`)") from None
    changed = changed_data_setting({"image_size": teacher.image_size, "max_length": teacher.max_length,
                                    "mask_terms": teacher.mask_terms}, data_config)
    if changed:
        key, value, now = changed
        raise onnx_export.ExportError(f"{folder} was exported with {key} = {value!r}, data.{dataset}.{key} is now "
                                 f"{now!r}: re-run export-teacher@{dataset}")
    return teacher


def changed_data_setting(recorded: Mapping, data_config) -> tuple[str, object, object] | None:
    """The first of the settings that decide how the test split is read (image size, token length,
    masked words) whose recorded value differs from `data_config`'s: (key, recorded, now), or None."""
    for key in DATA_SETTINGS:
        value, now = recorded.get(key), getattr(data_config, key)
        if (list(value) if isinstance(value, (list, tuple)) else value) != (
                list(now) if isinstance(now, (list, tuple)) else now):
            return key, value, now
    return None


def lean_metrics(result: Mapping) -> dict:
    """The numbers a person compares across runs with `dvc metrics diff`."""
    lean = {"parameters": result["parameters"], "fp32_mb": result["fp32"]["mb"], "fp32_avg_f1": result["fp32"]["avg_f1"],
            "fp32_p50_ms_1_thread": result["fp32"]["latency_1_thread"]["p50_ms"],
            "max_abs_logit_diff": result["parity"]["max_abs_logit_diff"]}
    if "speedup_vs_teacher" in result:
        lean["speedup_vs_teacher"] = result["speedup_vs_teacher"]["speedup"]
    if "int8" in result:
        lean.update(int8_mb=result["int8"]["mb"], int8_avg_f1=result["int8"]["avg_f1"],
                    int8_p50_ms_1_thread=result["int8"]["latency_1_thread"]["p50_ms"])
    return lean
