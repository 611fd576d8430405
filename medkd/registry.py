"""A registry of specs by name (backbones, data sets): one spec per name, one error listing the names.

A leaf module.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

Spec = TypeVar("Spec")


class Registry(dict, Generic[Spec]):
    """{name: spec}; `register` refuses a second spec of the same name, `lookup` names the valid ones."""

    def __init__(self, kind: str, error: type[Exception] = KeyError):
        super().__init__()
        self.kind = kind
        self.error = error

    def register(self, spec: Spec) -> Spec:
        name = spec.name  # type: ignore[attr-defined]
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = spec
        return spec

    def names(self, keep: Callable[[Spec], bool] | None = None) -> list[str]:
        return sorted(name for name, spec in self.items() if keep is None or keep(spec))

    def lookup(self, name: str, listed: list[str] | None = None) -> Spec:
        """The spec of `name`; an unknown name is `self.error` naming the closest and all `listed` names."""
        if name not in self:
            listed = self.names() if listed is None else listed
            close = difflib.get_close_matches(str(name), listed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(listed)}")
        return self[name]
