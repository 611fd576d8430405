"""From a data set's published files to batches: config, decoded images, tokens, loaders.

What differs between data sets (files, tasks, label and text fields, leakage) is in their
`DatasetSpec` (`medkd.catalog.dataset_specs`); this module is the same for all of them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler
from tqdm import tqdm

from medkd.catalog.dataset_specs import (
    SPLITS,
    UNLABELLED,
    DataError,
    Record,
    SplitSource,
    Vocab,
    check_leakage,
    labelled_cases,
)
from medkd.config.configs import DataConfig, data_config
from medkd.util import progress
from medkd.util.distributed import shard, world_size
from medkd.util.files import sha256_file


def mask_pattern(terms: Sequence[str]) -> re.Pattern | None:
    """One case-insensitive pattern for whole-word `terms` (longest first, so "MRI" wins over "MR");
    a phrase's words match across any whitespace. None for no terms."""
    if not terms:
        return None
    alternatives = [r"\s+".join(map(re.escape, t.split())) for t in sorted(terms, key=len, reverse=True)]
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def mask_words(texts: Sequence[str], terms: Sequence[str], token: str) -> list[str]:
    """`texts` with every listed word or phrase replaced by `token` (e.g. the tokenizer's [MASK])."""
    pattern = mask_pattern(terms)
    return list(texts) if pattern is None else [pattern.sub(token, text) for text in texts]


def mask_token(tokenizer) -> str:
    token = getattr(tokenizer, "mask_token", None) or getattr(tokenizer, "unk_token", None)
    if not token:
        raise ValueError(f"{type(tokenizer).__name__} has neither a mask nor an unknown token to mask words with")
    return token


def load_splits(cfg: DataConfig) -> dict[str, list[Record]]:
    """Every split's records, after the leakage guard."""
    spec = cfg.spec
    check_leakage(spec, cfg.text_fields, cfg.label_fields)
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data set folder {str(root)!r} does not exist (data set {cfg.name!r})")
    source = SplitSource(root, cfg.text_fields, cfg.label_fields)
    return {split: spec.load_split(source, split) for split in SPLITS}


