"""params.yaml: one schema for the whole file.

The schema is the skeleton below (which sections and keys exist) plus the configs its sections
become (`medkd.config.sections`: `DataConfig`, `ModelConfig`, `LossConfig`, `TrainConfig`, each
merged from its layers and validated by pydantic), plus the cross-references (a student's data set,
the Optuna student, search-space paths, `base:` chains). `check_params` reports every problem at
once, each under its key path in params.yaml (`distill.tuned.model.fusion_layer`), with what was
expected and the nearest valid key for a typo. The `check` stage of dvc.yaml runs it before any
other stage, so a bad value stops `dvc repro` before DVC deletes outputs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medkd.config.configs import data_config
from medkd.config.problems import ParamsError, Problem, known_keys, problems_of
from medkd.config.sections import (
    SECTION_CONFIGS,
    student_configs,
    teacher_configs,
    teacher_loss_config,
    teacher_plan,
    variant_chain,
)
from medkd.config.stage_settings import ExportSection, OptunaSection, SearchLeaf, flatten_search_space
from medkd.config.study import (
    REQUIRED_VARIANTS,
    SHARED_DISTILL_KEYS,
    VARIANT_KEYS,
    primary_student,
    student_runs,
    variants,
)
from medkd.util.registry import did_you_mean

# --------------------------------------------------------------------------- the skeleton


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


Sub = dict[str, Any]  # a section whose keys a config class checks


class TeacherSection(_Section):
    model: Sub
    image_size: Any = None  # its own resolution (teacher_plan checks it)
    seeds: Any = None  # one: a single teacher; several: their ensemble (teacher_plan checks them)
    export: bool = True  # false: its export stage records that it is not exported (a control's teacher)
    loss: Sub = {}  # the teacher's own loss: CE (class_weights), no distillation terms
    train: Sub = {}


class StudentSection(_Section):
    dataset: str
    vision: str
    text: str | None = None  # none: a student that reads no caption (no text encoder, no tokenizer)
    vision_weights: str | None = None
    text_weights: str | None = None
    variants: Annotated[list[str], Field(min_length=1)] | None = None  # the variants it trains (default: all)
    seeds: Literal["default", "primary"] = "default"  # primary: seeds.primary for every run (positive controls)
    export: bool = True  # false: its export stage records that it is not exported (a control, not a product)


class VariantSection(_Section):
    base: str | None = None  # another variant whose model/loss/train keys this one starts from (merged)
    students: Literal["all", "primary"] = "all"  # primary: only `optuna.student` (ablations)
    seeds: Literal["default", "primary"] = "default"  # primary: `seeds.primary` on `optuna.student`
    model: Sub = {}
    loss: Sub = {}
    train: Sub = {}


class DistillSection(BaseModel):
    """`distill:`: shared keys, the study's `tuned` and `baseline` variants, and any number of further
    variants (`no-kd: {base: tuned, loss: {kl: null, mse: null, crd: null}}`), each a VariantSection."""

    model_config = ConfigDict(extra="allow")
    pretrained: bool = True
    model: Sub = {}  # model keys every variant starts from (e.g. vision_train_blocks)
    train: Sub = {}
    tuned: VariantSection
    baseline: VariantSection


# The keys of `distill:` that are not variants (medkd.config.study enumerates the variants by them).
assert set(DistillSection.model_fields) == {*REQUIRED_VARIANTS, *SHARED_DISTILL_KEYS}


class SeedsSection(_Section):
    """`seeds:`: the seeds students are trained with (the teacher trains once, with `seed`)."""

    default: Annotated[list[int], Field(min_length=1)] | None = None  # None: [seed]
    primary: Annotated[list[int], Field(min_length=1)] | None = None  # None: `default`


class ParamsFile(_Section):
    preset: str = "default"  # which preset made these params (configs/*.yaml set theirs); `dvc exp show` lists it
    seed: int = 42
    seeds: SeedsSection = SeedsSection()
    export: ExportSection = ExportSection()
    runtime: Sub = {}
    data: Annotated[dict[str, Sub], Field(min_length=1)]
    teachers: dict[str, TeacherSection] = {}
    students: dict[str, StudentSection] = {}
    distill: DistillSection | None = None
    optuna: OptunaSection | None = None


# --------------------------------------------------------------------------- the whole file


def check_params(params: Any) -> list[Problem]:
    """Every problem of a params.yaml tree (empty: it fits the schema).

    The skeleton is checked first; the configs and cross-references are then checked on every part
    that can be read, so one run lists all problems.
    """
    if params is None:
        return [Problem("(top level)", "the file is empty; expected params.yaml's sections (data:, teachers:, ...)")]
    if not isinstance(params, Mapping):
        return [Problem("(top level)", f"expected a mapping of sections (data:, teachers:, ...), got "
                                       f"{type(params).__name__} {params!r:.40}")]
    try:
        ParamsFile.model_validate(params)
        problems: list[Problem] = []
    except ValidationError as err:
        problems = problems_of(err, ParamsFile)
    problems += _data_and_teacher_problems(params)
    distill = params.get("distill")
    if _mapping(params.get("students")) and distill is None:
        problems.append(Problem("distill", "required key is missing (students are listed)"))
    if isinstance(distill, Mapping):
        problems += _variant_problems(params, distill)
        problems += _student_problems(params)
        problems += _scarce_label_problems(params, problems)
        problems += _export_problems(params, distill)
        if isinstance(params.get("optuna"), Mapping):
            problems += _optuna_problems(params, params["optuna"])
    return list(dict.fromkeys(problems))


def validate_params(params: Any, source: str = "params.yaml") -> None:
    problems = check_params(params)
    if problems:
        raise ParamsError(problems, source)


def _mapping(value) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _collect(problems: list[Problem], build, *args, **kwargs) -> bool:
    """Run a config builder; its ParamsError's problems join `problems` (a part the skeleton already
    reported, which the builder cannot even read, is skipped)."""
    try:
        build(*args, **kwargs)
        return True
    except ParamsError as err:
        problems.extend(err.problems)
    except (KeyError, TypeError, AttributeError, ValueError):
        pass
    return False


def _data_and_teacher_problems(params: Mapping) -> list[Problem]:
    problems: list[Problem] = []
    data, teachers = _mapping(params.get("data")), _mapping(params.get("teachers"))
    for dataset in data:
        _collect(problems, data_config, params, dataset)
    for dataset in teachers:
        if dataset not in data:
            problems.append(Problem(f"teachers.{dataset}", f"no data set {dataset!r} under `data:`"
                                    f"{did_you_mean(dataset, data)}; data sets: {', '.join(data)}"))
        _collect(problems, teacher_configs, params, dataset)
        _collect(problems, teacher_loss_config, params, dataset)
        _collect(problems, teacher_plan, params, dataset)
    return problems


def _variant_problems(params: Mapping, distill: Mapping) -> list[Problem]:
    """The further variants' own keys (the skeleton lets them through) and their `base:` chains."""
    problems: list[Problem] = []
    names = variants({"distill": distill})
    shared = sorted(SHARED_DISTILL_KEYS)
    for name in names[len(REQUIRED_VARIANTS):]:
        if not isinstance(distill[name], Mapping):
            problems.append(Problem(f"distill.{name}", f"unknown key{did_you_mean(name, shared)}; expected one of: "
                                    f"{', '.join(shared)}, or a variant (a mapping of "
                                    f"{'/'.join(VARIANT_KEYS)}/model/loss/train)"))
            continue
        try:
            VariantSection.model_validate(distill[name])
        except ValidationError as err:
            problems += problems_of(err, VariantSection, f"distill.{name}")
            continue
        if distill[name].get("students") == "primary" and primary_student(params) is None:
            problems.append(Problem(f"distill.{name}.students", "`primary` names `optuna.student`, "
                                    "but there is no `optuna:` section"))
    for name in names:
        if isinstance(distill.get(name), Mapping):
            _collect(problems, variant_chain, distill, name)
    return problems


