"""Small synthetic stand-ins for MedPix-2.0 and Wound-1-0, written in their published layouts.

Tests and CI run the real pipeline on these. Labels are visible in the pixels (task 1 sets a
stripe texture, task 2 the position of a bright disc) and task 2 in the text, so tiny models learn.
A leaf module: the data-set specs in `medkd.catalog.dataset_specs` point here.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

SPLITS = ("train", "dev", "test")  # the order of `sizes`; the same names as medkd.catalog.dataset_specs.SPLITS

SYNTHETIC_MEDPIX = (("CT", "MR"), ("Abdomen", "Head", "Reproductive and Urinary System",
                                     "Spine and Muscles", "Thorax"))
SYNTHETIC_WOUND = (("Abrasion", "Burn", "Pressure", "Venous"), ("Mild", "Moderate", "Severe"))
_PHRASES = ("scan shows a lesion", "image demonstrates findings", "study reveals a mass",
            "view of the region", "follow-up examination")


def synthetic_image(task1: int, task2: int, n_task2: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Task 1 sets the texture (stripe orientation), task 2 the position of a bright disc."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = np.sin(2 * np.pi * 4 * (xx if task1 % 2 == 0 else yy) + task1)
    angle = 2 * np.pi * task2 / n_task2
    cy, cx = 0.5 + 0.3 * np.sin(angle), 0.5 + 0.3 * np.cos(angle)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < 0.02
    img = 0.35 + 0.2 * stripes + 0.4 * disc + rng.normal(0, 0.08, (size, size))
    grey = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L")


def _label_grid(sizes: Sequence[int], n_task1: int, n_task2: int):
    """Per split: (index in split, running number from 1, task-1 class, task-2 class) of each sample."""
    number = 0
    for split, n in zip(SPLITS, sizes):
        samples = []
        for i in range(n):
            number += 1
            samples.append((i, number, i % n_task1, (i // n_task1) % n_task2))
        yield split, samples


def make_synthetic_medpix(root: Path, sizes: Sequence[int] = (48, 16, 16), image_size: int = 48,
                          seed: int = 0) -> Path:
    """A small MedPix-2.0 look-alike in the published layout (grayscale PNGs, JSON/JSONL)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "splitted_dataset").mkdir(exist_ok=True)
    types, locations = SYNTHETIC_MEDPIX
    everything = []
    for split, samples in _label_grid(sizes, len(types), len(locations)):
        rows = []
        for i, number, t1, t2 in samples:
            case = 1000 + number
            image_id = f"MPX{case}_synpic{50000 + case}"
            synthetic_image(t1, t2, len(locations), image_size, rng).save(root / "images" / f"{image_id}.png")
            phrase = _PHRASES[int(rng.integers(len(_PHRASES)))]
            rows.append({
                "Type": types[t1], "U_id": f"MPX{case}", "image": image_id,
                "Description": {"ACR Codes": "1.1", "Age": str(int(rng.integers(20, 80))),
                                "Caption": f"{locations[t2].lower()} {phrase}", "Figure Part": None,
                                "Modality": f"{types[t1]} - synthetic", "Plane": "Axial",
                                "Sex": "female" if i % 2 else "male"},
                "Location": locations[t2], "Location Category": locations[t2],
            })
        _write_jsonl(root / "splitted_dataset" / f"descriptions_{split}.jsonl", rows)
        everything += rows
    (root / "Descriptions.json").write_text(json.dumps(everything, indent=1))
    return root


def make_synthetic_wound(root: Path, sizes: Sequence[int] = (48, 16, 16), image_size: int = 48,
                         seed: int = 0) -> Path:
    """A small Wound-1-0 look-alike in the published layout (metadata CSVs + images/)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    types, severities = SYNTHETIC_WOUND
    all_rows = []
    for split, samples in _label_grid(sizes, len(types), len(severities)):
        rows = []
        for _, number, t1, t2 in samples:
            name = f"{types[t1].lower()}_wounds_{number}.png"
            synthetic_image(t1, t2, len(severities), image_size, rng).convert("RGB").save(root / "images" / name)
            text = f"The wound looks {severities[t2].lower()} in extent; {_PHRASES[int(rng.integers(5))]}."
            rows.append({"img_path": name, "type": types[t1], "severity": severities[t2], "description": text})
        _write_csv(root / f"metadata_{split}.csv", rows)
        all_rows += rows
    _write_csv(root / "metadata.csv", all_rows)
    return root


def _write_jsonl(path: Path, rows: Iterable[Mapping]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["img_path", "type", "severity", "description"])
        writer.writeheader()
        writer.writerows(rows)
