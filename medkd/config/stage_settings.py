"""The sections that configure the export and search stages (`export:`, `optuna:`), and the search
space's leaves by key path. Validated by pydantic; each class is the single place of its defaults."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medkd.config.problems import ParamsError, Problem


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    storage: str | None = None  # None: a SQLite file under .medkd/optuna/
    study_name: str | None = None  # None: medkd-<student>
    sampler_seed: int | None = None  # None: the top-level seed
    # The seeds each trial trains with (its value: their mean dev F1). None: [seed]. Never seeds.primary, the
    # retrain's: a best picked on one draw and scored on the same draw is biased upwards (the winner's curse).
    trial_seeds: Annotated[list[int], Field(min_length=1)] | None = None
    n_startup_trials: Annotated[int, Field(ge=0)] = 3
    pruner_startup_trials: Annotated[int, Field(ge=0)] = 2
    pruner_warmup_epochs: Annotated[int, Field(ge=0)] = 0
    retrain_best: bool = True
    workers: Annotated[int, Field(ge=1)] = 1  # worker processes the stage runs on this machine
    train: dict[str, Any] = {}  # per-trial train keys
    search_space: Annotated[dict[str, Any], Field(min_length=1)]


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