def _student_problems(params: Mapping) -> list[Problem]:
    problems: list[Problem] = []
    teachers, distill = _mapping(params.get("teachers")), _mapping(params.get("distill"))
    names = variants(params)
    for student, spec in _mapping(params.get("students")).items():
        for variant in _mapping(spec).get("variants") or []:
            if variant not in names:
                problems.append(Problem(f"students.{student}.variants", f"no variant {variant!r} under `distill:`"
                                        f"{did_you_mean(variant, names)}; variants: {', '.join(names)}"))
        dataset = _mapping(spec).get("dataset")
        if isinstance(dataset, str) and dataset not in teachers:
            problems.append(Problem(f"students.{student}.dataset", f"{dataset!r} has no teacher under "
                                    f"`teachers:`{did_you_mean(dataset, teachers)}; teachers: {', '.join(teachers)}"))
        try:  # the variants this student trains (a text-less student is not built with text-only's modalities)
            runs = list(dict.fromkeys(run.variant for run in student_runs(params, student)))
        except (KeyError, TypeError, AttributeError, ValueError):
            runs = variants(params)
        for variant in runs:
            if isinstance(distill.get(variant), Mapping):  # anything else is the skeleton's problem, said once
                _collect(problems, student_configs, params, student, variant)
    return problems


