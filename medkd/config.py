"""The config dataclasses' shared base (`ModelConfig`, `LossConfig`, `TrainConfig`, `DataConfig`).

Each is a frozen pydantic dataclass: built from a params.yaml mapping, values are validated and
coerced on construction (types, ranges, registry names), unknown keys are refused. Their
`pydantic.ValidationError`s carry the offending key, which `medkd.stages.schema` turns into the
key path in params.yaml. A leaf module.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict
from typing import Iterable, Mapping

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

STRICT_KEYS = ConfigDict(extra="forbid")


def config_dataclass(cls):
    """`@config_dataclass`: a frozen pydantic dataclass that refuses unknown keys."""
    return dataclass(frozen=True, config=STRICT_KEYS)(cls)


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    close = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(value: str, options: Iterable[str], what: str) -> str:
    """`value` if it is among `options`, else a ValueError naming the closest and all options."""
    options = list(options)
    if value not in options:
        raise ValueError(f"unknown {what} {value!r}{did_you_mean(value, options)}; expected one of: {', '.join(options)}")
    return value


class FromMapping:
    @classmethod
    def from_dict(cls, cfg: Mapping | None):
        return cls(**dict(cfg or {}))

    def to_dict(self) -> dict:
        return asdict(self)
