"""Distillation losses: each term is a small module, `CombinedLoss` only weights and sums them.

total = w_ce·CE + alpha·KL + beta·MSE + gamma·CRD   (study: 1·CE + 0.518·KL + 112.4·MSE + 10·CRD)
"""

from __future__ import annotations

import math
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

Outputs = Mapping[str, torch.Tensor]
TASK_LOGITS = ("logits_modality", "logits_location")


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


def two_task_ce(outputs: Outputs, y_mod: torch.Tensor, y_loc: torch.Tensor) -> torch.Tensor:
    """Sum of the two tasks' cross-entropies against the ground-truth labels."""
    return F.cross_entropy(outputs["logits_modality"].float(), y_mod) + F.cross_entropy(
        outputs["logits_location"].float(), y_loc
    )


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
        projection: Literal["fixed", "learned"] = "fixed",
        seed: int = 0,
    ):
        super().__init__()
        if projection not in ("fixed", "learned"):
            raise ValueError(f"projection must be 'fixed' or 'learned', got {projection!r}")
        self.projection = projection
        generator = torch.Generator().manual_seed(seed)
        self.proj_img = _projection(teacher_img_dim, student_dim, projection, generator)
        self.proj_txt = _projection(teacher_txt_dim, student_dim, projection, generator)

    def forward(self, s_out: Outputs, t_out: Outputs) -> torch.Tensor:
        target_img = self.proj_img(t_out["img_raw"].detach().float())
        target_txt = self.proj_txt(t_out["txt_raw"].detach().float())
        return F.mse_loss(s_out["img_proj"].float(), target_img) + F.mse_loss(
            s_out["txt_proj"].float(), target_txt
        )


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
        feat_dim: int = 128,
        nce_k: int = 1024,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
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
        f_s: torch.Tensor,
        f_t: torch.Tensor,
        index: torch.Tensor,
        contrast_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            v_s = self.embed(self.embed_s, f_s)
            v_t = self.embed(self.embed_t, f_t.detach())
            if contrast_index is None:
                contrast_index = self.sample_contrast_index(index)
            contrast_index = contrast_index.to(v_s.device)
            # Student anchors against teacher memory, teacher anchors against student memory.
            scores_s = self._scores(self.memory_t, contrast_index, v_s)
            scores_t = self._scores(self.memory_s, contrast_index, v_t)
            if self.z_norm[0] < 0:
                with torch.no_grad():
                    self.z_norm.copy_(torch.stack((scores_s.mean(), scores_t.mean())) * self.n_data)
            loss = self._nce(scores_s / self.z_norm[0]) + self._nce(scores_t / self.z_norm[1])
            if self.training:
                self._update_memory(self.memory_s, index, v_s)
                self._update_memory(self.memory_t, index, v_t)
        return loss

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


class CombinedLoss(nn.Module):
    """total = w_ce·CE + alpha·KL + beta·MSE + gamma·CRD; returns every part for logging.

    Build with `CombinedLoss.for_models(student, teacher, ...)` so the projection and CRD
    widths come from the models. All trainable parts (CRD heads, a learned P) are in
    `self.parameters()`: hand them to the optimizer together with the student's.
    """

    def __init__(
        self,
        student_fusion_dim: int,
        teacher_img_dim: int,
        teacher_txt_dim: int,
        teacher_fusion_dim: int,
        n_data: int,
        joint_labels: torch.Tensor | None = None,
        w_ce: float = 1.0,
        alpha: float = 0.518,
        beta: float = 112.4,
        gamma: float = 10.0,
        temperature: float = 3.19,
        projection: Literal["fixed", "learned"] = "fixed",
        feat_dim: int = 128,
        nce_k: int = 1024,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        seed: int = 0,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.weights = {"ce": w_ce, "kl": alpha, "mse": beta, "crd": gamma}
        self.temperature = temperature
        self.feature_mse = FeatureMSELoss(
            teacher_img_dim, teacher_txt_dim, student_fusion_dim, projection, seed
        )
        self.crd = (
            CRDLoss(
                student_fusion_dim, teacher_fusion_dim, n_data, feat_dim, nce_k, nce_t, nce_m,
                labels=joint_labels, seed=seed,
            )
            if gamma
            else None
        )

    @classmethod
    def for_models(cls, student: nn.Module, teacher_dims: Mapping[str, int], **kwargs) -> "CombinedLoss":
        """`teacher_dims`: {'img_dim', 'txt_dim', 'fusion_dim'} (a cache or a teacher supplies them)."""
        return cls(
            student.fusion_dim,
            teacher_dims["img_dim"],
            teacher_dims["txt_dim"],
            teacher_dims["fusion_dim"],
            **kwargs,
        )

    def forward(
        self,
        s_out: Outputs,
        t_out: Outputs,
        y_mod: torch.Tensor,
        y_loc: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        parts = {
            "ce": two_task_ce(s_out, y_mod, y_loc),
            "kl": sum(kd_kl_loss(s_out[k], t_out[k], self.temperature) for k in TASK_LOGITS),
            "mse": self.feature_mse(s_out, t_out),
        }
        if self.crd is not None:
            if index is None:
                raise ValueError("CombinedLoss with gamma > 0 needs the batch's sample `index` for CRD")
            parts["crd"] = self.crd(s_out["fused"], t_out["fused"], index)
        else:
            parts["crd"] = parts["ce"].new_zeros(())
        parts["total"] = sum(self.weights[name] * parts[name] for name in self.weights)
        return parts
