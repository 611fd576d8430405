"""Will the students be 5x faster than the teacher, and does int8 hold, on this CPU?

Two modes. Without training anything (the default): the teacher and each student of params.yaml are
built with random weights (batch-1 latency does not depend on the weights' values; an ensemble teacher
with its members, at its own image size), exported exactly as the export stages do
(`medkd.deploy.onnx_export`), and each student is timed alternately with its data set's teacher on real
test samples: ONNX Runtime, batch 1, one thread (`paired_speedup`: the teacher's p50 over the student's,
with a block-bootstrap 95% interval over the timed pairs). With `--trained`: the study's own exports
(models/export/, after `dvc repro` or `dvc pull`) are timed the same way, and each model's int8 file is
scored against its fp32 file on the test split, with a paired bootstrap interval over the test images:
the per-CPU table of docs/deployment.md.

    .venv/bin/python benchmarks/export_latency.py [--trained] [--params params.yaml] [--runs 200] [--only NAME ...]
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import tempfile
from pathlib import Path

import onnxruntime as ort
import pandas as pd
import torch
import yaml

from medkd.config.sections import student_configs, teacher_configs, teacher_plan
from medkd.config.stage_settings import export_section
from medkd.config.study import TEACHER_PREFIX, exported_models, student_runs
from medkd.data.prepared import load_data, make_loader
from medkd.deploy import onnx_export as export
from medkd.deploy.predictor import load_predictor
from medkd.models.backbones import build_tokenizer
from medkd.models.classifier import EnsembleClassifier, build_model, count_parameters
from medkd.reporting.tables import speedup_verdict
from medkd.scoring.stats import paired_intervals
from medkd.stages.export import scored_frame
from medkd.util.environment import cpu_model
from medkd.util.files import write_json

REPO = Path(__file__).resolve().parents[1]


def cpu_flags() -> str:
    """The instruction-set flags that decide ONNX Runtime's kernels here (lscpu's)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    found = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            found = set(line.split(":", 1)[1].split())
            break
    return " ".join(f for f in wanted if f in found) or "unknown"


def random_model(model_cfg, data, members: int = 1):
    """A random-weight classifier of `model_cfg` (an ensemble of `members` sharing frozen backbones)."""
    torch.manual_seed(0)
    if members == 1:
        return build_model(model_cfg, data.vocab.num_classes, pretrained=False).eval()
    models = []
    for _ in range(members):
        torch.manual_seed(0)  # the members of a frozen-backbone ensemble share the pretrained backbones
        models.append(build_model(model_cfg, data.vocab.num_classes, pretrained=False))
    return EnsembleClassifier(models).eval()


def exported_session(model, model_cfg, data, folder: Path, threads: int = 1):
    """`model` exported like the stage exports it: (session, tokenizer, parameters)."""
    tokenizer = build_tokenizer(model_cfg.text, model_cfg.text_weights)
    sample = data.dataset("test", {export.ROLE: tokenizer}).collate([0, 1])
    export.export_model(model, model_cfg, tokenizer, sample, export.Preprocessing.of(data.config, data.vocab),
                        folder, int8=False)
    return export.session(folder / export.FP32, threads), tokenizer, count_parameters(model)


def paired_rows(student, teacher, student_test, teacher_test, runs: int, warmup: int) -> dict:
    """The student's speed-up over its teacher, each on its own reading of the same test samples."""
    pairs = list(zip(make_loader(student_test, 1, shuffle=False), make_loader(teacher_test, 1, shuffle=False)))
    return export.paired_speedup(lambda pair: student(pair[0]), lambda pair: teacher(pair[1]), pairs, runs=runs,
                                 warmup=warmup)


def random_weights(params, section, names, args, tmp: Path) -> list[dict]:
    rows, teachers, datas = [], {}, {}
    for name in names:
        dataset = params["students"][name]["dataset"]
        if dataset not in datas:
            datas[dataset] = load_data(params, dataset, REPO)
        data = datas[dataset]
        plan = teacher_plan(params, dataset)
        teacher_data = data.at_image_size(plan.image_size)
        if dataset not in teachers:
            teacher_cfg = teacher_configs(params, dataset)[0]
            teachers[dataset] = exported_session(random_model(teacher_cfg, teacher_data, len(plan.seeds)),
                                                 teacher_cfg, teacher_data, tmp / f"teacher-{dataset}")
        teacher, teacher_tokenizer, teacher_params = teachers[dataset]
        student_cfg = student_configs(params, name, section.variant if section.variant != "best" else
                                      student_runs(params, name)[0].variant)[0]
        student, tokenizer, student_params = exported_session(random_model(student_cfg, data), student_cfg, data,
                                                              tmp / name)
        paired = paired_rows(lambda b: student.run(None, export.onnx_inputs(b)),
                             lambda b: teacher.run(None, export.onnx_inputs(b, "teacher")),
                             data.dataset("test", {export.ROLE: tokenizer}),
                             teacher_data.dataset("test", {"teacher": teacher_tokenizer}), args.runs, args.warmup)
        rows.append(speedup_row(f"{name} ({student_cfg.vision} + {student_cfg.text or 'no text'})", student_params,
                                teacher_params, paired, section.speedup_goal))
        print(rows[-1], flush=True)
    return rows


