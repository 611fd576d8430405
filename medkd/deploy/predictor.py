"""`medkd predict`: a trained model's predictions for your own images and captions.

    medkd predict MODEL --image scan.png --text "axial CT of the abdomen"
    medkd predict MODEL --csv cases.csv --out predictions.csv
    medkd predict MODEL --csv cases.csv --json

MODEL is an export folder (the export stage's `models/export/<model>/`), one of its ONNX files
(`model.onnx`, or `model.int8.onnx` for the quantized model), or a training checkpoint (`.pt`,
run with PyTorch). The CSV needs the columns `image` (a path, relative to the CSV's folder or
absolute) and `text` (the caption). Each sample gets, per task, the predicted class, its
probability and every class's probability.

Inputs are checked before anything runs, and a bad one stops the command with one line naming it
and exit status 2 (no output file is written): a missing or unreadable image; an image with an
alpha channel or more than 8 bits per channel (the models saw 8-bit RGB and grayscale only:
flatten or convert it first); an empty caption (every training image had one, and a model reading
an empty caption is being used off its training distribution); a CSV without the needed columns; a
model file that is not one of ours; a tokenizer folder that does not match the one the model was
exported with. As in training, caption words listed in the data set's `mask_terms` are masked.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from medkd.catalog.dataset_specs import DataError, Vocab
from medkd.config.configs import ModelConfig
from medkd.data.prepared import load_image, mask_token, mask_words
from medkd.deploy import onnx_export
from medkd.models.backbones import build_tokenizer
from medkd.models.checkpoint import model_from_checkpoint, read_checkpoint
from medkd.models.classifier import TASK_LOGITS
from medkd.util.files import atomic_write

EXIT_BAD_INPUT = 2
ACCEPTED_MODES = {"RGB": "8-bit RGB", "L": "8-bit grayscale", "P": "8-bit palette"}


class PredictError(ValueError):
    """Bad input to `medkd predict`: the message names the file or field and what was expected."""


@dataclass
class Predictor:
    """A loaded model and the preprocessing it expects."""

    tasks: list[str]
    classes: dict[str, list[str]]
    image_size: int
    max_length: int
    tokenizer: object
    mask_terms: tuple[str, ...]
    logits: Callable[[np.ndarray, np.ndarray, np.ndarray], list[np.ndarray]]
    source: str

    @property
    def reads_text(self) -> bool:
        return self.tokenizer is not None

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Token ids and attention mask (None, None for a model that reads no text)."""
        if not self.reads_text:
            return None, None
        shown = mask_words(texts, self.mask_terms, mask_token(self.tokenizer)) if self.mask_terms else list(texts)
        enc = self.tokenizer(shown, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def load_predictor(path: Path, threads: int = 1) -> Predictor:
    path = Path(path)
    if not path.exists():
        raise PredictError(f"model {path} does not exist: `make demo` makes a small real one in a few minutes "
                           f"(models/demo/export), the study makes every model (`make repro`; one model: "
                           f"`dvc repro export@<student>`, into models/export/<student>)")
    if path.suffix == ".pt":
        return _checkpoint_predictor(path, threads)
    if path.is_dir():
        folder, onnx_file = path, path / onnx_export.FP32
    elif path.suffix == ".onnx":
        folder, onnx_file = path.parent, path
    else:
        raise PredictError(f"model {path}: expected an export folder, a .onnx file inside one, or a .pt checkpoint")
    try:
        spec = onnx_export.read_preprocessing(folder)
    except onnx_export.ExportError as err:
        raise PredictError(str(err)) from None
    if not onnx_file.exists():
        raise PredictError(f"model {onnx_file} does not exist")
    tokenizer = _export_tokenizer(folder, spec["text"]) if spec.get("text") else None
    try:
        session = onnx_export.session(onnx_file, threads)
    except onnx_export.ExportError as err:
        raise PredictError(str(err)) from None
    metadata = session.get_modelmeta().custom_metadata_map
    if metadata.get("medkd_format") != onnx_export.FORMAT:
        raise PredictError(f"model {onnx_file} is not a medkd export (no {onnx_export.FORMAT!r} metadata)")
    outputs = [f"logits_{t}" for t in spec["tasks"]]

    def logits(pixels, ids, mask):
        text = {"input_ids": ids, "attention_mask": mask} if ids is not None else {}
        return session.run(outputs, {"pixel_values": pixels, **text})

    text = spec.get("text") or {}
    return Predictor(list(spec["tasks"]), spec["classes"], spec["image"]["size"], text.get("max_length", 0),
                     tokenizer, tuple(text.get("mask_terms", ())), logits, str(onnx_file))


def _export_tokenizer(folder: Path, text: Mapping):
    """The export's own tokenizer, refused unless its files are those the export was made with."""
    tokenizer_dir = folder / text["tokenizer"]
    found = onnx_export.tokenizer_fingerprint(tokenizer_dir) if tokenizer_dir.is_dir() else None
    if found != text["tokenizer_sha256"]:
        raise PredictError(f"tokenizer {tokenizer_dir} does not match the one {folder / onnx_export.PREPROCESSING} "
                           "records (sha256 of its files): the model would read other token ids than it was "
                           "trained with; re-export the model")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _checkpoint_predictor(path: Path, threads: int) -> Predictor:
    try:
        payload = read_checkpoint(path)
    except Exception as err:  # torch.load of a foreign file raises many kinds
        raise PredictError(f"model {path} is not a medkd checkpoint ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None
    torch.set_num_threads(threads)
    model = model_from_checkpoint(payload).float().eval()
    vocab = Vocab.from_dict(payload["vocab"])
    data = payload["data"]

    def logits(pixels, ids, mask):
        tensors = [torch.from_numpy(a) if a is not None else None for a in (pixels, ids, mask)]
        with torch.inference_mode():
            out = model(*tensors)
        return [out[k].float().numpy() for k in TASK_LOGITS]

    model_cfg = ModelConfig.from_dict(payload["model_config"])
    tokenizer = build_tokenizer(model_cfg.text, model_cfg.text_weights)
    return Predictor(list(vocab.tasks), {t: list(c) for t, c in zip(vocab.tasks, vocab.classes)},
                     data["image_size"], data["max_length"], tokenizer, tuple(data.get("mask_terms") or ()),
                     logits, str(path))


# --------------------------------------------------------------------------- inputs


def read_cases(image: str | None, text: str | None, csv: Path | None, needs_text: bool = True) -> pd.DataFrame:
    """(image path, caption) rows from --image/--text or a CSV (the caption only where the model reads
    text: `needs_text`); every problem is a PredictError."""
    if csv is not None:
        if image is not None or text is not None:
            raise PredictError("give either --csv or --image with --text, not both")
        csv = Path(csv)
        if not csv.exists():
            raise PredictError(f"CSV {csv} does not exist")
        try:
            frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise PredictError(f"CSV {csv} cannot be read: {str(err).splitlines()[0]}") from None
        if not needs_text and "text" not in frame.columns:
            frame["text"] = ""
        missing = [c for c in ("image", "text") if c not in frame.columns]
        if missing:
            raise PredictError(f"CSV {csv} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                               f"(found: {', '.join(frame.columns) or 'none'}); expected columns image, text")
        if frame.empty:
            raise PredictError(f"CSV {csv} has no rows")
        frame = frame[["image", "text"]].copy()
        frame["path"] = [str(p if Path(p).is_absolute() else csv.parent / p) for p in frame["image"]]
        frame["where"] = [f"{csv} row {k + 2}" for k in range(len(frame))]  # row 1 is the header
        return frame
    if image is None or (text is None and needs_text):
        raise PredictError("give --image PATH with --text CAPTION, or --csv FILE")
    return pd.DataFrame({"image": [image], "text": [text or ""], "path": [image], "where": ["--image/--text"]})


def load_rgb(path: str, size: int, where: str) -> np.ndarray:
    """An image as float32 (3, size, size) in [0, 1], as in training; refuses modes the models never saw."""
    try:
        with Image.open(path) as img:  # the header only: the mode
            mode, info = img.mode, img.info
        if mode not in ACCEPTED_MODES or (mode == "P" and "transparency" in info):
            why = ("it has an alpha channel" if "A" in mode or "transparency" in info else
                   "it has more than 8 bits per channel" if mode.startswith(("I", "F")) else f"mode {mode}")
            raise PredictError(f"image {path} ({where}) has mode {mode}: {why}; expected "
                               f"{', '.join(ACCEPTED_MODES.values())} (convert it first)")
        return load_image(Path(path), size).astype(np.float32) / 255.0  # decoded and resized as in training
    except FileNotFoundError:
        raise PredictError(f"image {path} ({where}) does not exist") from None
    except (UnidentifiedImageError, OSError, DataError) as err:
        raise PredictError(f"image {path} ({where}) cannot be read as an image: {err}") from None


def check_texts(cases: pd.DataFrame) -> None:
    empty = [w for w, t in zip(cases["where"], cases["text"]) if not str(t).strip()]
    if empty:
        raise PredictError(f"empty caption in {empty[0]}" + (f" and {len(empty) - 1} more" if len(empty) > 1 else "")
                           + ": every training image had a caption; give one")


# --------------------------------------------------------------------------- predictions


def predict(predictor: Predictor, cases: pd.DataFrame, batch_size: int = 32) -> pd.DataFrame:
    """Per sample and task: predicted class, its probability, and each class's probability."""
    if predictor.reads_text:
        check_texts(cases)
    pixels = np.stack([load_rgb(p, predictor.image_size, w) for p, w in zip(cases["path"], cases["where"])])
    rows: list[dict] = [{"image": image} for image in cases["image"]]
    starts = range(0, len(cases), batch_size)
    for start in tqdm(starts, desc="predict", disable=len(starts) < 2):
        stop = start + batch_size
        ids, mask = predictor.encode(list(cases["text"][start:stop]))
        for task, logits in zip(predictor.tasks, predictor.logits(pixels[start:stop], ids, mask)):
            probs = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=1).numpy()
            names = predictor.classes[task]
            for row, p in zip(rows[start:stop], probs):
                k = int(p.argmax())
                row[f"{task}_pred"], row[f"{task}_prob"] = names[k], round(float(p[k]), 6)
                row.update({f"{task}_prob_{name}": round(float(v), 6) for name, v in zip(names, p)})
    return pd.DataFrame(rows)


def summary_line(row: pd.Series, tasks: Sequence[str]) -> str:
    return "; ".join(f"{task}: {row[f'{task}_pred']} ({row[f'{task}_prob']:.3f})" for task in tasks)


def as_json(table: pd.DataFrame, predictor: Predictor) -> list[dict]:
    """Per sample: per task the predicted class, its probability and every class's probability."""
    return [{"image": row["image"],
             **{task: {"prediction": row[f"{task}_pred"], "probability": row[f"{task}_prob"],
                       "probabilities": {name: row[f"{task}_prob_{name}"] for name in predictor.classes[task]}}
                for task in predictor.tasks}}
            for _, row in table.iterrows()]


EXAMPLES = """examples:
  medkd predict models/demo/export --image scan.png --text "axial CT of the abdomen"
      prints one line: per task, the predicted class and its probability
      (modality: CT (0.981); location: Abdomen (0.874))
  medkd predict models/export/mobilenetv2-minilm --csv cases.csv
      prints a CSV: per image and task the prediction, its probability and every class's probability
  medkd predict MODEL --csv cases.csv --json
      prints JSON: a list of {"image", <task>: {"prediction", "probability", "probabilities": {class: p}}}
  medkd predict MODEL --csv cases.csv --out predictions.csv      (the CSV written to a file)

MODEL: an export folder (make demo, or the study's models/export/<model>), its model.onnx or
model.int8.onnx, or a training checkpoint (.pt). The CSV has the columns image (a path, relative to
the CSV's folder or absolute) and text (the caption). A bad input stops with one line naming it (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medkd predict", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="export folder, its model.onnx / model.int8.onnx, or a .pt checkpoint")
    parser.add_argument("--image", help="one image file (with --text)")
    parser.add_argument("--text", help="its caption")
    parser.add_argument("--csv", type=Path, help="a CSV with columns image, text")
    parser.add_argument("--out", type=Path, help="write the predictions to this CSV (default: print them)")
    parser.add_argument("--json", action="store_true", help="print every class's probability as JSON (for scripts)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        predictor = load_predictor(args.model, args.threads)
        cases = read_cases(args.image, args.text, args.csv, needs_text=predictor.reads_text)
        table = predict(predictor, cases, args.batch_size)
    except PredictError as err:
        print(f"medkd predict: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.out is not None:
        atomic_write(args.out, lambda p: table.to_csv(p, index=False))
        print(f"{len(table)} predictions written to {args.out}")
    elif args.json:
        print(json.dumps(as_json(table, predictor), indent=1))
    elif args.csv is None:
        print(summary_line(table.iloc[0], predictor.tasks))
    else:
        print(table.to_csv(index=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
