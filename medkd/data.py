"""Data sets in their published layouts, the leakage guard, batches, and synthetic stand-ins.

MedPix-2.0: `Descriptions.json`, `images/<image>.png`, the authors' case-disjoint splits
`splitted_dataset/descriptions_{train,dev,test}.jsonl`. Task 1 = `Type` (CT/MR), task 2 =
`Location Category`. Wound-1-0: `metadata_{train,dev,test}.csv` with
`img_path,type,severity,description`, images under `images/`. Task 1 = type, task 2 = severity.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

SPLITS = ("train", "dev", "test")
# The study's batch keys call the two tasks `modality` and `location` for every data set.
TASK_KEYS = ("modality", "location")
MEDPIX_DESCRIPTION_FIELDS = ("ACR Codes", "Age", "Caption", "Figure Part", "Modality", "Plane", "Sex")
# Fields whose value spells out (or is) a label; feeding them to a text encoder leaks it.
MEDPIX_LABEL_FIELDS = {
    "Type": "is the modality label itself",
    "Modality": "starts with the modality label (e.g. 'CT - noncontrast')",
    "Location": "is the fine-grained body location, which determines the location label",
    "Location Category": "is the location label itself",
}


class DataError(ValueError):
    """Bad or missing input data; the message names the file, record and field."""


@dataclass(frozen=True)
class Record:
    image_id: str
    image_path: Path
    text: str
    labels: tuple[str, str]  # (task 1, task 2) class names


@dataclass(frozen=True)
class DataConfig:
    """What a data set is and how to read it (the `data` section of params.yaml)."""

    name: str  # "medpix" | "wound"
    root: str
    text_fields: tuple[str, ...] = ("Caption",)  # MedPix only
    type_column: str = "type"  # Wound only (as in the study)
    severity_column: str = "severity"
    text_column: str = "description"
    image_size: int = 224
    max_length: int = 128  # text tokens

    @classmethod
    def from_dict(cls, cfg: Mapping) -> "DataConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(cfg) - known
        if unknown:
            raise DataError(f"unknown data config keys {sorted(unknown)}; known: {sorted(known)}")
        cfg = dict(cfg)
        if "text_fields" in cfg:
            cfg["text_fields"] = tuple(cfg["text_fields"])
        return cls(**cfg)

    @property
    def task_names(self) -> tuple[str, str]:
        if self.name == "medpix":
            return ("modality", "location")
        return (self.type_column, self.severity_column)


# --------------------------------------------------------------------------- loaders


def check_leakage(cfg: DataConfig) -> None:
    """Refuse text inputs that spell out a label."""
    if cfg.name == "medpix":
        for name in cfg.text_fields:
            if name in MEDPIX_LABEL_FIELDS:
                raise DataError(
                    f"text field {name!r} leaks a label: it {MEDPIX_LABEL_FIELDS[name]}. "
                    f"Use other fields, e.g. {['Caption', 'Plane', 'Age', 'Sex']}"
                )
    elif cfg.name == "wound":
        if cfg.text_column in (cfg.type_column, cfg.severity_column):
            raise DataError(
                f"text column {cfg.text_column!r} is a label column: feeding it to the text "
                "encoder leaks the label"
            )


def load_splits(cfg: DataConfig) -> dict[str, list[Record]]:
    check_leakage(cfg)
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data set folder {str(root)!r} does not exist (data set {cfg.name!r})")
    if cfg.name == "medpix":
        return {s: _load_medpix_split(root, s, cfg.text_fields) for s in SPLITS}
    if cfg.name == "wound":
        return {s: _load_wound_split(root, s, cfg) for s in SPLITS}
    raise DataError(f"unknown data set {cfg.name!r}; expected 'medpix' or 'wound'")


def _load_medpix_split(root: Path, split: str, text_fields: Sequence[str]) -> list[Record]:
    path = root / "splitted_dataset" / f"descriptions_{split}.jsonl"
    if not path.exists():
        raise DataError(f"missing MedPix split file {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err})") from None
            for key in ("image", "Type", "Location Category", "Description"):
                if key not in row:
                    raise DataError(f"{where}: record has no field {key!r}")
            image_id = row["image"]
            where = f"{where} (image {image_id!r})"
            text = _medpix_text(row, text_fields, where)
            labels = (str(row["Type"]), str(row["Location Category"]))
            records.append(Record(image_id, root / "images" / f"{image_id}.png", text, labels))
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _medpix_text(row: Mapping, fields: Sequence[str], where: str) -> str:
    parts = []
    for name in fields:
        if name in MEDPIX_DESCRIPTION_FIELDS:
            value = row["Description"].get(name)
        elif name in row:
            value = row[name]
        else:
            raise DataError(f"{where}: no text field {name!r} in the record or its Description")
        if value is not None and str(value).strip():
            parts.append(str(value).strip() if len(fields) == 1 else f"{name}: {str(value).strip()}")
    text = ". ".join(parts)
    if not text:
        raise DataError(f"{where}: empty text (fields {list(fields)})")
    return text


def _load_wound_split(root: Path, split: str, cfg: DataConfig) -> list[Record]:
    path = root / f"metadata_{split}.csv"
    if not path.exists():
        raise DataError(f"missing Wound split file {path}")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        needed = ("img_path", cfg.type_column, cfg.severity_column, cfg.text_column)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        records = []
        for row_no, row in enumerate(reader, 2):
            where = f"{path}, row {row_no} ({row['img_path']!r})"
            text = (row[cfg.text_column] or "").strip()
            if not text:
                raise DataError(f"{where}: empty {cfg.text_column!r}")
            labels = (row[cfg.type_column].strip(), row[cfg.severity_column].strip())
            if not all(labels):
                raise DataError(f"{where}: empty label in {cfg.type_column!r}/{cfg.severity_column!r}")
            records.append(Record(Path(row["img_path"]).stem, root / "images" / row["img_path"], text, labels))
    if not records:
        raise DataError(f"{path} holds no records")
    return records


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class Vocab:
    """Class names per task, sorted, taken from the training split (saved with every model)."""

    tasks: tuple[str, str]
    classes: tuple[tuple[str, ...], tuple[str, ...]]

    @classmethod
    def from_records(cls, train: Iterable[Record], tasks: tuple[str, str]) -> "Vocab":
        train = list(train)
        return cls(tuple(tasks), tuple(tuple(sorted({r.labels[t] for r in train})) for t in (0, 1)))

    @property
    def num_classes(self) -> tuple[int, int]:
        return (len(self.classes[0]), len(self.classes[1]))

    def encode(self, records: Sequence[Record], split: str) -> torch.Tensor:
        """(N, 2) class ids; a label training never saw is an error naming the record."""
        lookup = [{c: i for i, c in enumerate(classes)} for classes in self.classes]
        ids = np.empty((len(records), 2), dtype=np.int64)
        for n, record in enumerate(records):
            for t in (0, 1):
                try:
                    ids[n, t] = lookup[t][record.labels[t]]
                except KeyError:
                    raise DataError(
                        f"{split} record {record.image_id!r}: {self.tasks[t]} label "
                        f"{record.labels[t]!r} never occurs in the training split "
                        f"(training classes: {list(self.classes[t])})"
                    ) from None
        return torch.from_numpy(ids)

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "classes": [list(c) for c in self.classes]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Vocab":
        return cls(tuple(d["tasks"]), tuple(tuple(c) for c in d["classes"]))


def joint_labels(labels: torch.Tensor, num_classes: Sequence[int]) -> torch.Tensor:
    """task-1 × task-2 label of each sample (used to pick CRD negatives)."""
    return labels[:, 0] * num_classes[1] + labels[:, 1]


# --------------------------------------------------------------------------- images


def load_image(path: Path, size: int, record: str = "") -> np.ndarray:
    """RGB uint8 (3, size, size), resized with bilinear antialiasing."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    except FileNotFoundError:
        raise DataError(f"missing image {path}{f' for record {record!r}' if record else ''}") from None
    except OSError as err:
        raise DataError(f"unreadable image {path}{f' for record {record!r}' if record else ''}: {err}") from None


