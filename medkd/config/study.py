"""The study's runs and their names: which variants each student is trained with, on which seeds, what
the search calls its retrained best and what the export stages call their models. Read from a
params.yaml tree that `medkd.config.schema` has checked; this module checks nothing."""

from __future__ import annotations

from typing import Mapping, NamedTuple

REQUIRED_VARIANTS = ("tuned", "baseline")  # the study's two; any further `distill.<name>` entry is a variant too
SHARED_DISTILL_KEYS = ("pretrained", "model", "train")  # keys of `distill:` that every variant shares


def variants(params: Mapping) -> list[str]:
    """Every variant each student is trained with: `tuned`, `baseline`, then the further entries of
    `distill:` in their order."""
    distill = params.get("distill") or {}
    return [*REQUIRED_VARIANTS, *(k for k in distill if k not in SHARED_DISTILL_KEYS and k not in REQUIRED_VARIANTS)]


VARIANT_KEYS = ("base", "students", "seeds")  # a variant's own keys besides its model/loss/train sections
OPTUNA_BEST = "optuna-best"  # the variant name of the search's best trial, retrained (stage search)


class Run(NamedTuple):
    """One student training run: a variant's hyperparameters with one seed."""

    variant: str
    seed: int

    @property
    def name(self) -> str:  # its folder: reports/students/<student>/<variant>/seed-<seed>
        return f"{self.variant}/seed-{self.seed}"

    @property
    def slug(self) -> str:  # one file name: resume state, DVC plot
        return f"{self.variant}-seed{self.seed}"


def variant_bases(params: Mapping) -> dict[str, str | None]:
    """{variant: the variant it starts from (`base:`), or None}: what an ablation is compared with."""
    return {name: (params["distill"][name] or {}).get("base") for name in variants(params)}


TEACHER_PREFIX = "teacher-"  # export stage models: "teacher-<dataset>" or a student's name


def exported_models(params: Mapping) -> list[str]:
    """The models the export stages of `params` export (`export-teacher@<dataset>`, `export@<student>`):
    each teacher as "teacher-<dataset>", then each student; not those marked `export: false` (their stage
    records only that they are not exported)."""
    return [f"{TEACHER_PREFIX}{dataset}" for dataset, section in (params.get("teachers") or {}).items()
            if section.get("export", True)] + [
        name for name, spec in (params.get("students") or {}).items() if spec.get("export", True)]


def primary_student(params: Mapping) -> str | None:
    """The study's primary student: the one Optuna tunes (its comparisons run over several seeds)."""
    optuna = params.get("optuna")
    return optuna.get("student") if isinstance(optuna, Mapping) else None


def seed_lists(params: Mapping) -> tuple[list[int], list[int]]:
    """(default seeds, primary seeds) from `seeds:`, defaulting to [seed]."""
    seeds = params.get("seeds") or {}
    default = seeds.get("default") or [params.get("seed", 42)]
    return list(default), list(seeds.get("primary") or default)


def student_runs(params: Mapping, student: str) -> list[Run]:
    """Every run of one student: each variant it takes with its seeds.

    A variant reaches every student (`students: all`) or the primary one only (`primary`: the ablations),
    unless the student lists its own (`students.<s>.variants`: exactly those). Seeds: `seeds.primary` on
    the primary student for variants marked `seeds: primary`, and on every variant of a student marked
    `seeds: primary` (the positive controls); `seeds.default` otherwise."""
    default, primary = seed_lists(params)
    spec = (params.get("students") or {}).get(student) or {}
    is_primary = student == primary_student(params)
    chosen = spec.get("variants")
    runs = []
    for variant in variants(params):
        section = params["distill"][variant] or {}
        if chosen is not None and variant not in chosen:
            continue
        if chosen is None and section.get("students", "all") == "primary" and not is_primary:
            continue
        on_primary = is_primary and section.get("seeds", "default") == "primary"
        seeds = primary if on_primary or spec.get("seeds") == "primary" else default
        runs.extend(Run(variant, seed) for seed in seeds)
    return runs


def backbones_of(spec: Mapping) -> str:
    """A model's backbones as the tables name them: `vision + text`, or the vision one alone."""
    return f"{spec['vision']} + {spec['text']}" if spec.get("text") else f"{spec['vision']} (no text)"
