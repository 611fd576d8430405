"""The training sections of params.yaml as the configs a run trains with (a teacher's, a student's under
one variant), each merged from its layers by the one rule (`medkd.config.merge`) and then validated by
pydantic; a bad value is a `ParamsError` naming the key path of the layer that set it
(`distill.no-kd.loss.kl.weight`).

Each key keeps its params.yaml name all the way down: a distill variant's `model:`, `loss:` and
`train:` sections are those configs' fields; overrides (an Optuna trial's) are key paths inside a
variant (`loss.kl.weight`, `model.fusion_dim`, `train.lr`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from medkd.config.configs import ModelConfig, TrainConfig
from medkd.config.loss_terms import LossConfig
from medkd.config.merge import Layers, build, overlay_of
from medkd.config.problems import ParamsError, Problem
from medkd.config.study import SHARED_DISTILL_KEYS, variants
from medkd.util.registry import did_you_mean

# The hyperparameter sets each student is trained with (sections of a distill variant in params.yaml).
SECTION_CONFIGS = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig}


def train_config(params: Mapping, *layers: tuple[str, Mapping | None]) -> TrainConfig:
    """Seed and runtime from the top of params.yaml, then each (path, train section) in turn."""
    return build(TrainConfig, [("", {"seed": params.get("seed", 42)}), ("runtime", params.get("runtime")), *layers])


def teacher_configs(params: Mapping, dataset: str) -> tuple[ModelConfig, TrainConfig]:
    section = params["teachers"][dataset]
    model = build(ModelConfig, [(f"teachers.{dataset}.model", section.get("model"))])
    return model, train_config(params, (f"teachers.{dataset}.train", section.get("train")))


@dataclass(frozen=True)
class TeacherPlan:
    """How a teacher is trained beyond its model, loss and train sections."""

    image_size: int | None  # its own input resolution; None: its data set's (the students')
    seeds: tuple[int, ...]  # one: a single teacher; several: the ensemble of one teacher per seed


def teacher_plan(params: Mapping, dataset: str) -> TeacherPlan:
    """`teachers.<dataset>.image_size` and `.seeds` (default: the data set's size, the top-level `seed`)."""
    section, where = params["teachers"][dataset], f"teachers.{dataset}"
    size, seeds = section.get("image_size"), section.get("seeds", [params.get("seed", 42)])
    problems = []
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
        problems.append(Problem(f"{where}.image_size", f"expected an image size in pixels (an integer >= 8), got {size!r}"))
    if "seeds" in section and (not isinstance(seeds, list) or not seeds or len(set(map(repr, seeds))) < len(seeds)
                               or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        problems.append(Problem(f"{where}.seeds", "expected a list of distinct integer seeds (one: a single teacher; "
                                                  f"several: their ensemble), got {seeds!r}"))
    if problems:
        raise ParamsError(problems)
    return TeacherPlan(size, tuple(seeds))


def teacher_loss_config(params: Mapping, dataset: str) -> LossConfig:
    """`teachers.<dataset>.loss` over plain CE; a teacher learns from labels only."""
    where = f"teachers.{dataset}.loss"
    loss = build(LossConfig, [(where, {"ce": {"weight": 1.0}}), (where, params["teachers"][dataset].get("loss"))])
    if loss.uses_teacher:
        raise ParamsError([Problem(where, f"a teacher has no teacher to distil from: only ce, got {loss.active_terms}")])
    return loss


def variant_chain(distill: Mapping, variant: str) -> list[str]:
    """The variants whose sections `variant` is built from, its root `base:` first and itself last;
    an unknown base or a cycle is a ParamsError at the `base:` key that causes it."""
    chain: list[str] = []
    name: str | None = variant
    names = [k for k in distill if k not in SHARED_DISTILL_KEYS]
    while name is not None:
        if name in chain:
            cycle = " -> ".join([*chain[chain.index(name):], name])
            raise ParamsError([Problem(f"distill.{chain[-1]}.base", f"the base: chain is a cycle: {cycle}")])
        section = distill.get(name)
        if not isinstance(section, Mapping):
            where = f"distill.{chain[-1]}.base" if chain else f"distill.{name}"
            raise ParamsError([Problem(where, f"no variant {name!r}{did_you_mean(name, names)}; "
                                              f"variants: {', '.join(names)}")])
        chain.append(name)
        name = section.get("base")
    return chain[::-1]


def student_configs(params: Mapping, student: str, variant: str, overrides: Mapping[str, Any] | None = None,
                    source: str = "overrides", seed: int | None = None) -> tuple[ModelConfig, LossConfig, TrainConfig]:
    """(ModelConfig, LossConfig, TrainConfig) of one student trained with one variant's hyperparameters.

    Each section merges, lowest first: `distill.model` / `distill.train` (shared by every variant), each
    variant of the `base:` chain from its root, the variant, then `overrides` ({key path inside the
    variant: value}, e.g. {"loss.kl.weight": 0.3, "train.epochs": 2}; `source` names where they came
    from in error messages). `seed`: the run's training seed (one of `seeds:`); None: the top-level `seed`.
    """
    if student not in (params.get("students") or {}):
        raise ParamsError([Problem(f"students.{student}", "no such student under `students:`")])
    spec, distill = params["students"][student], params["distill"]
    bad = [path for path in overrides or {} if path.split(".")[0] not in SECTION_CONFIGS or "." not in path]
    if bad:
        raise ParamsError([Problem(f"{source}.{path}", f"must be a key path under one of {list(SECTION_CONFIGS)}")
                           for path in bad])
    if variant not in variants(params):
        raise ParamsError([Problem(f"distill.{variant}", "no such variant under `distill:`")])
    chain = variant_chain(distill, variant)
    overlay = overlay_of(overrides or {})

    def layers(name: str) -> Layers:
        own = [(f"distill.{v}.{name}", distill[v].get(name)) for v in chain]
        return [*own, (f"{source}.{name}", overlay.get(name))]

    student_keys = {k: spec[k] for k in ("vision", "text", "vision_weights", "text_weights") if spec.get(k) is not None}
    problems, built = [], {}
    for name, make in (
        ("model", lambda: build(ModelConfig, [(f"students.{student}", student_keys),
                                              ("distill", {"pretrained": distill.get("pretrained", True)}),
                                              ("distill.model", distill.get("model")),
                                              *layers("model")],
                                       home=f"students.{student}")),
        ("loss", lambda: build(LossConfig, layers("loss"), home=f"distill.{variant}.loss")),
        ("train", lambda: train_config(params, ("distill.train", distill.get("train")), *layers("train"),
                                       ("seeds", None if seed is None else {"seed": seed}))),
    ):
        try:
            built[name] = make()
        except ParamsError as err:
            problems += err.problems
    if problems:
        raise ParamsError(problems)
    return built["model"], built["loss"], built["train"]