def load_images(records: Sequence[Record], size: int, desc: str = "images") -> torch.Tensor:
    """Decode and resize every image once: (N, 3, size, size) uint8, kept in memory."""
    out = torch.empty((len(records), 3, size, size), dtype=torch.uint8)
    for n, record in enumerate(tqdm(records, desc=desc, leave=False, mininterval=2)):
        out[n] = torch.from_numpy(load_image(record.image_path, size, record.image_id))
    return out


# --------------------------------------------------------------------------- data set


class MultimodalDataset(Dataset):
    """One split: images decoded once, text tokenized once per role ("teacher", "student").

    Items are indices; `collate` builds the study's batch dict from them in one vectorised step.
    """

    def __init__(
        self,
        records: Sequence[Record],
        labels: torch.Tensor,
        tokenizers: Mapping[str, object],
        image_size: int,
        max_length: int,
        images: torch.Tensor | None = None,
        augment: bool = False,
        split: str = "",
    ):
        self.records = list(records)
        self.labels = labels
        self.augment = augment
        self.images = images if images is not None else load_images(records, image_size, f"{split} images")
        texts = [r.text for r in self.records]
        self.tokens = {}
        for role, tokenizer in tokenizers.items():
            enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
            self.tokens[role] = (enc["input_ids"], enc["attention_mask"])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        pixels = self.images[index].float().div_(255.0)
        if self.augment:
            pixels = random_flip_and_shift(pixels)
        batch = {"pixel_values": pixels, "index": index}
        for role, (ids, mask) in self.tokens.items():
            mask = mask[index]
            # Trim the padding every row of this batch shares: no attention over empty tokens.
            length = int(mask.sum(1).max())
            batch[f"input_ids_{role}"] = ids[index, :length]
            batch[f"attention_mask_{role}"] = mask[:, :length]
        labels = self.labels[index]
        batch[TASK_KEYS[0]], batch[TASK_KEYS[1]] = labels[:, 0], labels[:, 1]
        return batch


