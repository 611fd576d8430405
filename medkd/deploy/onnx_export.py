"""Deployment: a trained model as a self-contained ONNX folder, checked against PyTorch and measured.

`export_model` writes one folder with everything needed to run the model without this
repository's training code:

- `model.onnx`: the whole classifier in fp32. Inputs `pixel_values` (B, 3, S, S) float32 in
  [0, 1] (the backbone's normalisation is inside the graph), `input_ids` and `attention_mask`
  (B, L) int64; outputs `logits_<task>` (B, classes) for both tasks. Batch and sequence axes are
  dynamic. Exported with PyTorch's own exporter (`torch.onnx.export(dynamo=True)`), checked with
  `onnx.checker`.
- `model.int8.onnx`: the same graph with int8 weights for its matrix products (ONNX Runtime's
  dynamic quantization; convolutions stay fp32, ONNX Runtime's integer convolutions being slow on
  CPU).
- `preprocessing.json`: how an image and a caption become those inputs (image size and resize,
  scaling, token length, the tokenizer's files and fingerprint) and the tasks' class names.
- `tokenizer/`: the tokenizer's own files (`transformers.AutoTokenizer.from_pretrained` reads them).

`check_parity`, `latency`, `paired_speedup` and `throughput` measure the export on real test samples.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn

from medkd.catalog.dataset_specs import Vocab
from medkd.config.configs import DataConfig, ModelConfig
from medkd.data.prepared import MultimodalDataset, make_loader
from medkd.models.backbones import VisionBackbone
from medkd.models.classifier import TASK_LOGITS
from medkd.scoring.stats import percentile_interval
from medkd.util.files import replace_dir, write_json

FORMAT = "medkd-onnx-1"  # preprocessing.json's `format`, and the ONNX file's metadata
FP32, INT8 = "model.onnx", "model.int8.onnx"
PREPROCESSING, TOKENIZER_DIR = "preprocessing.json", "tokenizer"
ROLE = "model"  # the token role of an exported model's inputs
PARITY_TOLERANCE = 1e-4  # max |logit difference| between PyTorch eager fp32 and ONNX Runtime


class ExportError(RuntimeError):
    """An export that is not faithful (parity) or a folder that is not one of ours."""


class _Logits(nn.Module):
    """The classifier with the exported interface: pixels (and, for a model that reads text, token ids
    and attention mask) in, the two tasks' logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids=None, attention_mask=None):
        out = self.model(pixel_values, input_ids, attention_mask)
        return out[TASK_LOGITS[0]], out[TASK_LOGITS[1]]


TEXT_INPUTS = ("input_ids", "attention_mask")


