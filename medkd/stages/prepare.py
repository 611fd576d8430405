"""Stage `prepare@<dataset>`: validate a data set and write its manifests, vocabulary and data report."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from medkd import report
from medkd.datasets import SPLITS
from medkd.files import atomic_write, reset_dir, sha256_file, write_json, write_text
from medkd.params import project_root
from medkd.stages.common import Paths, load_data


def prepare_stage(params: Mapping, dataset: str, root: Path | None = None) -> dict:
    root = root or project_root()
    data = load_data(params, dataset, root)
    out = reset_dir(Paths(root).data_report(dataset))
    tasks = data.vocab.tasks
    for split in SPLITS:
        rows = [{"index": i, "image_id": r.image_id, "image_sha256": sha256_file(r.image_path),
                 tasks[0]: r.labels[0], tasks[1]: r.labels[1], "text": r.text}
                for i, r in enumerate(data.records[split])]
        frame = pd.DataFrame(rows)
        atomic_write(out / f"manifest_{split}.csv", lambda p, f=frame: f.to_csv(p, index=False))
    write_json(out / "vocab.json", data.vocab.to_dict())
    balance = report.class_balance(data)
    atomic_write(out / "class_balance.csv", balance.to_csv)
    text_stats = report.text_statistics(data)
    atomic_write(out / "text_statistics.csv", text_stats.to_csv)
    report.plot_class_balance(balance, out / "class_balance.png")
    report.plot_examples(data, out / "examples.png")
    summary = {"dataset": dataset, "title": data.config.spec.title,
               "sizes": {s: len(data.records[s]) for s in SPLITS},
               "classes": {t: list(c) for t, c in zip(tasks, data.vocab.classes)},
               "text_fields": list(data.config.text_fields)}
    write_text(out / "data_report.md", report.data_report_markdown(summary, balance, text_stats))
    return {"summary": summary, "balance": balance, "text": text_stats, "out": out}
