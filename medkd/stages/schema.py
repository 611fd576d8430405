"""params.yaml: one schema for the whole file, and its sections → the engine's configs.

The schema is the skeleton below (which sections and keys exist) plus the engine's own config
classes (`DataConfig`, `ModelConfig`, `LossConfig`, `TrainConfig`: types, ranges, registry
names), built from the same merged sections the stages use, plus the cross-references
(a student's data set, the Optuna student, search-space paths). `check_params` reports every
problem at once, each under its key path in params.yaml (`distill.tuned.model.fusion_layer`),
with what was expected and the nearest valid key for a typo. The `check` stage of dvc.yaml
runs it before any other stage, so a bad value stops `dvc repro` before DVC deletes outputs.

Each key keeps its params.yaml name all the way down: a distill variant's `model:`, `loss:` and
`train:` sections are those configs' fields; overrides (Optuna's) are key paths inside a
variant (`loss.weights.kl`, `model.fusion_dim`, `train.lr`).
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medkd.config import LOSS_TERMS, DataConfig, LossConfig, ModelConfig, TrainConfig, did_you_mean
from medkd.params import with_values
from medkd.stages.runs import REQUIRED_VARIANTS, SHARED_DISTILL_KEYS, VARIANT_KEYS, primary_student, variants

# The hyperparameter sets each student is trained with (sections of `distill:` in params.yaml).
SECTION_CONFIGS = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig}
# Keys that params.yaml once had: what to write instead.
RENAMED_KEYS = {"bf16": "no longer a key: runtime.precision (fp32 | bf16 | auto) replaced runtime.bf16"}


class Problem(NamedTuple):
    path: str  # key path in params.yaml
    message: str


class ParamsError(ValueError):
    """params.yaml does not fit the schema; `problems` holds every problem found."""

    def __init__(self, problems: list[Problem], source: str = "params.yaml"):
        self.problems = list(dict.fromkeys(problems))
        self.source = source
        lines = [f"  {p.path}: {p.message}" for p in self.problems]
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"{source}: {count}\n" + "\n".join(lines))


# --------------------------------------------------------------------------- the skeleton


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


Sub = dict[str, Any]  # a section whose keys a config class checks


class TeacherSection(_Section):
    model: Sub
    loss: Sub = {}  # the teacher's own loss: CE (class_weights), no distillation terms
    train: Sub = {}


class StudentSection(_Section):
    dataset: str
    vision: str
    text: str
    vision_weights: str | None = None
    text_weights: str | None = None


class VariantSection(_Section):
    base: str | None = None  # another variant whose model/loss/train keys this one starts from
    students: Literal["all", "primary"] = "all"  # primary: only `optuna.student` (ablations)
    seeds: Literal["default", "primary"] = "default"  # primary: `seeds.primary` on `optuna.student`
    model: Sub = {}
    loss: Sub = {}
    train: Sub = {}


class DistillSection(BaseModel):
    """`distill:`: shared keys, the study's `tuned` and `baseline` variants, and any number of
    further variants (`no-kd: {base: tuned, loss: {weights: {ce: 1.0}}}`), each a VariantSection."""

    model_config = ConfigDict(extra="allow")
    pretrained: bool = True
    model: Sub = {}  # model keys every variant starts from (e.g. vision_train_blocks)
    train: Sub = {}
    tuned: VariantSection
    baseline: VariantSection


# The keys of `distill:` that are not variants (medkd.stages.runs enumerates the variants by them).
assert set(DistillSection.model_fields) == {*REQUIRED_VARIANTS, *SHARED_DISTILL_KEYS}


def _variant_problems(distill: Mapping) -> list[Problem]:
    """The further variants' own keys (the skeleton lets them through) and their `base:` references."""
    problems = []
    names = variants({"distill": distill})
    shared = sorted(SHARED_DISTILL_KEYS)
    for name in names[len(REQUIRED_VARIANTS):]:
        if not isinstance(distill[name], Mapping):
            problems.append(Problem(f"distill.{name}", f"unknown key{did_you_mean(name, shared)}; expected one of: "
                                    f"{', '.join(shared)}, or a variant (a mapping of "
                                    f"{'/'.join(VARIANT_KEYS)}/model/loss/train)"))
            continue
        try:
            section = VariantSection.model_validate(distill[name])
        except ValidationError as err:
            problems += _skeleton_problems(err, VariantSection, f"distill.{name}")
            continue
        if section.base is not None and section.base not in names:
            problems.append(Problem(f"distill.{name}.base", f"no variant {section.base!r}{did_you_mean(section.base, names)}"
                                    f"; variants: {', '.join(names)}"))
        elif section.base == name:
            problems.append(Problem(f"distill.{name}.base", "a variant cannot be its own base"))
    return problems


