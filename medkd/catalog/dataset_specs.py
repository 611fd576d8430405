"""Data-set registry: one `DatasetSpec` per data set, holding everything that differs between them.

A spec names the data set's folder, its public source, its two tasks and where their labels
live, its default text fields and the fields that would leak a label, and the loader that reads
one split of its published layout into `Record`s. Nothing else in medkd branches on a data
set's name. Adding a data set = one spec + its loader (+ a synthetic generator for tests).

Also here: `Record` (one sample) and `Vocab` (class names per task, from the training split).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from medkd.catalog import synthetic
from medkd.util.registry import Registry

SPLITS = ("train", "dev", "test")


class DataError(ValueError):
    """Bad or missing input data; the message names the file, record and field."""


@dataclass(frozen=True)
class Record:
    image_id: str
    image_path: Path
    text: str
    labels: tuple[str, str]  # (task 1, task 2) class names


@dataclass(frozen=True)
class SplitSource:
    """What a loader needs to read one split: the data set's folder and the chosen fields."""

    root: Path
    text_fields: tuple[str, ...]
    label_fields: tuple[str, str]


@dataclass(frozen=True)
class FetchSource:
    """Where `medkd.data.fetch` downloads the data set: a folder of a GitHub repository at a commit."""

    repo: str
    commit: str
    folder: str
    max_side: int | None = None  # the mirror's images are downscaled to this longer side (None: as published)


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # the key params.yaml uses (`data.<key>.name`)
    title: str
    folder: str  # under data/ (and under the local mirror)
    marker: str  # a file that every complete copy has
    tasks: tuple[str, str]  # what a person reads in tables and figures
    label_fields: tuple[str, str]  # where the two tasks' labels are stored (defaults)
    text_fields: tuple[str, ...]  # text given to the model (default)
    leakage_fields: Mapping[str, str]  # field -> why feeding it to the text encoder leaks a label
    load_split: Callable[[SplitSource, str], list[Record]]
    make_synthetic: Callable[..., Path]
    fetch: FetchSource | None = None
    # Per task, a pattern for words in the text that name that task's label (data report).
    label_words: Mapping[str, str] = field(default_factory=dict)
    # The case (patient, study) a record's image comes from: images of one case are labelled, or not, together.
    case_of: Callable[[Record], str] = lambda record: record.image_id


DATASETS: Registry[DatasetSpec] = Registry("data set", DataError)
register_dataset = DATASETS.register
list_datasets = DATASETS.names
get_dataset = DATASETS.lookup


def check_leakage(spec: DatasetSpec, text_fields: Sequence[str], label_fields: Sequence[str]) -> None:
    """Refuse text inputs that spell out a label."""
    for name in text_fields:
        if name in spec.leakage_fields:
            safe = [f for f in spec.text_fields if f not in spec.leakage_fields]
            raise DataError(f"text field {name!r} leaks a label: it {spec.leakage_fields[name]}. "
                            f"Use other fields, e.g. {safe}")
        if name in label_fields:
            raise DataError(f"text field {name!r} is a label column of {spec.title}: feeding it to the "
                            "text encoder leaks the label")


UNLABELLED = -1  # the label id of a training image whose label a run may not see (data.<d>.label_fraction)


def labelled_cases(records: Sequence[Record], fraction: float, seed: int,
                   case_of: Callable[[Record], str]) -> np.ndarray:
    """Which training records keep their labels: whole cases, drawn per joint label (task 1 × task 2 of the
    case's first image) in a seeded random order until each label holds `fraction` of its images (at
    least one case). Stratified, so every label is seen; case-disjoint, so no case is half labelled."""
    by_case: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_case.setdefault(case_of(record), []).append(i)
    strata: dict[tuple[str, str], list[str]] = {}
    for case, members in sorted(by_case.items()):
        strata.setdefault(records[members[0]].labels, []).append(case)
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(records), dtype=bool)
    for label in sorted(strata):
        cases = strata[label]
        wanted, taken = fraction * sum(len(by_case[c]) for c in cases), 0
        for k in rng.permutation(len(cases)):
            if taken >= wanted and taken:
                break
            keep[by_case[cases[k]]] = True
            taken += len(by_case[cases[k]])
    return keep


def join_text(parts: Sequence[tuple[str, object]]) -> str:
    """One field: its value. Several: 'name: value' joined by '. ' (empty values left out)."""
    present = [(name, str(value).strip()) for name, value in parts if value is not None and str(value).strip()]
    if len(parts) == 1:
        return present[0][1] if present else ""
    return ". ".join(f"{name}: {value}" for name, value in present)


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

    def encode(self, records: Sequence[Record], split: str) -> np.ndarray:
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
        return ids

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "classes": [list(c) for c in self.classes]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Vocab":
        return cls(tuple(d["tasks"]), tuple(tuple(c) for c in d["classes"]))


# --------------------------------------------------------------------------- MedPix-2.0