def _scarce_label_problems(params: Mapping, found: list[Problem]) -> list[Problem]:
    """A student of a data set with hidden labels (`label_fraction` < 1) may not use CRD: it draws its
    negatives by the label of every training image. (A variant with problems `found` already is skipped:
    one mistake, one message.)"""
    problems = []
    data = _mapping(params.get("data"))
    for student, spec in _mapping(params.get("students")).items():
        dataset = _mapping(spec).get("dataset")
        fraction = _mapping(data.get(dataset)).get("label_fraction", 1.0)
        if not isinstance(fraction, (int, float)) or fraction >= 1:
            continue
        for variant in dict.fromkeys(run.variant for run in student_runs(params, student)):
            try:
                loss = student_configs(params, student, variant)[1]
            except (ParamsError, KeyError, TypeError, ValueError):
                continue  # reported where it is built
            if "crd" in loss.active_terms and not any(p.path.startswith(f"distill.{variant}.") for p in found):
                problems.append(Problem(f"students.{student}.variants", f"variant {variant!r} has a crd term, which "
                                        "draws its negatives by the label of every training image, but "
                                        f"data.{dataset}.label_fraction is {fraction}: list variants without crd"))
    return problems


def _export_problems(params: Mapping, distill: Mapping) -> list[Problem]:
    problems = _unexported_teacher_problems(params)
    export = params.get("export")
    if problems:
        return problems
    if not isinstance(export, Mapping) or export.get("variant", "best") == "best":
        return []
    names = variants(params)
    if export["variant"] not in names:
        return [Problem("export.variant", f"no variant {export['variant']!r} under `distill:`"
                        f"{did_you_mean(str(export['variant']), ['best', *names])}; expected best (each student's "
                        f"best variant on dev) or a variant: {', '.join(names)}")]
    if _mapping(distill[export["variant"]]).get("students") == "primary":
        return [Problem("export.variant", f"{export['variant']!r} runs on the primary student only; "
                        "every student needs a run to export")]
    return []


def _optuna_problems(params: Mapping, section: Mapping) -> list[Problem]:
    students, teachers = _mapping(params.get("students")), _mapping(params.get("teachers"))
    student = section.get("student")
    if student not in students:
        names = list(students)
        return [Problem("optuna.student", f"no student {student!r} under `students:`"
                        f"{did_you_mean(str(student), names)}; students: {', '.join(names)}")]
    problems: list[Problem] = []
    dataset = _mapping(students[student]).get("dataset")
    if section.get("dataset") is not None and dataset in teachers and section["dataset"] != dataset:
        problems.append(Problem("optuna.dataset", f"must be {dataset!r}, the data set of student {student!r}"))
    problems += _trial_seed_problems(params, section)
    per_trial = {f"train.{key}": value for key, value in _mapping(section.get("train")).items()}
    trial_problems: list[Problem] = []
    base_ok = _collect(trial_problems, student_configs, params, student, "tuned", per_trial, source="optuna")
    problems += [p for p in trial_problems if p.path.startswith("optuna.")]
    space = section.get("search_space")
    if not isinstance(space, Mapping):
        return problems
    try:
        leaves = flatten_search_space(space)
    except ParamsError as err:
        return problems + err.problems
    for path, raw in leaves.items():
        problems += _search_leaf_problems(params, student, per_trial, path, raw, base_ok)
    return problems


