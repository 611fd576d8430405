"""The multimodal classifier shared by the teacher and the students.

image -> vision backbone -> img_raw -> Linear -> img_proj ┐
                                                          ├─ cross-attention fusion -> fused
text  -> text backbone   -> txt_raw -> Linear -> txt_proj ┘      -> dropout -> two task heads

The same class with one backbone (`modalities: [image]` or `[text]`) is the single-modality
ablation: fusion then refines the one token, and the other modality's outputs are absent.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from medkd.config.configs import ModelConfig
from medkd.models.backbones import TextBackbone, VisionBackbone, build_backbone

# Output keys keep the study's names for every data set: `logits_modality` is task 1's logits and
# `logits_location` task 2's (for Wound-1-0: type and severity); people read the data set's task names.
OUTPUT_KEYS = (
    "logits_modality",
    "logits_location",
    "img_raw",
    "txt_raw",
    "img_proj",
    "txt_proj",
    "fused",
)
TASK_LOGITS = OUTPUT_KEYS[:2]  # (task 1, task 2)


class FusionBlock(nn.Module):
    """One cross-attention refinement of the fusion query.

    The query (B, D) attends, after its own LayerNorm, over the two modality tokens
    [img_proj, txt_proj] (B, 2, D); the attention output is added back to the query, then a
    pre-norm 4x-wide GELU feed-forward is added residually.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion_dim={dim} is not divisible by fusion_heads={heads}")
        self.norm_query = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.norm_query(query).unsqueeze(1)
        attended, _ = self.attention(q, tokens, tokens, need_weights=False)
        query = query + attended.squeeze(1)
        return query + self.ffn(self.norm_ffn(query))