class SearchLeaf(_Section):
    """One search-space entry."""

    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: Annotated[list, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _bounds(self):
        if self.type == "categorical":
            if self.choices is None:
                raise ValueError("a categorical entry needs `choices`")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"needs low < high, got low={self.low}, high={self.high}")
        elif self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        elif self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"int bounds must be whole numbers, got {self.low}, {self.high}")
        return self

    def values_to_try(self) -> list:
        return list(self.choices) if self.type == "categorical" else [
            int(v) if self.type == "int" else v for v in (self.low, self.high)]


class OptunaSection(_Section):
    """`optuna:`; the single place of the search's defaults."""

    student: str
    dataset: str | None = None  # must be the student's data set (it names dvc.yaml deps)
    n_trials: Annotated[int, Field(ge=1)]
    storage: str | None = None  # None: a SQLite file under models/optuna/
    study_name: str | None = None  # None: medkd-<student>
    sampler_seed: int | None = None  # None: the top-level seed
    n_startup_trials: Annotated[int, Field(ge=0)] = 3
    pruner_startup_trials: Annotated[int, Field(ge=0)] = 2
    pruner_warmup_epochs: Annotated[int, Field(ge=0)] = 0
    retrain_best: bool = True
    workers: Annotated[int, Field(ge=1)] = 1  # worker processes the stage runs on this machine
    train: Sub = {}  # per-trial train keys
    search_space: Annotated[dict[str, Any], Field(min_length=1)]


class SeedsSection(_Section):
    """`seeds:`: the seeds students are trained with (the teacher trains once, with `seed`)."""

    default: Annotated[list[int], Field(min_length=1)] | None = None  # None: [seed]
    primary: Annotated[list[int], Field(min_length=1)] | None = None  # None: `default`


class ExportSection(_Section):
    """`export:`: which run of each student the export stages ship, and how they measure it."""

    variant: str = "best"  # best: each student's best variant by dev avg F1 (stages/export.pick_run); or a variant
    latency_runs: Annotated[int, Field(ge=1)] = 200  # batch-1 calls timed per setting, after the warm-up
    warmup: Annotated[int, Field(ge=0)] = 20
    threads: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [1, 2]  # ONNX Runtime intra-op
    throughput_batch: Annotated[int, Field(ge=2)] = 32
    int8: bool = True  # also a dynamically quantized int8 model: its size, latency and test F1
    # 7-bit weights: without VNNI, x86's int8 kernels (u8 x s8 pairs summed in int16) saturate at 8 bits and
    # cost a model up to 18 points; 7 bits cannot saturate, so the same file holds on any x86 CPU.
    int8_reduce_range: bool = True
    parity_tolerance: Annotated[float, Field(gt=0.0)] = 1e-4  # max |Δlogit| vs PyTorch eager fp32; above it: fail
    # The deployment goals the report checks (results.md, "Deployment"); reported, they stop nothing:
    speedup_goal: Annotated[float, Field(gt=1.0)] = 5.0  # each student's paired speed-up over its teacher
    int8_max_f1_drop: Annotated[float, Field(ge=0.0)] = 0.01  # avg F1 the int8 model may lose (fp32 - int8)

    @model_validator(mode="after")
    def _one_thread(self):
        if 1 not in self.threads:
            raise ValueError("threads must include 1 (the deployment table's single-thread latency)")
        return self


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


# --------------------------------------------------------------------------- messages


def _unwrap(node: Any) -> Any:
    """`X | None` and `Annotated[X, ...]` -> X."""
    while True:
        if typing.get_origin(node) in (typing.Union, types.UnionType):
            node = next(a for a in typing.get_args(node) if a is not type(None))
        elif typing.get_origin(node) is Annotated:
            node = typing.get_args(node)[0]
        else:
            return node


def _known_keys(model: type, loc: tuple) -> list[str]:
    """The keys allowed where `loc` points (for 'did you mean')."""
    node: Any = model
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            if field is None:
                return sorted(node.model_fields)
            node = field.annotation
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return []
    node = _unwrap(node)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _message(error: Mapping, known: list[str]) -> str:
    kind, key = error["type"], (error["loc"][-1] if error["loc"] else "")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        if key in RENAMED_KEYS:
            return RENAMED_KEYS[key]
        return f"unknown key{did_you_mean(key, known)}; expected one of: {', '.join(known)}"
    if kind in ("missing", "missing_argument"):
        return "required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error.get("input") is not None and not isinstance(error["input"], (dict, list)) and kind != "value_error":
        message += f" (got {error['input']!r})"
    return message


