"""Distillation losses: each term is a small module; `CombinedLoss` only weights and sums them.

total = Σ_term weight[term] · term      (study: 1·ce + 0.518·kl + 112.4·mse + 10·crd)

Every term has one name from params.yaml (`loss.<term>`) through its registry entry
(`medkd.config.loss_terms`, which names the module here and its keys) to the logged parts
(`train_<term>` in a run's history). Each term module is built by `from_config(term_config,
LossContext)` and called as `term(s_out, t_out, labels, index)`.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from medkd.config.loss_terms import LOSS_TERMS, CRDTerm, CrossEntropyTerm, FeatureMSETerm, LossConfig, SoftTargetTerm
from medkd.models.classifier import TASK_LOGITS
from medkd.util.distributed import all_reduce_sum, gather_rows, world_size

Outputs = Mapping[str, torch.Tensor]


def kd_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al. (2015) soft-target loss: KL(softmax(t/T) ‖ softmax(s/T)) · T².

    batchmean reduction: summed over classes, averaged over the batch. The T² factor keeps
    the gradient scale independent of T. Teacher logits are detached.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


UNLABELLED = -1  # the label id of a training image whose label a run may not see (data.<d>.label_fraction)


class TaskCrossEntropy(nn.Module):
    """Σ_tasks CE(logits_task, labels[:, task]) against the ground truth (the teacher is not used).

    With `class_weights` (one tensor per task), each sample's CE is multiplied by its class's
    weight and the batch takes the plain mean, mean_i(w[y_i] · CE_i): with balanced weights (mean 1
    over the training set) an unbiased estimate of the class-balanced risk, and a per-sample mean,
    so data-parallel ranks combine it exactly. `label_smoothing` ε: the target is (1 − ε) on the true
    class plus ε spread evenly over all classes (torch's own). A label `UNLABELLED` takes no part: the
    mean runs over the batch's labelled samples (under data-parallel training, over each rank's).
    """

    def __init__(self, class_weights: tuple[torch.Tensor, torch.Tensor] | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.weighted = class_weights is not None
        self.label_smoothing = label_smoothing
        if self.weighted:
            self.register_buffer("weights_task1", class_weights[0].float())
            self.register_buffer("weights_task2", class_weights[1].float())

    @classmethod
    def from_config(cls, cfg: CrossEntropyTerm, ctx: "LossContext") -> "TaskCrossEntropy":
        if cfg.class_weights == "none":
            return cls(label_smoothing=cfg.label_smoothing)
        if ctx.train_labels is None or ctx.num_classes is None:
            raise ValueError("class_weights: balanced needs the training labels and class counts in the LossContext")
        labelled = ctx.train_labels[(ctx.train_labels != UNLABELLED).all(dim=1)]
        return cls(balanced_class_weights(labelled, ctx.num_classes), cfg.label_smoothing)

    def forward(self, s_out: Outputs, t_out: Outputs | None, labels: torch.Tensor, index=None) -> torch.Tensor:
        total = 0.0
        weights = (self.weights_task1, self.weights_task2) if self.weighted else (None, None)
        for task, task_weights in enumerate(weights):
            logits, target = s_out[TASK_LOGITS[task]].float(), labels[:, task]
            labelled = target != UNLABELLED
            if not bool(labelled.any()):
                total = total + logits.sum() * 0.0  # no label in this batch: nothing to learn from them
            elif task_weights is None:
                total = total + F.cross_entropy(logits, target, ignore_index=UNLABELLED,
                                                label_smoothing=self.label_smoothing)
            else:
                per_sample = F.cross_entropy(logits, target, reduction="none", ignore_index=UNLABELLED,
                                             label_smoothing=self.label_smoothing)
                weighted = task_weights[target.clamp(min=0)] * per_sample
                total = total + (weighted.mean() if bool(labelled.all()) else weighted.sum() / labelled.sum())
        return total


def balanced_class_weights(train_labels: torch.Tensor, num_classes: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Per task, scikit-learn's "balanced" class weights n / (K · n_class) from the training labels."""
    for task, k in enumerate(num_classes):
        missing = sorted(set(range(k)) - set(train_labels[:, task].tolist()))
        if missing:
            raise ValueError(f"class_weights: balanced: task {task + 1} has no training sample of class(es) {missing} "
                             f"(of {k}); its weight n / (K · n_class) is undefined: use class_weights: none")
    return tuple(
        torch.as_tensor(compute_class_weight("balanced", classes=np.arange(k), y=train_labels[:, task].numpy()),
                        dtype=torch.float32)
        for task, k in enumerate(num_classes))