class CrossAttentionFusion(nn.Module):
    """`layers` stacked FusionBlocks; the first query is the mean of the modality tokens."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if layers < 1:
            raise ValueError(f"fusion_layers must be >= 1, got {layers}")
        self.blocks = nn.ModuleList(FusionBlock(dim, heads, dropout) for _ in range(layers))

    def forward(self, *tokens: torch.Tensor) -> torch.Tensor:
        """`tokens`: the projected vector of each modality the model has, each (B, D)."""
        tokens = torch.stack(tokens, dim=1)
        query = tokens.mean(dim=1)
        for block in self.blocks:
            query = block(query, tokens)
        return query


class MultimodalClassifier(nn.Module):
    """Image + text classifier with two task heads; the teacher and the students are this class.

    `forward` returns the study's output dict (logits of both tasks, raw backbone vectors,
    projected vectors) plus `fused`, the vector the heads read, which CRD distils.
    """

    def __init__(
        self,
        vision: VisionBackbone | None,
        text: TextBackbone | None,
        num_classes: Sequence[int],
        fusion_dim: int,
        fusion_layers: int,
        fusion_heads: int,
        dropout: float,
    ):
        super().__init__()
        if len(num_classes) != 2 or min(num_classes) < 2:
            raise ValueError(f"num_classes must be two class counts >= 2, got {num_classes!r}")
        if vision is None and text is None:
            raise ValueError("a classifier needs at least one backbone (vision or text)")
        self.vision = vision
        self.text = text
        self.num_classes = tuple(int(n) for n in num_classes)
        self.fusion_dim = fusion_dim
        self.img_proj = nn.Linear(vision.width, fusion_dim) if vision is not None else None
        self.txt_proj = nn.Linear(text.width, fusion_dim) if text is not None else None
        self.fusion = CrossAttentionFusion(fusion_dim, fusion_layers, fusion_heads)
        self.dropout = nn.Dropout(dropout)
        self.head_modality = nn.Linear(fusion_dim, self.num_classes[0])
        self.head_location = nn.Linear(fusion_dim, self.num_classes[1])

    @property
    def img_dim(self) -> int | None:
        return self.vision.width if self.vision is not None else None

    @property
    def txt_dim(self) -> int | None:
        return self.text.width if self.text is not None else None

    def forward(
        self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
        vision_trunk: torch.Tensor | None = None, text_trunk: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`vision_trunk`/`text_trunk`: the frozen trunks' outputs for this batch (the trunk cache), used
        in place of the pixels/token ids; the whole model (export, prediction) takes only the inputs."""
        return self.head(self.encode(pixel_values, input_ids, attention_mask, vision_trunk, text_trunk))

    def encode(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
               vision_trunk: torch.Tensor | None = None, text_trunk: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """The backbones' pooled vectors: `img_raw` and `txt_raw` (those of the modalities it reads)."""
        out = {}
        if self.vision is not None:
            out["img_raw"] = self.vision(pixel_values, vision_trunk)
        if self.text is not None:
            out["txt_raw"] = self.text(input_ids, attention_mask, text_trunk)
        return out

    def head(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything above the backbones: projections, fusion and the task heads, from `encode`'s vectors."""
        out = dict(raw)
        for modality, projection in (("img", self.img_proj), ("txt", self.txt_proj)):
            if projection is not None:
                out[f"{modality}_proj"] = projection(raw[f"{modality}_raw"])
        fused = self.fusion(*(out[k] for k in ("img_proj", "txt_proj") if k in out))
        hidden = self.dropout(fused)
        return {"logits_modality": self.head_modality(hidden), "logits_location": self.head_location(hidden),
                **out, "fused": fused}


class EnsembleClassifier(nn.Module):
    """Several trained classifiers of one config answering as one (Hinton et al.): the members' logits
    averaged, their fused vectors side by side (what CRD distils), their pooled backbone vectors averaged.

    Members whose backbones hold the same weights (frozen pretrained backbones, the teacher's default
    at `*_train_blocks: 0`) share one copy, run once per batch: the ensemble then costs one backbone
    pass plus a fusion and heads per member, in training, in its checkpoint and in its ONNX export.
    """

    def __init__(self, members: Sequence[MultimodalClassifier], shared_backbones: bool | None = None):
        """`shared_backbones`: None finds out (same weights, frozen whole); True when rebuilding a saved
        ensemble whose members shared them."""
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        if shared_backbones is None:
            shared_backbones = all(_same_backbones(first, m) for m in members[1:])
        self.shared_backbones = shared_backbones
        if self.shared_backbones:
            for member in members[1:]:
                member.vision, member.text = None, None  # registered once, under members.0
        self.members = nn.ModuleList(members)
        self.num_classes = first.num_classes
        self.fusion_dim = first.fusion_dim * len(members)

    @property
    def vision(self) -> VisionBackbone | None:
        """The shared vision backbone (None when members have their own: then no trunk cache is read)."""
        return self.members[0].vision if self.shared_backbones else None

    @property
    def text(self) -> TextBackbone | None:
        return self.members[0].text if self.shared_backbones else None

    @property
    def img_dim(self) -> int | None:
        return self.members[0].img_dim

    @property
    def txt_dim(self) -> int | None:
        return self.members[0].txt_dim

    def forward(
        self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
        vision_trunk: torch.Tensor | None = None, text_trunk: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.shared_backbones:
            raw = self.members[0].encode(pixel_values, input_ids, attention_mask, vision_trunk, text_trunk)
            outs = [member.head(raw) for member in self.members]
        else:
            outs = [member(pixel_values, input_ids, attention_mask) for member in self.members]
        merged = {k: torch.stack([o[k] for o in outs]).mean(dim=0) for k in outs[0] if k != "fused"}
        merged["fused"] = torch.cat([o["fused"] for o in outs], dim=1)
        return merged


def _same_backbones(a: MultimodalClassifier, b: MultimodalClassifier) -> bool:
    """Whether two classifiers' backbones hold the same weights (and are frozen whole: nothing trains them)."""
    for mine, theirs in ((a.vision, b.vision), (a.text, b.text)):
        if (mine is None) != (theirs is None):
            return False
        if mine is None:
            continue
        if mine.train_blocks != 0 or theirs.train_blocks != 0:
            return False
        state, other = mine.state_dict(), theirs.state_dict()
        if state.keys() != other.keys() or not all(torch.equal(state[k], other[k]) for k in state):
            return False
    return True


def build_model(cfg: ModelConfig, num_classes: Sequence[int], pretrained: bool | None = None) -> MultimodalClassifier:
    """Build a classifier from its config (see `medkd.models.backbones.list_backbones` for the names).

    `pretrained=False` (the config's or the argument's) never touches the network;
    `vision_weights`/`text_weights` name local weights that take precedence over every other source.
    """
    pretrained = cfg.pretrained if pretrained is None else pretrained
    vision = text = None
    if "image" in cfg.modalities:
        vision = build_backbone(cfg.vision, pretrained=pretrained, weights=cfg.vision_weights, modality="vision")
        vision.set_train_blocks(cfg.vision_train_blocks)
    if "text" in cfg.modalities:
        text = build_backbone(cfg.text, pretrained=pretrained, weights=cfg.text_weights, modality="text")
        text.set_train_blocks(cfg.text_train_blocks)
    return MultimodalClassifier(
        vision,
        text,
        num_classes,
        fusion_dim=cfg.fusion_dim,
        fusion_layers=cfg.fusion_layers,
        fusion_heads=cfg.fusion_heads,
        dropout=cfg.dropout,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