def _skeleton_problems(err: ValidationError, model: type, prefix: str = "") -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in (prefix, *loc) if p != "") or prefix or "(top level)"
        problems.append(Problem(path, _message(e, _known_keys(model, loc[:-1]))))
    return problems


# --------------------------------------------------------------------------- sections -> configs


def _build(cls, layers: list[tuple[str, Mapping | None]], home: str | None = None):
    """`cls` from the merged layers (later ones win); a ParamsError names each bad key by its path.

    A layer is (the key path of its section, its mapping); a missing key is reported at `home`
    (default: the last layer), a problem of the whole config at the last layer that set a key.
    """
    merged, origin = {}, {}
    for prefix, values in layers:
        for key, value in (values or {}).items():
            merged[key] = value
            origin[key] = f"{prefix}.{key}" if prefix else key
    known = [f.name for f in fields(cls)]
    try:
        return cls.from_dict(merged)
    except ValidationError as err:
        problems = []
        last_set = next((prefix for prefix, values in reversed(layers) if values), layers[-1][0])
        for e in err.errors():
            key = str(e["loc"][0]) if e["loc"] else None
            if key is None:
                path = last_set
            else:
                path = origin.get(key) or ".".join(p for p in (home or layers[-1][0], key) if p)
            problems.append(Problem(path, _message(e, known)))
        raise ParamsError(problems) from None


def _train_layers(params: Mapping, *sections: tuple[str, Mapping | None]) -> list:
    return [("", {"seed": params.get("seed", 42)}), ("runtime", params.get("runtime")), *sections]


def data_config(params: Mapping, dataset: str, root: Path | None = None) -> DataConfig:
    """`data.<dataset>` (its key is the registry name unless `name:` says otherwise), root made absolute."""
    if dataset not in (params.get("data") or {}):
        raise ParamsError([Problem(f"data.{dataset}", "no such data set under `data:`")])
    section = {"name": dataset, **params["data"][dataset]}
    if root is not None and isinstance(section.get("root"), str) and not os.path.isabs(section["root"]):
        section["root"] = str((Path(root) / section["root"]).resolve())
    return _build(DataConfig, [(f"data.{dataset}", section)])


def train_config(params: Mapping, *sections: tuple[str, Mapping | None]) -> TrainConfig:
    """Seed and runtime from the top of params.yaml, then each (path, train section) in turn."""
    return _build(TrainConfig, _train_layers(params, *sections))


def teacher_configs(params: Mapping, dataset: str) -> tuple[ModelConfig, TrainConfig]:
    section = params["teachers"][dataset]
    model = _build(ModelConfig, [(f"teachers.{dataset}.model", section.get("model"))])
    return model, train_config(params, (f"teachers.{dataset}.train", section.get("train")))


def teacher_loss_config(params: Mapping, dataset: str) -> LossConfig:
    """`teachers.<dataset>.loss` (default: plain CE); a teacher learns from labels only."""
    where = f"teachers.{dataset}.loss"
    loss = _build(LossConfig, [(where, {"weights": {"ce": 1.0}, **(params["teachers"][dataset].get("loss") or {})})])
    if loss.uses_teacher:
        raise ParamsError([Problem(f"{where}.weights", f"a teacher has no teacher to distil from: only ce, "
                                                       f"got {sorted(loss.active_terms)}")])
    return loss