def _trial_seed_problems(params: Mapping, section: Mapping) -> list[Problem]:
    """The search's trial seeds must differ from the retrain's (seeds.primary): a best picked on one draw
    and scored again on the same draw is biased upwards (the winner's curse)."""
    if not section.get("retrain_best", True):
        return []
    trial = section.get("trial_seeds") or [params.get("seed", 42)]
    seeds = _mapping(params.get("seeds"))
    primary = seeds.get("primary") or seeds.get("default") or [params.get("seed", 42)]
    shared = sorted(set(trial) & set(primary)) if isinstance(trial, list) and isinstance(primary, list) else []
    if shared:
        where = "optuna.trial_seeds" if section.get("trial_seeds") else "optuna"
        return [Problem(where, f"the trials train with seed(s) {shared}, which the retrain of the best uses too "
                               f"(seeds.primary {primary}): the winner's curse would go unmeasured; set "
                               "optuna.trial_seeds to seeds outside seeds.primary")]
    return []


def _search_leaf_problems(params: Mapping, student: str, per_trial: Mapping, path: str, raw: Any,
                          base_ok: bool) -> list[Problem]:
    where = f"optuna.search_space.{path}"
    unknown = setting_problem(path)
    if unknown:
        return [Problem(where, unknown)]
    try:
        leaf = SearchLeaf.model_validate(raw)
    except ValidationError as err:
        return problems_of(err, SearchLeaf, where)
    problems = []
    for value in leaf.values_to_try() if base_ok else []:  # each end of the range builds a valid config
        try:
            student_configs(params, student, "tuned", {**per_trial, path: value}, source="optuna")
        except ParamsError as err:  # whole-config problems (fusion_dim vs heads) depend on the combination
            problems += [Problem(where, f"value {value!r}: {p.message}") for p in err.problems
                         if p.path.startswith("optuna.") and p.path != f"optuna.{path.split('.')[0]}"]
    return problems


def _unexported_teacher_problems(params: Mapping) -> list[Problem]:
    """An exported student is timed against its teacher's export, which must then exist."""
    teachers = _mapping(params.get("teachers"))
    problems = []
    for student, spec in _mapping(params.get("students")).items():
        spec = _mapping(spec)
        dataset = spec.get("dataset")
        if spec.get("export", True) and dataset in teachers and _mapping(teachers[dataset]).get("export", True) is False:
            problems.append(Problem(f"students.{student}.export", f"the student is exported, but its teacher is not "
                                    f"(teachers.{dataset}.export: false), and a student's speed-up is measured against "
                                    "its teacher's export: export both or set export: false here too"))
    return problems


def setting_problem(path: str) -> str | None:
    """Why a search-space key path (`loss.kl.weight`) names no setting of a variant, or None."""
    head, *rest = path.split(".")
    if head not in SECTION_CONFIGS or not rest:
        return f"must sit under one of {list(SECTION_CONFIGS)}"
    cls = SECTION_CONFIGS[head]
    for depth, key in enumerate(rest):
        known = known_keys(cls, tuple(rest[:depth]))
        if key not in known:
            where = ".".join([head, *rest[:depth]])
            return f"{key!r} is not a setting of {where}{did_you_mean(key, known)}; expected one of: {', '.join(known)}"
    if known_keys(cls, tuple(rest)):
        return f"{path!r} is a section; a search-space leaf sets one value (e.g. {path}.{known_keys(cls, tuple(rest))[0]})"
    return None
