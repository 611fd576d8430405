"""The shared behaviour of the config dataclasses (`ModelConfig`, `LossConfig`, `TrainConfig`,
`DataConfig`): built from a params.yaml mapping, unknown keys refused by name. A leaf module."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Mapping


class ConfigError(ValueError):
    """A config mapping with keys its dataclass does not have."""


class FromMapping:
    @classmethod
    def from_dict(cls, cfg: Mapping | None):
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        return asdict(self)