def student_configs(params: Mapping, student: str, variant: str, overrides: Mapping[str, Any] | None = None,
                    source: str = "overrides", seed: int | None = None) -> tuple[ModelConfig, LossConfig, TrainConfig]:
    """(ModelConfig, LossConfig, TrainConfig) of one student trained with one variant's hyperparameters.

    `overrides`: {key path inside the variant: value}, e.g. {"loss.weights.kl": 0.3, "train.epochs": 2};
    `source` names where they came from in error messages. `seed`: the run's training seed (one of
    `seeds:`); None: the top-level `seed`.
    """
    if student not in (params.get("students") or {}):
        raise ParamsError([Problem(f"students.{student}", "no such student under `students:`")])
    spec = params["students"][student]
    distill = params["distill"]
    bad = [path for path in overrides or {} if path.split(".")[0] not in SECTION_CONFIGS]
    if bad:
        raise ParamsError([Problem(f"{source}.{path}", f"must start with one of {list(SECTION_CONFIGS)}") for path in bad])
    if variant not in variants(params):
        raise ParamsError([Problem(f"distill.{variant}", "no such variant under `distill:`")])
    base = distill[variant]
    parent = base.get("base")
    chain = ([(parent, distill.get(parent) or {})] if parent and parent != variant else []) + [(variant, base)]
    effective = {name: {k: v for _, section in chain for k, v in (section.get(name) or {}).items()}
                 for name in SECTION_CONFIGS}
    merged = with_values(effective, overrides or {})
    touched = {name: {p.split(".")[1] for p in overrides or {} if p.split(".")[0] == name} for name in SECTION_CONFIGS}

    def layers(name: str) -> list:
        own = [(f"distill.{v}.{name}", section.get(name) or {}) for v, section in chain]
        return [*own, (f"{source}.{name}", {k: merged[name][k] for k in touched[name]})]

    student_keys = {k: spec[k] for k in ("vision", "text", "vision_weights", "text_weights") if k in spec}
    problems, built = [], {}
    for name, build in (
        ("model", lambda: _build(ModelConfig, [(f"students.{student}", student_keys),
                                               ("distill", {"pretrained": distill.get("pretrained", True)}),
                                               ("distill.model", distill.get("model")),
                                               *layers("model")], home=f"students.{student}")),
        ("loss", lambda: _build(LossConfig, layers("loss"))),
        ("train", lambda: train_config(params, ("distill.train", distill.get("train")), *layers("train"),
                                       ("seeds", {} if seed is None else {"seed": seed}))),
    ):
        try:
            built[name] = build()
        except ParamsError as err:
            problems += err.problems
    if problems:
        raise ParamsError(problems)
    return built["model"], built["loss"], built["train"]


def export_section(params: Mapping) -> ExportSection:
    return ExportSection.model_validate(params.get("export") or {})


def optuna_section(params: Mapping) -> OptunaSection:
    return OptunaSection.model_validate(params["optuna"])


def flatten_search_space(tree: Mapping, prefix: str = "") -> dict[str, Mapping]:
    """{key path: leaf}, in the order the leaves appear; a leaf is a mapping with a `type`."""
    flat = {}
    for key, node in tree.items():
        path = f"{prefix}{key}"
        if not isinstance(node, Mapping):
            raise ParamsError([Problem(f"optuna.search_space.{path}",
                                       f"expected a mapping (a leaf {{type, low, high}} or a section), got {node!r}")])
        if "type" in node:
            flat[path] = node
        else:
            flat.update(flatten_search_space(node, f"{path}."))
    return flat


# --------------------------------------------------------------------------- the whole file


def check_params(params: Any) -> list[Problem]:
    """Every problem of a params.yaml tree (empty: it fits the schema).

    The skeleton is checked first; the configs and cross-references are then checked on every
    part that can be read, so one run lists all problems.
    """
    if not isinstance(params, Mapping):
        return [Problem("(top level)", f"expected a mapping of sections, got {type(params).__name__}")]
    try:
        ParamsFile.model_validate(params)
        problems: list[Problem] = []
    except ValidationError as err:
        problems = _skeleton_problems(err, ParamsFile)

    def collect(build, *args, **kwargs) -> bool:
        try:
            build(*args, **kwargs)
            return True
        except ParamsError as err:
            problems.extend(err.problems)
        except (KeyError, TypeError, AttributeError, ValueError):  # a part the skeleton already reported
            pass
        return False

    def mapping(value) -> Mapping:
        return value if isinstance(value, Mapping) else {}

    data, teachers = mapping(params.get("data")), mapping(params.get("teachers"))
    students, distill = mapping(params.get("students")), params.get("distill")
    for dataset in data:
        collect(data_config, params, dataset)
    for dataset in teachers:
        if dataset not in data:
            problems.append(Problem(f"teachers.{dataset}", f"no data set {dataset!r} under `data:`"
                                    f"{did_you_mean(dataset, data)}; data sets: {', '.join(data)}"))
        collect(teacher_configs, params, dataset)
        collect(teacher_loss_config, params, dataset)
    if students and distill is None:
        problems.append(Problem("distill", "required key is missing (students are listed)"))
    if isinstance(distill, Mapping):
        problems += _variant_problems(distill)
        for name in variants(params)[len(REQUIRED_VARIANTS):]:
            if mapping(distill[name]).get("students") == "primary" and primary_student(params) is None:
                problems.append(Problem(f"distill.{name}.students", "`primary` names `optuna.student`, "
                                        "but there is no `optuna:` section"))
    for student, spec in students.items():
        dataset = mapping(spec).get("dataset")
        if isinstance(dataset, str) and dataset not in teachers:
            problems.append(Problem(f"students.{student}.dataset", f"{dataset!r} has no teacher under "
                                    f"`teachers:`{did_you_mean(dataset, teachers)}; teachers: {', '.join(teachers)}"))
        if isinstance(distill, Mapping):
            for variant in variants(params):
                collect(student_configs, params, student, variant)
    export = params.get("export")
    if isinstance(export, Mapping) and isinstance(distill, Mapping) and export.get("variant", "best") != "best":
        if export["variant"] not in variants(params):
            problems.append(Problem("export.variant", f"no variant {export['variant']!r} under `distill:`"
                                    f"{did_you_mean(str(export['variant']), variants(params))}; "
                                    f"variants: {', '.join(variants(params))}"))
        elif (distill[export["variant"]] or {}).get("students") == "primary":
            problems.append(Problem("export.variant", f"{export['variant']!r} runs on the primary student only; "
                                    "every student needs a run to export"))
    if isinstance(params.get("optuna"), Mapping) and isinstance(distill, Mapping):
        problems += _optuna_problems(params, params["optuna"], students, teachers)
    return list(dict.fromkeys(problems))