def speedup_row(name: str, student_params: int, teacher_params: int, paired: dict, goal: float) -> dict:
    low, high = paired["ci95"]
    return {"student": name, "params (M)": round(student_params / 1e6, 2),
            "teacher params (M)": round(teacher_params / 1e6, 2), "p50 ms": paired["p50_ms"],
            "teacher p50 ms": paired["reference_p50_ms"], "speed-up": paired["speedup"],
            "95% CI": f"[{low:.2f}, {high:.2f}]", f"≥ {goal:g}×": speedup_verdict(paired, goal)}


def predictor_logits(predictor, batch, role: str = export.ROLE):
    """An export's logits for a batch; a student without text gets no token ids."""
    inputs = export.onnx_inputs(batch, role)
    return predictor.logits(inputs["pixel_values"], inputs.get("input_ids"), inputs.get("attention_mask"))


def trained_exports(params, section, names, args) -> tuple[list[dict], list[dict]]:
    """The study's exports: each student's paired speed-up, and every model's int8 change on test."""
    rows, int8_rows, datas = [], [], {}
    for model in [f"{TEACHER_PREFIX}{d}" for d in params.get("teachers", {})] + names:
        folder = REPO / "models" / "export" / model
        if model not in exported_models(params) or not (folder / export.FP32).exists():
            continue
        dataset = model.removeprefix(TEACHER_PREFIX) if model.startswith(TEACHER_PREFIX) else \
            params["students"][model]["dataset"]
        if dataset not in datas:
            datas[dataset] = load_data(params, dataset, REPO)
        fp32 = load_predictor(folder, threads=1)
        data = datas[dataset].at_image_size(fp32.image_size)
        test = data.dataset("test", {export.ROLE: fp32.tokenizer})
        if (folder / export.INT8).exists():
            frames = {kind: scored_frame(export.score(lambda b, p=predictor: predictor_logits(p, b), test), data)
                for kind, predictor in (("fp32", fp32), ("int8", load_predictor(folder / export.INT8, threads=1)))}
            change = paired_intervals(frames, data.vocab.tasks, [("int8", "fp32")]).iloc[-1]
            int8_rows.append({"model": model, "int8 − fp32 test avg F1": f"{change.estimate:+.4f}",
                              "95% CI": f"[{change.low:+.4f}, {change.high:+.4f}]"})
            print(int8_rows[-1], flush=True)
        if model.startswith(TEACHER_PREFIX):
            continue
        teacher = load_predictor(REPO / "models" / "export" / f"{TEACHER_PREFIX}{dataset}", threads=1)
        teacher_test = datas[dataset].at_image_size(teacher.image_size).dataset("test", {"teacher": teacher.tokenizer})
        paired = paired_rows(lambda b: predictor_logits(fp32, b), lambda b: predictor_logits(teacher, b, "teacher"),
                             test, teacher_test,
                             args.runs, args.warmup)
        deployed = json.loads((REPO / "reports" / "export" / model / "deployment.json").read_text())
        teacher_deployed = json.loads((REPO / "reports" / "export" / f"{TEACHER_PREFIX}{dataset}" /
                                       "deployment.json").read_text())
        rows.append(speedup_row(f"{model} ({deployed['backbones']}, {deployed['run']})", deployed["parameters"],
                                teacher_deployed["parameters"], paired, section.speedup_goal))
        print(rows[-1], flush=True)
    return rows, int8_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--trained", action="store_true", help="time the study's exports, and score their int8 files")
    parser.add_argument("--runs", type=int, default=200, help="timed pairs per student")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="students to time (default: all of params.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/export_latency[_trained].json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = yaml.safe_load(args.params.read_text())
    section = export_section(params)
    names = [n for n in (args.only or list(params["students"])) if n in exported_models(params)]
    int8_rows = []
    if args.trained:
        rows, int8_rows = trained_exports(params, section, names, args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = random_weights(params, section, names, args, Path(tmp))
    machine = {"cpu": cpu_model(), "flags": cpu_flags(), "torch_isa": torch.backends.cpu.get_cpu_capability(),
               "onnxruntime": ort.__version__}
    setting = (f"{machine['cpu']} ({machine['flags']}); ONNX Runtime {ort.__version__}, batch 1, 1 thread, "
               f"{args.runs} timed pairs per student on real test samples; "
               + ("the study's trained exports" if args.trained else "random weights"))
    out = args.out or REPO / "benchmarks" / "results" / f"export_latency{'_trained' if args.trained else ''}.json"
    write_json(out, {"setting": setting, "machine": machine, "params": str(args.params), "rows": rows,
                     "int8": int8_rows})
    print(f"\n{setting}\n")
    print(pd.DataFrame(rows).to_markdown(index=False))
    if int8_rows:
        print()
        print(pd.DataFrame(int8_rows).to_markdown(index=False))
    print(f"\n(written to {out})")


if __name__ == "__main__":
    main()