def verify_files(records: Mapping[str, Sequence[Record]]) -> dict[str, list[str]]:
    """Every split's image sha256s, after checking the data set whole.

    Every image must exist and decode completely (a truncated PNG fails here, not in training);
    no image id may appear twice and no two records may hold the same image (sha256), within or
    across splits (a test image that is also a training image leaks). One DataError lists every
    problem found, each naming the records involved.
    """
    problems, hashes = [], {}
    first_id: dict[str, str] = {}
    first_hash: dict[str, str] = {}
    total = sum(len(r) for r in records.values())
    bar = tqdm(total=total, desc="verify images", leave=False, mininterval=2)
    for split, split_records in records.items():
        hashes[split] = []
        for record in split_records:
            bar.update()
            progress.update(f"verifying images: {bar.n}/{total}", fraction=bar.n / total)
            name = f"{split} record {record.image_id!r}"
            if record.image_id in first_id:
                problems.append(f"duplicate image id {record.image_id!r}: {first_id[record.image_id]} and {name}")
            first_id.setdefault(record.image_id, name)
            try:
                digest = sha256_file(record.image_path)
                with Image.open(record.image_path) as img:
                    img.load()  # decodes every byte: truncation and corruption show here
            except FileNotFoundError:
                problems.append(f"missing image {record.image_path} ({name})")
                digest = ""
            except (OSError, SyntaxError, ValueError) as err:
                problems.append(f"unreadable image {record.image_path} ({name}): {err}")
            hashes[split].append(digest)
            if digest and digest in first_hash:
                problems.append(f"identical images (sha256 {digest[:12]}…): {first_hash[digest]} and {name}")
            elif digest:
                first_hash[digest] = name
    bar.close()
    if problems:
        raise DataError(f"{len(problems)} problem(s) in the data set's images and ids:\n" +
                        "\n".join(f"  {p}" for p in problems))
    return hashes


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
        progress.update(f"decoding {desc}: {n + 1}/{len(records)}")
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
        images: torch.Tensor,
        max_length: int,
        augment: bool = False,
        mask_terms: Sequence[str] = (),
    ):
        self.records = list(records)
        self.labels = labels
        self.augment = augment
        self.images = images
        texts = [r.text for r in self.records]
        self.tokens = {}
        for role, tokenizer in tokenizers.items():
            if tokenizer is None:  # a model that reads no text
                continue
            shown = mask_words(texts, mask_terms, mask_token(tokenizer)) if mask_terms else texts
            enc = tokenizer(shown, padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
            self.tokens[role] = (enc["input_ids"], enc["attention_mask"])

        self.keep: list[int] | None = None  # the samples a loader draws (None: all)

    def restricted(self, keep: Sequence[int]) -> "MultimodalDataset":
        """The same samples (indices, caches and teacher outputs unchanged), of which a loader draws `keep`."""
        view = copy.copy(self)
        view.keep = list(keep)
        return view

    def __len__(self) -> int:
        return len(self.keep) if self.keep is not None else len(self.records)

    def lengths(self) -> torch.Tensor:
        """Each drawn sample's longest tokenized text over the roles (0 for a model that reads none)."""
        if not self.tokens:
            return torch.zeros(len(self), dtype=torch.long)
        lengths = torch.stack([mask.sum(1) for _, mask in self.tokens.values()]).amax(0)
        return lengths[self.keep] if self.keep is not None else lengths

    def by_length(self) -> list[int]:
        """Positions of the drawn samples ordered by their longest tokenized text over the roles (stable)."""
        return torch.argsort(self.lengths(), stable=True).tolist()

    def __getitem__(self, position: int) -> int:
        return self.keep[position] if self.keep is not None else position

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
        batch["labels"] = self.labels[index]
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


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Shuffled training batches of similar text length: less padding, still random.

    Each epoch shuffles all samples, cuts them into pools of `pool_batches` batches, sorts each
    pool by length, cuts it into batches and shuffles the batches. Every sample is seen once per
    epoch and the number of batches is that of plain shuffling; all randomness comes from
    `generator` (the loader's: its state is what a resumed run restores).
    """

    def __init__(self, lengths: torch.Tensor, batch_size: int, generator: torch.Generator, pool_batches: int = 8):
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator
        self.pool = batch_size * pool_batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator)
        batches = []
        for pool in order.split(self.pool):
            pool = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches.extend(pool.split(self.batch_size))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i].tolist()


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's part of each global batch of `batches` (data-parallel training).

    Every rank draws the same global batches (same generator, same seed): a run on N processes
    trains on exactly the batches of a one-process run.
    """

    def __init__(self, batches: Sampler[list[int]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield shard(batch)


def make_loader(dataset: MultimodalDataset, batch_size: int, shuffle: bool, seed: int = 0,
                by_length: bool = False) -> DataLoader:
    """Batches of `dataset`. `by_length` batches samples of similar text length together, so each
    batch pads to less: for evaluation (no shuffle) in length order (the caller restores the order
    from `index`); for training (shuffle) via `LengthBucketBatchSampler`. Under data-parallel
    training, shuffled (training) batches are sharded over the ranks; evaluation is not."""
    generator = torch.Generator().manual_seed(seed)
    if shuffle and world_size() > 1:
        batches = (LengthBucketBatchSampler(dataset.lengths(), batch_size, generator) if by_length else
                   BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False))
        return DataLoader(dataset, batch_sampler=ShardedBatchSampler(batches), collate_fn=dataset.collate,
                          generator=generator, num_workers=0)
    if by_length and shuffle:
        sampler = LengthBucketBatchSampler(dataset.lengths(), batch_size, generator)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate, generator=generator,
                          num_workers=0)
    if by_length:
        return DataLoader(dataset, batch_size=batch_size, sampler=dataset.by_length(), collate_fn=dataset.collate,
                          generator=generator, num_workers=0)
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
    _content_keys: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, cfg: DataConfig) -> "PreparedData":
        records = load_splits(cfg)
        vocab = Vocab.from_records(records["train"], cfg.task_names)
        labels = {s: torch.from_numpy(vocab.encode(records[s], s)) for s in SPLITS}
        if cfg.label_fraction < 1:  # scarce labels: the rest of the training split keeps its images, not its labels
            keep = labelled_cases(records["train"], cfg.label_fraction, cfg.label_seed, cfg.spec.case_of)
            labels["train"][torch.from_numpy(~keep)] = UNLABELLED
        for split in SPLITS:  # fail before any training if an image is missing
            for r in records[split]:
                if not r.image_path.exists():
                    raise DataError(f"missing image {r.image_path} for {split} record {r.image_id!r}")
        return cls(cfg, records, labels, vocab)

    def at_image_size(self, image_size: int | None) -> "PreparedData":
        """The same records and labels read at another image size (a teacher's own resolution); its
        images and content keys are its own. None or the same size: this data itself."""
        if image_size is None or image_size == self.config.image_size:
            return self
        config = dataclasses.replace(self.config, image_size=image_size)
        return PreparedData(config, self.records, self.labels, self.vocab)

    def images(self, split: str) -> torch.Tensor:
        key = (split, self.config.image_size)
        if key not in self._images:
            self._images[key] = load_images(self.records[split], self.config.image_size, f"{split} images")
        return self._images[key]

    def dataset(self, split: str, tokenizers: Mapping[str, object], augment: bool = False) -> MultimodalDataset:
        return MultimodalDataset(self.records[split], self.labels[split], tokenizers, self.images(split),
                                 self.config.max_length, augment=augment, mask_terms=self.config.mask_terms)

    def content_key(self, split: str) -> str:
        """sha256 of what a model sees of a split: decoded pixels, texts, labels, preprocessing.

        Computed once per split (the cache keys, the resume key and the Optuna fingerprint all ask);
        built from the split's `images_key` and `texts_key`, so the pixels are hashed once.
        """
        def update(digest):
            digest.update(f"{self.images_key(split)}\x00{self.texts_key(split)}\x00{self.config.label_fields}".encode())
            for record in self.records[split]:
                digest.update(f"\x00{record.image_id}".encode())
            digest.update(self.labels[split].numpy().tobytes())
            digest.update(repr(self.vocab.to_dict()).encode())
        return self._key(("content", split), update)

    def images_key(self, split: str) -> str:
        """sha256 of a split's decoded, resized pixels in record order: all a vision trunk sees."""
        def update(digest):
            digest.update(repr(self.config.image_size).encode())
            digest.update(self.images(split).numpy().tobytes())
        return self._key(("images", split), update)

    def texts_key(self, split: str) -> str:
        """sha256 of a split's texts in record order and how they are cut and masked (the tokenizer is
        keyed apart): all a text trunk sees."""
        def update(digest):
            digest.update(repr((self.config.max_length, self.config.text_fields, self.config.mask_terms)).encode())
            for record in self.records[split]:
                digest.update(f"\x00{record.text}".encode())
        return self._key(("texts", split), update)

    def _key(self, name: tuple, update) -> str:
        """A memoised sha256 (`update` feeds the digest), computed once per PreparedData."""
        if name not in self._content_keys:
            digest = hashlib.sha256()
            update(digest)
            self._content_keys[name] = digest.hexdigest()
        return self._content_keys[name]

    def labelled_train(self) -> list[int]:
        """The training samples whose labels a run may see (all of them unless `label_fraction` < 1)."""
        return torch.nonzero((self.labels["train"] != UNLABELLED).all(dim=1)).flatten().tolist()

    def joint_train_labels(self) -> torch.Tensor:
        return joint_labels(self.labels["train"], self.vocab.num_classes)


def load_data(params: Mapping, dataset: str, root: Path) -> PreparedData:
    """`data.<dataset>` of params.yaml, loaded (a missing data set says how to fetch it)."""
    cfg = data_config(params, dataset, root)
    if not (Path(cfg.root) / cfg.spec.marker).exists():
        raise DataError(
            f"data set {dataset!r} is not at {cfg.root}: run `make data` (copies it from the local "
            "mirror in $MEDKD_DATA_MIRROR, default ../shared/data, or downloads it from its public "
            "source), then `dvc repro`"
        )
    return PreparedData.load(cfg)