def _optuna_problems(params: Mapping, section: Mapping, students: Mapping, teachers: Mapping) -> list[Problem]:
    student = section.get("student")
    if student not in students:
        names = list(students)
        return [Problem("optuna.student", f"no student {student!r} under `students:`"
                        f"{did_you_mean(str(student), names)}; students: {', '.join(names)}")]
    problems = []
    dataset = students[student].get("dataset") if isinstance(students[student], Mapping) else None
    if section.get("dataset") is not None and dataset in teachers and section["dataset"] != dataset:
        problems.append(Problem("optuna.dataset", f"must be {dataset!r}, the data set of student {student!r}"))
    train = section.get("train") if isinstance(section.get("train"), Mapping) else {}
    per_trial = {f"train.{key}": value for key, value in train.items()}
    try:
        student_configs(params, student, "tuned", per_trial, source="optuna")
        base_ok = True
    except ParamsError as err:
        problems += [p for p in err.problems if p.path.startswith("optuna.")]
        base_ok = False
    except (KeyError, TypeError, AttributeError, ValueError):
        base_ok = False
    space = section.get("search_space")
    if not isinstance(space, Mapping):
        return problems
    try:
        leaves = flatten_search_space(space)
    except ParamsError as err:
        return problems + err.problems
    for path, raw in leaves.items():
        where = f"optuna.search_space.{path}"
        head, *rest = path.split(".")
        if head not in SECTION_CONFIGS or not rest:
            problems.append(Problem(where, f"must sit under one of {list(SECTION_CONFIGS)}"))
            continue
        known = [f.name for f in fields(SECTION_CONFIGS[head])]
        if rest[0] not in known or (rest[0] == "weights") != (len(rest) == 2) or len(rest) > 2:
            problems.append(Problem(where, f"{'.'.join(rest)!r} is not a {head} setting{did_you_mean(rest[0], known)}; "
                                           f"expected one of: {', '.join(known)}"))
            continue
        if rest[0] == "weights" and rest[1] not in LOSS_TERMS:
            problems.append(Problem(where, f"unknown loss term {rest[1]!r}{did_you_mean(rest[1], LOSS_TERMS)}; "
                                           f"terms: {', '.join(LOSS_TERMS)}"))
            continue
        try:
            leaf = SearchLeaf.model_validate(raw)
        except ValidationError as err:
            problems += _skeleton_problems(err, SearchLeaf, where)
            continue
        for value in leaf.values_to_try() if base_ok else []:  # each end of the range builds a valid config
            try:
                student_configs(params, student, "tuned", {**per_trial, path: value}, source="optuna")
            except ParamsError as err:  # whole-config problems (fusion_dim vs heads) depend on the combination
                problems += [Problem(where, f"value {value!r}: {p.message}") for p in err.problems
                             if p.path.startswith("optuna.") and p.path != f"optuna.{head}"]
    return problems


def validate_params(params: Any, source: str = "params.yaml") -> None:
    problems = check_params(params)
    if problems:
        raise ParamsError(problems, source)
