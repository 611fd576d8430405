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
    """The models the export stages of `params` write (`export-teacher@<dataset>`, `export@<student>`):
    each teacher as "teacher-<dataset>", then each student."""
    return [f"{TEACHER_PREFIX}{dataset}" for dataset in params.get("teachers", {})] + list(params.get("students", {}))


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
    """Every run of one student: each variant it takes (`students: all`, or `primary` for the
    primary student only) with its seeds (`seeds: primary` on the primary student: `seeds.primary`)."""
    default, primary = seed_lists(params)
    is_primary = student == primary_student(params)
    runs = []
    for variant in variants(params):
        section = params["distill"][variant] or {}
        if section.get("students", "all") == "primary" and not is_primary:
            continue
        seeds = primary if is_primary and section.get("seeds", "default") == "primary" else default
        runs.extend(Run(variant, seed) for seed in seeds)
    return runs
