"""Stage `prepare@<dataset>`: validate a data set and write its manifests, vocabulary and data report."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from medkd.catalog.dataset_specs import SPLITS, UNLABELLED
from medkd.config.params import project_root
from medkd.data.prepared import load_data, verify_files
from medkd.pipeline.paths import Paths
from medkd.reporting import data_report
from medkd.util.files import replace_dir, write_json, write_text


def prepare_stage(params: Mapping, dataset: str, root: Path | None = None) -> dict:
    """Check the data set whole (every image decoded, ids and images unique across splits), then write
    its manifests (with image sha256), vocabulary and data report: all of it, or nothing."""
    root = root or project_root()
    data = load_data(params, dataset, root)
    hashes = verify_files(data.records)
    tasks = data.vocab.tasks
    balance, text_stats = data_report.class_balance(data), data_report.text_statistics(data)
    summary = {"dataset": dataset, "title": data.config.spec.title,
               "sizes": {s: len(data.records[s]) for s in SPLITS},
               "classes": {t: list(c) for t, c in zip(tasks, data.vocab.classes)},
               "text_fields": list(data.config.text_fields)}
    labelled = data.labelled_train()
    if len(labelled) < len(data.records["train"]):
        summary["labelled_train"] = {
            "images": len(labelled), "cases": len({data.config.spec.case_of(data.records["train"][i]) for i in labelled}),
            "of_images": len(data.records["train"]), "fraction": data.config.label_fraction,
            "seed": data.config.label_seed}

    def write(folder: Path) -> None:
        for split in SPLITS:
            seen = (data.labels[split] != UNLABELLED).all(dim=1).tolist()  # False: a label no run may read
            rows = [{"index": i, "image_id": r.image_id, "image_sha256": digest,
                     tasks[0]: r.labels[0], tasks[1]: r.labels[1], "label_seen": shown, "text": r.text}
                    for i, (r, digest, shown) in enumerate(zip(data.records[split], hashes[split], seen))]
            pd.DataFrame(rows).to_csv(folder / f"manifest_{split}.csv", index=False)
        write_json(folder / "vocab.json", data.vocab.to_dict())
        balance.to_csv(folder / "class_balance.csv")
        text_stats.to_csv(folder / "text_statistics.csv")
        data_report.plot_class_balance(balance, folder / "class_balance.png")
        data_report.plot_examples(data, folder / "examples.png")
        write_text(folder / "data_report.md", data_report.data_report_markdown(summary, balance, text_stats))

    out = Paths(root).data_report(dataset)
    replace_dir(out, write)
    return {"summary": summary, "balance": balance, "text": text_stats, "out": out}