class SoftTargetKL(nn.Module):
    """Σ_tasks kd_kl_loss(student logits, teacher logits, T) (Hinton et al., 2015)."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg: SoftTargetTerm, ctx: "LossContext") -> "SoftTargetKL":
        return cls(cfg.temperature)

    def forward(self, s_out: Outputs, t_out: Outputs, labels=None, index=None) -> torch.Tensor:
        return sum(kd_kl_loss(s_out[k], t_out[k], self.temperature) for k in TASK_LOGITS)


class FeatureMSELoss(nn.Module):
    """MSE(s.img_proj, P_img(t.img_raw)) + MSE(s.txt_proj, P_txt(t.txt_raw)).

    P maps the teacher's backbone width to the student's projection width.
    `projection="fixed"` (default): P is a seeded orthogonal map that is never trained, so
    the target cannot collapse. `projection="learned"`: P is an nn.Linear trained jointly
    with the student; note the MSE term alone is then minimised by shrinking both sides to
    zero, so it relies on CE/KL to keep the student's features informative.
    """

    def __init__(
        self,
        teacher_img_dim: int,
        teacher_txt_dim: int,
        student_dim: int,
        projection: Literal["fixed", "learned"],
        seed: int = 0,
    ):
        super().__init__()
        if projection not in ("fixed", "learned"):
            raise ValueError(f"projection must be 'fixed' or 'learned', got {projection!r}")
        self.projection = projection
        generator = torch.Generator().manual_seed(seed)
        self.proj_img = _projection(teacher_img_dim, student_dim, projection, generator)
        self.proj_txt = _projection(teacher_txt_dim, student_dim, projection, generator)

    @classmethod
    def from_config(cls, cfg: FeatureMSETerm, ctx: "LossContext") -> "FeatureMSELoss":
        dims = ctx.teacher("mse")
        return cls(dims["img_dim"], dims["txt_dim"], ctx.student_fusion_dim, cfg.projection, ctx.seed)

    def forward(self, s_out: Outputs, t_out: Outputs, labels=None, index=None) -> torch.Tensor:
        """A single-modality student (`modalities: [image]`) aligns the one modality it has."""
        pairs = [(proj, s_key, t_key) for proj, s_key, t_key in
                 ((self.proj_img, "img_proj", "img_raw"), (self.proj_txt, "txt_proj", "txt_raw")) if s_key in s_out]
        return sum(F.mse_loss(s_out[s_key].float(), proj(t_out[t_key].detach().float()))
                   for proj, s_key, t_key in pairs)


class FixedLinear(nn.Module):
    """y = x Wᵀ with W a buffer: saved with the loss, never handed to an optimizer."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


def _projection(in_dim: int, out_dim: int, kind: str, generator: torch.Generator) -> nn.Module:
    weight = torch.empty(out_dim, in_dim)
    # Orthogonal rows (or columns) keep the teacher's feature scale: a non-collapsing target.
    nn.init.orthogonal_(weight, generator=generator)
    if kind == "fixed":
        return FixedLinear(weight)
    layer = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return layer


