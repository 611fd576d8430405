"""The loss terms, one registry entry each: its name, its params.yaml keys (with the weight), whether it
reads the teacher, and the `nn.Module` that computes it.

A student's loss is `Σ_term weight · term` over the terms its `loss:` section lists:

    loss:
      ce:  {weight: 1.0, class_weights: balanced}   # cross-entropy with the labels
      kl:  {weight: 0.518, temperature: 3.19}       # Hinton et al.'s soft targets
      mse: {weight: 112.4, projection: fixed}       # feature alignment
      crd: {weight: 10.0, nce_k: 1024}              # contrastive representation distillation

A term that is absent (or `null`, which removes it in a merge: `no-kd: {base: tuned, loss: {kl: null}}`)
or weighted 0 is neither built nor computed. Adding a term = one class here, decorated with
`@loss_term(name, reads_teacher=..., module=...)`, whose fields are its params.yaml keys, plus the module
it names (in `medkd.engine.losses`: an `nn.Module` with `from_config(term_config, LossContext)`). The
module is named, not imported, so that checking params.yaml needs no torch; the registry's order is
the order in which terms are built and summed, so YAML key order never changes a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from medkd.util.registry import Registry


class TermConfig(BaseModel):
    """A term's section of `loss:`: its weight and its own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    weight: Annotated[float, Field(ge=0.0)]


@dataclass(frozen=True)
class LossTerm:
    name: str
    config: type[TermConfig]
    reads_teacher: bool  # whether a run with this term needs the teacher's outputs
    module: str  # "package.module.Class": the nn.Module computing it, built by `Class.from_config(cfg, ctx)`


LOSS_TERMS: Registry[LossTerm] = Registry("loss term")


def loss_term(name: str, *, reads_teacher: bool, module: str) -> Callable[[type[TermConfig]], type[TermConfig]]:
    """Register the decorated TermConfig subclass as loss term `name`."""

    def register(config: type[TermConfig]) -> type[TermConfig]:
        LOSS_TERMS.register(LossTerm(name, config, reads_teacher, module))
        return config

    return register


@loss_term("ce", reads_teacher=False, module="medkd.engine.losses.TaskCrossEntropy")
class CrossEntropyTerm(TermConfig):
    """Σ_tasks CE(student logits, labels); `balanced`: each class weighted n / (K · n_class); `label_smoothing`
    ε: the target puts 1 − ε on the true class and ε evenly on all (a teacher that does not memorise)."""

    class_weights: Literal["none", "balanced"] = "none"
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


@loss_term("kl", reads_teacher=True, module="medkd.engine.losses.SoftTargetKL")
class SoftTargetTerm(TermConfig):
    """Σ_tasks KL(softmax(t/T) ‖ softmax(s/T)) · T² (Hinton et al., 2015)."""

    temperature: Annotated[float, Field(gt=0.0)] = 3.19


@loss_term("mse", reads_teacher=True, module="medkd.engine.losses.FeatureMSELoss")
class FeatureMSETerm(TermConfig):
    """MSE(s.img_proj, P(t.img_raw)) + MSE(s.txt_proj, P(t.txt_raw)); P fixed orthogonal or learned."""

    projection: Literal["fixed", "learned"] = "fixed"


@loss_term("crd", reads_teacher=True, module="medkd.engine.losses.CRDLoss")
class CRDTerm(TermConfig):
    """Contrastive representation distillation of the fused vectors (Tian et al., ICLR 2020)."""

    feat_dim: Annotated[int, Field(ge=1)] = 128  # embedding width
    nce_k: Annotated[int, Field(ge=1)] = 1024  # negatives per anchor
    nce_t: Annotated[float, Field(gt=0.0)] = 0.07  # temperature
    nce_m: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5  # memory momentum


# Keys of the loss section before each term had its own: where they live now.
RENAMED_LOSS_KEYS = {
    "weights": "no longer a key: each term has its own section with its weight (loss.kl.weight; docs/experiments.md)",
    "temperature": "no longer a key here: loss.kl.temperature", "projection": "no longer a key here: loss.mse.projection",
    "class_weights": "no longer a key here: loss.ce.class_weights",
    **{key: f"no longer a key here: loss.crd.{key}" for key in ("feat_dim", "nce_k", "nce_t", "nce_m")},
}


class _Loss(BaseModel):
    """A `loss:` section: one optional field per registered term (see the module's docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _something_to_minimise(self):
        if not self.active_terms:
            raise ValueError(f"a loss needs at least one term with a weight above 0; terms: {', '.join(LOSS_TERMS)}")
        return self

    @classmethod
    def from_dict(cls, cfg: Mapping | None):
        return cls(**dict(cfg or {}))

    def to_dict(self) -> dict:
        return self.model_dump(exclude_none=True)

    def term(self, name: str) -> TermConfig | None:
        return getattr(self, name)

    @property
    def active_terms(self) -> list[str]:
        """Terms with a weight above 0, in registry order (the order they are built and summed)."""
        return [name for name in LOSS_TERMS if (term := self.term(name)) is not None and term.weight > 0]

    @property
    def weights(self) -> dict[str, float]:
        return {name: self.term(name).weight for name in self.active_terms}

    @property
    def uses_teacher(self) -> bool:
        """Whether a run with this loss reads the teacher at all (the one place this is decided)."""
        return any(LOSS_TERMS[name].reads_teacher for name in self.active_terms)


LossConfig = create_model("LossConfig", __base__=_Loss,
                          **{name: (term.config | None, None) for name, term in LOSS_TERMS.items()})
LossConfig.__doc__ = _Loss.__doc__
LossConfig.renamed_keys = RENAMED_LOSS_KEYS  # what `medkd.config.merge.build` tells a user of an old key
