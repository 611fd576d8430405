"""The data report (stage `prepare`): class balance, text statistics, example images, its markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medkd.catalog.dataset_specs import SPLITS, label_word_pattern
from medkd.data.prepared import PreparedData, load_image, mask_words
from medkd.reporting.plots import save_figure


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
    save_figure(fig, path)


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
    save_figure(fig, path)


def data_report_markdown(summary: Mapping, balance: pd.DataFrame, text_stats: pd.DataFrame) -> str:
    lines = [f"# Data report: {summary['dataset']}", "",
             f"Split sizes: {summary['sizes']}. Text input: {summary['text_fields']}.", "",
             *([scarce_labels_line(summary["labelled_train"]), ""] if "labelled_train" in summary else []),
             "## Classes per split", "", balance.to_markdown(), "", "## Text", "", text_stats.to_markdown(), ""]
    for column in (c for c in text_stats.columns if c.startswith("names_")):
        task = column.removeprefix("names_").removesuffix("_pct")
        lines += [f"`{column}`: share of texts that name the {task} label themselves. The leakage guard "
                  f"refuses label fields; free text that mentions the {task} is the study's input as "
                  f"published, so the {task} task is partly solvable from text.", ""]
    lines += ["![class balance](class_balance.png)", "", "![examples](examples.png)", ""]
    return "\n".join(lines)


def scarce_labels_line(labelled: Mapping) -> str:
    return (f"Scarce labels: runs see the labels of {labelled['images']} of the {labelled['of_images']} training "
            f"images ({labelled['images'] / labelled['of_images']:.1%}; {labelled['cases']} whole cases, drawn per "
            f"joint label to reach `label_fraction` {labelled['fraction']} with `label_seed` {labelled['seed']}, at "
            "least one case per label); the others keep their images and texts (`label_seen` false in "
            "manifest_train.csv). Dev and test keep every label.")