class CRDLoss(nn.Module):
    """Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020).

    Student and teacher vectors go through embedding heads (Linear -> L2-normalise, feat_dim).
    Each side keeps a memory bank of all n_data training samples. For each anchor, the
    positive (its own index) and nce_k negatives (training samples whose joint label differs)
    are read from the *other* side's memory and scored h = exp(<anchor, m> / nce_t) / Z, with
    Z fixed on the first batch as mean(h) · n_data (as in the paper's reference code). The
    NCE loss of Eq. 18, with noise probability Pn = 1/n_data,

        L = -E[ log(h⁺ / (h⁺ + k·Pn)) + Σ_negatives log(k·Pn / (h⁻ + k·Pn)) ],

    is computed for the student anchors and for the teacher anchors and summed. In training
    mode the memories at the batch indices move to m·old + (1-m)·new and are re-normalised.

    `labels` (n_data,) gives each training sample's joint label (task-1 × task-2); negatives
    are sampled from other labels, without replacement where the pool is at least nce_k and
    with replacement where it is smaller. Without `labels` every other sample is a negative.
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        n_data: int,
        feat_dim: int,
        nce_k: int,
        nce_t: float,
        nce_m: float,
        labels: torch.Tensor | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if n_data < 2:
            raise ValueError(f"CRD needs at least 2 training samples, got n_data={n_data}")
        self.n_data, self.nce_k, self.nce_t, self.nce_m = n_data, nce_k, nce_t, nce_m
        self.embed_s = nn.Sequential(nn.Linear(s_dim, feat_dim))
        self.embed_t = nn.Sequential(nn.Linear(t_dim, feat_dim))
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("memory_s", _random_unit_rows(n_data, feat_dim, generator))
        self.register_buffer("memory_t", _random_unit_rows(n_data, feat_dim, generator))
        # Normalising constants Z_s, Z_t; negative means "not fixed yet".
        self.register_buffer("z_norm", torch.full((2,), -1.0))
        if labels is None:
            labels = torch.arange(n_data)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (n_data,):
            raise ValueError(f"labels must have shape ({n_data},), got {tuple(labels.shape)}")
        self.register_buffer("labels", labels)
        self.sampler_generator = torch.Generator().manual_seed(seed + 1)

    @classmethod
    def from_config(cls, cfg: CRDTerm, ctx: "LossContext") -> "CRDLoss":
        return cls(ctx.student_fusion_dim, ctx.teacher("crd")["fusion_dim"], ctx.n_data, cfg.feat_dim, cfg.nce_k,
                   cfg.nce_t, cfg.nce_m, labels=ctx.joint_labels, seed=ctx.seed)

    def get_extra_state(self) -> dict:
        # The negatives' sampler is part of the training state: a resumed run draws the same negatives.
        return {"sampler_generator": self.sampler_generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.sampler_generator.set_state(state["sampler_generator"])

    @staticmethod
    def embed(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(head(features.float()), dim=1)

    def sample_contrast_index(self, index: torch.Tensor) -> torch.Tensor:
        """(B, nce_k + 1) indices: column 0 the positive, then negatives of other labels."""
        index = index.cpu()
        labels = self.labels.cpu()
        anchor_labels = labels[index]
        is_other = labels.unsqueeze(0) != anchor_labels.unsqueeze(1)  # (B, n_data)
        pool_size = is_other.sum(dim=1)
        if bool((pool_size == 0).any()):
            raise ValueError("CRD: an anchor's joint label covers every training sample; no negatives")
        k = self.nce_k
        negatives = torch.empty(len(index), k, dtype=torch.long)
        keys = torch.rand(is_other.shape, generator=self.sampler_generator)
        keys[~is_other] = 2.0  # larger than any key: same-label samples are never picked
        big = pool_size >= k
        if bool(big.any()):  # without replacement: the k smallest random keys among others
            negatives[big] = keys[big].topk(k, dim=1, largest=False).indices
        if bool((~big).any()):  # with replacement: uniform ranks inside each row's pool
            ordered = keys[~big].argsort(dim=1)
            ranks = torch.rand(int((~big).sum()), k, generator=self.sampler_generator)
            ranks = (ranks * pool_size[~big].unsqueeze(1)).long()
            negatives[~big] = ordered.gather(1, ranks)
        return torch.cat((index.unsqueeze(1), negatives), dim=1)

    def forward(
        self,
        s_out: Outputs,
        t_out: Outputs,
        labels: torch.Tensor | None,
        index: torch.Tensor | None,
        contrast_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """CRD of the fused vectors (`s_out["fused"]`, `t_out["fused"]`) of the training samples `index`."""
        if index is None:
            raise ValueError("CRD needs the batch's sample `index` (rows of the memory banks)")
        f_s, f_t = s_out["fused"], t_out["fused"]
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            v_s = self.embed(self.embed_s, f_s)
            v_t = self.embed(self.embed_t, f_t.detach())
            # Data-parallel: the global batch's indices, so that every rank draws the negatives and
            # moves the memories exactly as one process would (identical banks on every rank).
            global_index, offset = gather_rows(index.to(v_s.device))
            if contrast_index is None:
                contrast_index = self.sample_contrast_index(global_index)[offset: offset + len(index)]
            contrast_index = contrast_index.to(v_s.device)
            # Student anchors against teacher memory, teacher anchors against student memory.
            scores_s = self._scores(self.memory_t, contrast_index, v_s)
            scores_t = self._scores(self.memory_s, contrast_index, v_t)
            if self.z_norm[0] < 0:
                with torch.no_grad():
                    self.z_norm.copy_(self._global_mean(scores_s, scores_t) * self.n_data)
            loss = self._nce(scores_s / self.z_norm[0]) + self._nce(scores_t / self.z_norm[1])
            if self.training:
                self._update_memory(self.memory_s, global_index, gather_rows(v_s.detach())[0])
                self._update_memory(self.memory_t, global_index, gather_rows(v_t.detach())[0])
        return loss

    @staticmethod
    def _global_mean(scores_s: torch.Tensor, scores_t: torch.Tensor) -> torch.Tensor:
        """(mean of scores_s, mean of scores_t) over the global batch."""
        if world_size() == 1:
            return torch.stack((scores_s.mean(), scores_t.mean()))
        sums = torch.stack((scores_s.sum(), scores_t.sum(), torch.tensor(float(scores_s.numel()),
                                                                          device=scores_s.device)))
        sums = all_reduce_sum(sums.double())
        return (sums[:2] / sums[2]).to(scores_s.dtype)

    def _scores(self, memory: torch.Tensor, contrast_index: torch.Tensor, anchor: torch.Tensor):
        rows = memory[contrast_index].detach()  # (B, K+1, D)
        return torch.exp(torch.einsum("bkd,bd->bk", rows, anchor) / self.nce_t)

    def _nce(self, h: torch.Tensor) -> torch.Tensor:
        """Eq. 18 with noise probability 1/n_data, averaged over the batch."""
        k = h.shape[1] - 1
        noise = k / self.n_data
        eps = 1e-7
        log_pos = torch.log(h[:, 0] / (h[:, 0] + noise + eps))
        log_neg = torch.log(noise / (h[:, 1:] + noise + eps))
        return -(log_pos.sum() + log_neg.sum()) / h.shape[0]

    @torch.no_grad()
    def _update_memory(self, memory: torch.Tensor, index: torch.Tensor, new: torch.Tensor):
        index = index.to(memory.device)
        moved = memory[index] * self.nce_m + new.detach() * (1 - self.nce_m)
        memory.index_copy_(0, index, F.normalize(moved, dim=1))


def _random_unit_rows(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    # Reference init (uniform in ±1/sqrt(dim/3)), then normalised: rows live on the sphere.
    bound = 1.0 / math.sqrt(dim / 3)
    rows = torch.rand(n, dim, generator=generator) * 2 * bound - bound
    return F.normalize(rows, dim=1)


@dataclass(frozen=True)
class LossContext:
    """What the terms need to know about the models and the data to be built."""

    student_fusion_dim: int
    teacher_dims: Mapping[str, int] | None  # {'img_dim', 'txt_dim', 'fusion_dim'}; None without a teacher
    n_data: int  # training samples (CRD memory rows)
    joint_labels: torch.Tensor | None = None  # task-1 × task-2 label per training sample (CRD negatives)
    seed: int = 0
    train_labels: torch.Tensor | None = None  # (n_data, 2) label ids (balanced CE weights)
    num_classes: tuple[int, int] | None = None

    def teacher(self, term: str) -> Mapping[str, int]:
        """The teacher's widths, which a term that reads the teacher needs."""
        if self.teacher_dims is None:
            raise ValueError(f"loss term {term!r} distils from a teacher, but no teacher dims were given")
        return self.teacher_dims


def term_module(name: str) -> type[nn.Module]:
    """The module class loss term `name`'s registry entry names (`medkd.config.loss_terms`)."""
    module, _, cls = LOSS_TERMS[name].module.rpartition(".")
    return getattr(importlib.import_module(module), cls)


class CombinedLoss(nn.Module):
    """total = Σ weight[name] · term(s_out, t_out, labels, index); returns every part for logging.

    Build with `CombinedLoss.from_config(cfg, ctx)`. All trainable parts (CRD heads, a learned P)
    are in `self.parameters()`: hand them to the optimizer together with the student's.
    """

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = {name: weights[name] for name in terms}

    @classmethod
    def from_config(cls, cfg: LossConfig, ctx: LossContext) -> "CombinedLoss":
        terms = {name: term_module(name).from_config(cfg.term(name), ctx) for name in cfg.active_terms}
        return cls(terms, cfg.weights)

    def forward(
        self,
        s_out: Outputs,
        t_out: Outputs | None,
        labels: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        parts = {name: term(s_out, t_out, labels, index) for name, term in self.terms.items()}
        parts["total"] = sum(self.weights[name] * parts[name] for name in self.terms)
        return parts