class _ChannelDifferenceConv(nn.Module):
    """A convolution over RGB computed on (R, G - R, B - R) with weights (w_R + w_G + w_B, w_G, w_B).

    The same linear map (the new weights are summed in float64, then rounded once to float32).
    Why: the images are mostly grayscale (R = G = B) and the first convolution's per-channel
    weights nearly cancel across channels (EfficientNet-Lite1: sum |w| up to 486 where
    |sum over channels of w| is at most 86, after its BatchNorm's scale of up to 205 is folded
    in). ONNX Runtime's convolution adds the 27 products channel by channel, rounding the large
    partial sums: 4x PyTorch's error at this layer, grown to ~2e-4 in the logits. Here the
    cancellation happens exactly in the input (G - R = 0) and the sum runs over small terms.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = copy.deepcopy(conv)
        weight = conv.weight.detach().double()
        merged = torch.cat([weight.sum(1, keepdim=True), weight[:, 1:]], 1)
        self.conv.weight = nn.Parameter(merged.to(conv.weight.dtype), requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([pixels[:, :1], pixels[:, 1:] - pixels[:, :1]], 1))


def export_form(model: nn.Module) -> nn.Module:
    """A copy of the classifier computing the same function in an order fp32 rounds less (the
    caller's model is left as it is): the vision backbone's first RGB convolution becomes a
    `_ChannelDifferenceConv`. This is the module the exporter traces, hence the parity check's
    PyTorch reference."""
    model = copy.deepcopy(model)
    for vision in [m for m in model.modules() if isinstance(m, VisionBackbone)]:  # an ensemble's members may have own
        first = next(((name, m) for name, m in vision.named_modules()
                      if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1), None)
        if first is not None:
            parent, _, attr = first[0].rpartition(".")
            setattr(vision.get_submodule(parent) if parent else vision, attr, _ChannelDifferenceConv(first[1]))
    return model


def tokenizer_fingerprint(folder: Path) -> str:
    """sha256 over a saved tokenizer's files (names and bytes): a different vocabulary, a different id."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\x00" + file.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Preprocessing:
    """What an exported model reads: its tasks and class names, and how an image and a caption become
    its inputs (image size, token length, masked words)."""

    tasks: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    image_size: int
    max_length: int
    mask_terms: tuple[str, ...] = ()

    @classmethod
    def of(cls, data_config: DataConfig, vocab: Vocab) -> "Preprocessing":
        return cls(tuple(vocab.tasks), tuple(map(tuple, vocab.classes)), data_config.image_size,
                   data_config.max_length, tuple(data_config.mask_terms))

    def spec(self, model_cfg: ModelConfig, tokenizer_sha256: str | None) -> dict:
        """preprocessing.json (`text`: None for a model that reads no text, which takes no tokenizer)."""
        tasks = list(self.tasks)
        text = {"input_ids": "int64 (B, L)", "attention_mask": "int64 (B, L)"} if tokenizer_sha256 else {}
        return {
            "format": FORMAT,
            "inputs": {"pixel_values": "float32 (B, 3, S, S) in [0, 1]", **text},
            "image": {"size": self.image_size, "mode": "RGB (8-bit grayscale is converted to RGB)",
                      "resize": "PIL bilinear to size x size, aspect ratio not kept", "scale": "uint8 / 255",
                      "normalisation": "inside the model"},
            "text": {"tokenizer": TOKENIZER_DIR, "tokenizer_sha256": tokenizer_sha256, "max_length": self.max_length,
                     "truncation": True, "empty_text": "refused", "mask_terms": list(self.mask_terms),
                     "masking": "whole words, any case, replaced by the tokenizer's mask token"} if text else None,
            "tasks": tasks, "classes": {t: list(c) for t, c in zip(tasks, self.classes)},
            "outputs": [f"logits_{t}" for t in tasks],
            "backbones": {"vision": model_cfg.vision, "text": model_cfg.text, "modalities": list(model_cfg.modalities)},
        }


def export_model(model: nn.Module, model_cfg: ModelConfig, tokenizer, batch: Mapping[str, torch.Tensor],
                 reads: Preprocessing, out_dir: Path, int8: bool = True, int8_reduce_range: bool = True) -> Path:
    """Write the ONNX folder (see the module's docstring) for a trained classifier; returns it.

    `batch`: at least two real samples, tokenized for `ROLE` (`dataset.collate`; its shapes are not
    baked in: batch and sequence axes are dynamic). The folder is written whole or not at all. A model
    that reads no text (`tokenizer` None) takes the pixels alone and ships no tokenizer.
    """
    tasks = reads.tasks

    def fill(staging: Path) -> None:
        wrapped = _Logits(export_form(model.float())).eval()
        rows, sequence = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
        inputs, names, shapes = (batch["pixel_values"].float(),), ["pixel_values"], [{0: rows}]
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
            inputs += (batch[f"input_ids_{ROLE}"], batch[f"attention_mask_{ROLE}"])
            names += list(TEXT_INPUTS)
            shapes += [{0: rows, 1: sequence}] * 2
        outputs = [f"logits_{t}" for t in tasks]
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(
                wrapped, inputs, dynamo=True, input_names=names, output_names=outputs, dynamic_shapes=tuple(shapes),
                optimize=True, verbose=False, report=False)
        program.save(str(staging / FP32), external_data=False)
        _stamp_and_check(staging / FP32, tasks)
        if int8:
            with _quiet():
                quantize_int8(staging / FP32, staging / INT8, reduce_range=int8_reduce_range)
            _stamp_and_check(staging / INT8, tasks)
        fingerprint = tokenizer_fingerprint(staging / TOKENIZER_DIR) if tokenizer is not None else None
        write_json(staging / PREPROCESSING, reads.spec(model_cfg, fingerprint))

    replace_dir(out_dir, fill)
    return Path(out_dir)


@contextlib.contextmanager
def _quiet():
    """The exporter's and quantizer's progress chatter stays out of the stage's notebook; it is shown
    if they fail."""
    captured = io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        print(captured.getvalue()[-5000:])
        raise
    finally:
        logging.disable(logging.NOTSET)


def _stamp_and_check(path: Path, tasks: Sequence[str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"medkd_format": FORMAT, "medkd_tasks": ",".join(tasks)})
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def quantize_int8(source: Path, target: Path, reduce_range: bool = True) -> None:
    """Dynamic int8 quantization of the matrix products (weights int8 per output channel,
    activations quantized per batch).

    `reduce_range`: weights in 7 bits. x86 CPUs without VNNI multiply u8 activations by s8 weights
    with VPMADDUBSW, which sums pairs in int16 and saturates with full 8-bit weights (ONNX Runtime's
    quantization guide); one int8 file then scores differently by the CPU it runs on.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer re-runs ONNX shape inference, which can disagree with the exporter's recorded
    # intermediate shapes (value_info); it needs none of them.
    proto = onnx.load(str(source))
    del proto.graph.value_info[:]
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.onnx"
        onnx.save(proto, str(plain))
        # Per output channel: one scale per weight column keeps the teacher's text encoder within a
        # point of fp32 avg F1 (per tensor: 3.4 points lost in the committed run).
        quantize_dynamic(str(plain), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=True, reduce_range=reduce_range)


# --------------------------------------------------------------------------- running an export


def read_preprocessing(folder: Path) -> dict:
    """The folder's preprocessing.json, refused unless it is one of ours."""
    file = Path(folder) / PREPROCESSING
    if not file.exists():
        raise ExportError(f"{folder} is not a medkd export: no {PREPROCESSING} (make one with the export stage)")
    try:
        spec = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ExportError(f"{file}: format {spec.get('format') if isinstance(spec, dict) else None!r}, "
                          f"expected {FORMAT!r}: not a medkd export, or one of another version")
    return spec


def session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session with `threads` intra-op threads (one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings and up only
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ExportError(f"{path} is not a loadable ONNX model: {str(err).splitlines()[0]}") from None


def onnx_inputs(batch: Mapping[str, torch.Tensor], role: str = ROLE) -> dict[str, np.ndarray]:
    """An export's inputs from a batch: the pixels, and the tokens of `role` where the batch has them."""
    inputs = {"pixel_values": batch["pixel_values"].float().numpy()}
    if f"input_ids_{role}" in batch:
        inputs.update(input_ids=batch[f"input_ids_{role}"].numpy().astype(np.int64),
                      attention_mask=batch[f"attention_mask_{role}"].numpy().astype(np.int64))
    return inputs


def eager_logits(model: nn.Module, batch: Mapping[str, torch.Tensor], role: str = ROLE) -> list[np.ndarray]:
    with torch.inference_mode():
        out = model(batch["pixel_values"].float(), batch.get(f"input_ids_{role}"), batch.get(f"attention_mask_{role}"))
    return [out[k].float().numpy() for k in TASK_LOGITS]


@dataclass
class Scored:
    """Logits of both tasks over a split, and the split's labels."""

    logits: list[np.ndarray]
    labels: np.ndarray

    def avg_f1(self) -> float:
        return float(np.mean([f1_score(self.labels[:, t], self.logits[t].argmax(1), average="macro")
                              for t in range(len(self.logits))]))


def score(run: Callable[[Mapping], list[np.ndarray]], dataset: MultimodalDataset, batch_size: int = 32) -> Scored:
    parts, labels = [[], []], []
    for batch in make_loader(dataset, batch_size, shuffle=False):
        for t, logits in enumerate(run(batch)):
            parts[t].append(logits)
        labels.append(batch["labels"].numpy())
    return Scored([np.concatenate(p) for p in parts], np.concatenate(labels))


def check_parity(eager: Scored, exported: Scored, tolerance: float = PARITY_TOLERANCE,
                 trained: Scored | None = None) -> dict:
    """Max |Δlogit| between the exported graph and PyTorch eager fp32 running the same graph
    (`export_form`), and whether every predicted class agrees, also with the `trained` module's
    own eager logits when given (whose max |Δlogit| to the export form is recorded: two fp32
    roundings of one function). An ExportError if either check fails."""
    worst = max(float(np.abs(a - b).max()) for a, b in zip(eager.logits, exported.logits))
    references = [eager] + ([trained] if trained is not None else [])
    same = all(np.array_equal(a.argmax(1), b.argmax(1))
               for reference in references for a, b in zip(reference.logits, exported.logits))
    result = {"max_abs_logit_diff": worst, "predictions_identical": same, "n": int(len(eager.labels)),
              "tolerance": tolerance}
    if trained is not None:
        result["trained_vs_export_form_max_abs_logit_diff"] = max(
            float(np.abs(a - b).max()) for a, b in zip(trained.logits, eager.logits))
    if worst > tolerance or not same:
        raise ExportError(f"ONNX export is not faithful: max |Δlogit| {worst:.2e} (tolerance {tolerance:.0e}), "
                          f"predicted classes {'identical' if same else 'differ'} on {result['n']} test samples")
    return result


def latency(run: Callable[[Mapping], object], batches: Sequence[Mapping], runs: int = 200,
            warmup: int = 20) -> dict:
    """Per-call latency (ms) over `runs` calls after `warmup`, cycling through `batches` (real samples)."""
    for k in range(warmup):
        run(batches[k % len(batches)])
    times = []
    for k in range(runs):
        batch = batches[k % len(batches)]
        start = time.perf_counter()
        run(batch)
        times.append(1000 * (time.perf_counter() - start))
    quantiles = statistics.quantiles(times, n=100, method="inclusive")
    return {"p50_ms": round(statistics.median(times), 3), "p95_ms": round(quantiles[94], 3), "runs": runs}


def paired_speedup(run: Callable[[Mapping], object], reference: Callable[[Mapping], object],
                   batches: Sequence[Mapping], runs: int = 200, warmup: int = 20, resamples: int = 2000,
                   block: int = 10, seed: int = 0, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Speed-up of `run` over `reference` (the teacher), both timed alternately on the same samples.

    Pair k times both on `batches[k]` (cycled), which of the two goes first alternating, so that a
    change of the machine's speed during the measurement, or between stages, slows both alike.
    Speed-up = the reference's p50 over the model's; its 95% interval: percentiles over `resamples` moving-block
    bootstrap resamples (runs of `block` consecutive pairs, fixed seed), since timing noise comes in
    bursts and neighbouring pairs are not independent. The interval covers this measurement's timing
    noise; repeated measurements on one machine also differ by a few percent (docs/deployment.md),
    and another machine is another question.
    """
    def timed(call, batch):
        start = clock()
        call(batch)
        return 1000 * (clock() - start)

    for k in range(warmup):
        run(batches[k % len(batches)])
        reference(batches[k % len(batches)])
    model_ms, reference_ms = np.empty(runs), np.empty(runs)
    for k in range(runs):
        batch = batches[k % len(batches)]
        if k % 2:
            reference_ms[k], model_ms[k] = timed(reference, batch), timed(run, batch)
        else:
            model_ms[k], reference_ms[k] = timed(run, batch), timed(reference, batch)
    block = max(1, min(block, runs))
    starts = np.random.default_rng(seed).integers(0, runs - block + 1, size=(resamples, -(-runs // block)))
    picks = (starts[:, :, None] + np.arange(block)).reshape(resamples, -1)[:, :runs]
    ratios = np.median(reference_ms[picks], axis=1) / np.median(model_ms[picks], axis=1)
    interval = percentile_interval(float(np.median(reference_ms) / np.median(model_ms)), ratios)
    return {"speedup": round(interval.estimate, 3), "ci95": [round(interval.low, 3), round(interval.high, 3)],
            "p50_ms": round(float(np.median(model_ms)), 3),
            "reference_p50_ms": round(float(np.median(reference_ms)), 3), "runs": runs, "resamples": resamples,
            "block": block}


def throughput(run: Callable[[Mapping], object], batches: Sequence[Mapping]) -> float:
    """Samples per second over `batches` after one warm-up batch."""
    run(batches[0])
    start, seen = time.perf_counter(), 0
    for batch in batches:
        run(batch)
        seen += len(batch["index"])
    return round(seen / (time.perf_counter() - start), 2)


def file_mb(path: Path) -> float:
    return round(Path(path).stat().st_size / 2**20, 2)
