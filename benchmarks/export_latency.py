"""Will the students be 5x faster than the teacher on this CPU? Answered before any training.

The teacher and each student of params.yaml are built with random weights (batch-1 latency does not
depend on the weights' values), exported exactly as the export stages do (`medkd.deploy.onnx_export`), and each
student is timed alternately with its data set's teacher on real test samples: ONNX Runtime, batch
1, one thread (`export.paired_speedup`: the teacher's p50 over the student's, with a block-bootstrap
95% interval over the timed pairs). The export stages measure the trained models the same way; this
script lets a person check a machine, or a change to the exporter, without the study.

    .venv/bin/python benchmarks/export_latency.py [--params params.yaml] [--runs 200] [--only NAME ...]
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import tempfile
from pathlib import Path

import onnxruntime as ort
import pandas as pd
import torch
import yaml

from medkd.config.sections import student_configs, teacher_configs
from medkd.config.stage_settings import export_section
from medkd.data.prepared import load_data, make_loader
from medkd.deploy import onnx_export as export
from medkd.models.backbones import build_tokenizer
from medkd.models.classifier import build_model, count_parameters
from medkd.reporting.tables import speedup_verdict
from medkd.util.environment import cpu_model
from medkd.util.files import write_json

REPO = Path(__file__).resolve().parents[1]


def exported_session(model_cfg, data, folder: Path, threads: int = 1):
    """A random-weight classifier of `model_cfg`, exported like the stage exports it: (session, tokenizer, params)."""
    torch.manual_seed(0)
    model = build_model(model_cfg, data.vocab.num_classes, pretrained=False).eval()
    tokenizer = build_tokenizer(model_cfg.text, model_cfg.text_weights)
    sample = data.dataset("test", {export.ROLE: tokenizer}).collate([0, 1])
    export.export_model(model, model_cfg, tokenizer, sample, export.Preprocessing.of(data.config, data.vocab),
                        folder, int8=False)
    return export.session(folder / export.FP32, threads), tokenizer, count_parameters(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--runs", type=int, default=200, help="timed pairs per student")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="students to time (default: all of params.yaml)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = yaml.safe_load(args.params.read_text())
    section = export_section(params)
    variant = section.variant
    students = args.only or list(params["students"])
    rows, teachers, datas = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in students:
            dataset = params["students"][name]["dataset"]
            if dataset not in datas:
                datas[dataset] = load_data(params, dataset, REPO)
            data = datas[dataset]
            if dataset not in teachers:
                teacher_cfg = teacher_configs(params, dataset)[0]
                teachers[dataset] = exported_session(teacher_cfg, data, Path(tmp) / f"teacher-{dataset}")
            teacher, teacher_tokenizer, teacher_params = teachers[dataset]
            student_cfg = student_configs(params, name, variant)[0]
            student, tokenizer, student_params = exported_session(student_cfg, data, Path(tmp) / name)
            test = data.dataset("test", {export.ROLE: tokenizer, "teacher": teacher_tokenizer})
            singles = list(make_loader(test, 1, shuffle=False))
            paired = export.paired_speedup(
                lambda b: student.run(None, export.onnx_inputs(b)),
                lambda b: teacher.run(None, export.onnx_inputs(b, "teacher")), singles, runs=args.runs,
                warmup=args.warmup)
            low, high = paired["ci95"]
            rows.append({"student": f"{name} ({student_cfg.vision} + {student_cfg.text})",
                         "params (M)": round(student_params / 1e6, 2),
                         "teacher params (M)": round(teacher_params / 1e6, 2), "p50 ms": paired["p50_ms"],
                         "teacher p50 ms": paired["reference_p50_ms"], "speed-up": paired["speedup"],
                         "95% CI": f"[{low:.2f}, {high:.2f}]",
                         f"≥ {section.speedup_goal:g}×": speedup_verdict(paired, section.speedup_goal)})
            print(rows[-1], flush=True)
    setting = (f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}; ONNX Runtime {ort.__version__}, batch 1, "
               f"1 thread, {args.runs} timed pairs per student on real test samples; random weights, {variant} "
               "architectures")
    write_json(args.out, {"setting": setting, "params": str(args.params), "rows": rows})
    print(f"\n{setting}\n")
    print(pd.DataFrame(rows).to_markdown(index=False))
    print(f"\n(written to {args.out})")


if __name__ == "__main__":
    main()
