"""Names people type: a registry of specs by name (backbones, data sets, loss terms), and the one
"did you mean" every error about a misspelt name uses.

A leaf module.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterable, TypeVar

Spec = TypeVar("Spec")


def did_you_mean(name: object, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(value: str, options: Iterable[str], what: str) -> str:
    """`value` if it is among `options`, else a ValueError naming the closest and all options."""
    options = list(options)
    if value not in options:
        raise ValueError(f"unknown {what} {value!r}{did_you_mean(value, options)}; expected one of: {', '.join(options)}")
    return value


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
            raise self.error(f"unknown {self.kind} {name!r}{did_you_mean(name, listed)}; registered: {', '.join(listed)}")
        return self[name]