# Text fields that live inside a MedPix record's `Description` object.
MEDPIX_DESCRIPTION_FIELDS = ("ACR Codes", "Age", "Caption", "Figure Part", "Modality", "Plane", "Sex")


def load_medpix_split(source: SplitSource, split: str) -> list[Record]:
    """`splitted_dataset/descriptions_<split>.jsonl`, images under `images/<image>.png`."""
    path = source.root / "splitted_dataset" / f"descriptions_{split}.jsonl"
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
            for key in ("image", *source.label_fields, "Description"):
                if key not in row:
                    raise DataError(f"{where}: record has no field {key!r}")
            image_id = row["image"]
            where = f"{where} (image {image_id!r})"
            parts = []
            for name in source.text_fields:
                if name in MEDPIX_DESCRIPTION_FIELDS:
                    parts.append((name, row["Description"].get(name)))
                elif name in row:
                    parts.append((name, row[name]))
                else:
                    raise DataError(f"{where}: no text field {name!r} in the record or its Description")
            text = join_text(parts)
            if not text:
                raise DataError(f"{where}: empty text (fields {list(source.text_fields)})")
            labels = (str(row[source.label_fields[0]]), str(row[source.label_fields[1]]))
            records.append(Record(image_id, source.root / "images" / f"{image_id}.png", text, labels))
    if not records:
        raise DataError(f"{path} holds no records")
    return records


MEDPIX = register_dataset(DatasetSpec(
    name="medpix",
    title="MedPix-2.0",
    folder="medpix-2.0",
    marker="Descriptions.json",
    tasks=("modality", "location"),
    label_fields=("Type", "Location Category"),
    text_fields=("Caption",),
    leakage_fields={
        "Type": "is the modality label itself",
        "Modality": "starts with the modality label (e.g. 'CT - noncontrast')",
        "Location": "is the fine-grained body location, which determines the location label",
        "Location Category": "is the location label itself",
    },
    load_split=load_medpix_split,
    make_synthetic=synthetic.make_synthetic_medpix,
    case_of=lambda record: record.image_id.split("_")[0],  # MPX1031_synpic20041: case MPX1031
    fetch=FetchSource("CHILab1/MedPix-2.0", "d3bc431576ec8041114806ec3eb58d75adf45029", "MedPix-2-0", max_side=256),
    label_words={"modality": r"\b(CT|MR|MRI|T1|T2|FLAIR|DWI|ADC)\b"},
))


# --------------------------------------------------------------------------- Wound-1-0


def load_wound_split(source: SplitSource, split: str) -> list[Record]:
    """`metadata_<split>.csv` with img_path, the label columns and the text column; images under `images/`."""
    path = source.root / f"metadata_{split}.csv"
    if not path.exists():
        raise DataError(f"missing Wound split file {path}")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        needed = ("img_path", *source.label_fields, *source.text_fields)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        records, malformed = [], []
        width = len(reader.fieldnames)
        for row_no, row in enumerate(reader, 2):
            where = f"{path}, row {row_no} ({row['img_path']!r})"
            if None in row or None in row.values():  # csv's markers for too many / too few fields
                found = width + len(row.get(None) or []) - sum(v is None for k, v in row.items() if k is not None)
                malformed.append(f"  row {row_no} ({row['img_path']!r}): {found} fields, expected {width}"
                                 + (" (an unquoted comma in the text?)" if found > width else ""))
                continue
            text = join_text([(name, row[name]) for name in source.text_fields])
            if not text:
                raise DataError(f"{where}: empty {', '.join(map(repr, source.text_fields))}")
            labels = tuple((row[column] or "").strip() for column in source.label_fields)
            if not all(labels):
                raise DataError(f"{where}: empty label in {'/'.join(map(repr, source.label_fields))}")
            records.append(Record(Path(row["img_path"]).stem, source.root / "images" / row["img_path"], text, labels))
    if malformed:
        raise DataError(f"{path}: {len(malformed)} malformed row(s); every row needs the header's "
                        f"{width} fields {reader.fieldnames}:\n" + "\n".join(malformed))
    if not records:
        raise DataError(f"{path} holds no records")
    return records


WOUND = register_dataset(DatasetSpec(
    name="wound",
    title="Wound-1-0",
    folder="wound-1-0",
    marker="metadata_train.csv",
    tasks=("type", "severity"),
    label_fields=("type", "severity"),
    text_fields=("description",),
    leakage_fields={},
    load_split=load_wound_split,
    make_synthetic=synthetic.make_synthetic_wound,
    fetch=FetchSource("rupeshsah2038/Multi-Modal", "e0879366d149dd398da947bc121c2ecf4d8c2eac", "datasets/Wound-1-0"),
))


def label_word_pattern(spec: DatasetSpec, task: str) -> re.Pattern | None:
    pattern = spec.label_words.get(task)
    return re.compile(pattern) if pattern else None