def random_flip_and_shift(pixels: torch.Tensor, max_shift: float = 0.1) -> torch.Tensor:
    """Random horizontal flip and translation (up to max_shift of the side), per sample."""
    b, _, h, w = pixels.shape
    flip = torch.rand(b) < 0.5
    pixels = torch.where(flip.view(b, 1, 1, 1), pixels.flip(-1), pixels)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = (torch.rand(b, 2) * 2 - 1) * 2 * max_shift
    grid = torch.nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
    return torch.nn.functional.grid_sample(pixels, grid, padding_mode="zeros", align_corners=False)


def make_loader(dataset: MultimodalDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=dataset.collate,
                      generator=generator, num_workers=0)


@dataclass
class PreparedData:
    """Everything the engine needs: records, label ids and vocabulary per split."""

    config: DataConfig
    records: dict[str, list[Record]]
    labels: dict[str, torch.Tensor]
    vocab: Vocab
    _images: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, cfg: DataConfig) -> "PreparedData":
        records = load_splits(cfg)
        vocab = Vocab.from_records(records["train"], cfg.task_names)
        labels = {s: vocab.encode(records[s], s) for s in SPLITS}
        for split in SPLITS:  # fail before any training if an image is missing
            for r in records[split]:
                if not r.image_path.exists():
                    raise DataError(f"missing image {r.image_path} for {split} record {r.image_id!r}")
        return cls(cfg, records, labels, vocab)

    def images(self, split: str) -> torch.Tensor:
        key = (split, self.config.image_size)
        if key not in self._images:
            self._images[key] = load_images(self.records[split], self.config.image_size, f"{split} images")
        return self._images[key]

    def dataset(self, split: str, tokenizers: Mapping[str, object], augment: bool = False) -> MultimodalDataset:
        return MultimodalDataset(self.records[split], self.labels[split], tokenizers,
                                 self.config.image_size, self.config.max_length,
                                 images=self.images(split), augment=augment, split=split)

    def joint_train_labels(self) -> torch.Tensor:
        return joint_labels(self.labels["train"], self.vocab.num_classes)


# --------------------------------------------------------------------------- synthetic data

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


def make_synthetic_medpix(root: Path, sizes: Sequence[int] = (48, 16, 16), image_size: int = 48,
                          seed: int = 0) -> Path:
    """A small MedPix-2.0 look-alike in the published layout (grayscale PNGs, JSON/JSONL)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "splitted_dataset").mkdir(exist_ok=True)
    types, locations = SYNTHETIC_MEDPIX
    everything = []
    case = 1000
    for split, n in zip(SPLITS, sizes):
        rows = []
        for i in range(n):
            t1, t2 = i % len(types), (i // len(types)) % len(locations)
            case += 1
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
    counter = 0
    all_rows = []
    for split, n in zip(SPLITS, sizes):
        rows = []
        for i in range(n):
            t1, t2 = i % len(types), (i // len(types)) % len(severities)
            counter += 1
            name = f"{types[t1].lower()}_wounds_{counter}.png"
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
