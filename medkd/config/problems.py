"""What is wrong with params.yaml, said by key path: `Problem`, `ParamsError`, and pydantic's
validation errors turned into one line each (`distill.tuned.model.fusion_layer: unknown key (did you
mean 'fusion_layers'?); expected one of: ...`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any, Mapping, NamedTuple

from pydantic import BaseModel, ValidationError

from medkd.util.registry import did_you_mean

# Keys that params.yaml once had: what to write instead (by the key's name, wherever it appears).
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


def _unwrap(node: Any) -> Any:
    """`X | None` and `Annotated[X, ...]` -> X."""
    while True:
        if typing.get_origin(node) in (typing.Union, types.UnionType):
            node = next(a for a in typing.get_args(node) if a is not type(None))
        elif typing.get_origin(node) is Annotated:
            node = typing.get_args(node)[0]
        else:
            return node


def _field_types(node: Any) -> dict[str, Any] | None:
    """{key: annotation} of a pydantic model or (pydantic) dataclass; None for anything else."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        return {name: field.annotation for name, field in node.model_fields.items()}
    if isinstance(node, type) and dataclasses.is_dataclass(node):
        hints = typing.get_type_hints(node, include_extras=True)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(node)}
    return None


def known_keys(model: type, loc: tuple) -> list[str]:
    """The keys allowed where `loc` points inside `model` (for 'did you mean')."""
    node: Any = model
    for part in loc:
        node = _unwrap(node)
        fields = _field_types(node)
        if fields is not None:
            if str(part) not in fields:
                return list(fields)
            node = fields[str(part)]
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return []
    return list(_field_types(_unwrap(node)) or [])


def message(error: Mapping, known: list[str], renamed: Mapping[str, str] | None = None) -> str:
    """One pydantic error as the line check-params prints after its key path."""
    kind, key = error["type"], (error["loc"][-1] if error["loc"] else "")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        if key in {**RENAMED_KEYS, **(renamed or {})}:
            return {**RENAMED_KEYS, **(renamed or {})}[key]
        return f"unknown key{did_you_mean(key, known)}; expected one of: {', '.join(known)}"
    if kind in ("missing", "missing_argument"):
        return "required key is missing"
    text = error["msg"].removeprefix("Value error, ")
    if error.get("input") is not None and not isinstance(error["input"], (dict, list)) and kind != "value_error":
        text += f" (got {error['input']!r})"
    return text


def problems_of(err: ValidationError, model: type, prefix: str = "") -> list[Problem]:
    """Each error of validating `model` at `prefix` (a key path) as a Problem."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in (prefix, *loc) if p != "") or prefix or "(top level)"
        problems.append(Problem(path, message(e, known_keys(model, loc[:-1]))))
    return problems
