"""The one merge: how params.yaml's layers combine, wherever they are combined.

The rule, laying `overlay` over `base`:

- a mapping over a mapping merges key by key (the rule applied again, one level down);
- any other value (a number, a string, a list, or a mapping over a non-mapping) replaces what was below;
- `null` removes the key, so what lies below it (a default, or nothing) applies again.

Where it applies (each a list of layers, lowest first):

- a distill variant: `distill.model` / `distill.train`, then each variant of its `base:` chain from the
  root down, then the variant itself (`no-kd: {base: tuned, loss: {kl: null}}` is tuned without KL);
- a teacher's loss: plain CE, then `teachers.<dataset>.loss`;
- a preset (`configs/*.yaml`) over params.yaml (`medkd.config.presets`);
- overrides by key path (`loss.kl.weight=0.3`: an Optuna trial's values, `medkd check-params --set`),
  which are one-key overlays (`{"loss": {"kl": {"weight": 0.3}}}`). DVC's `dvc exp run -S` applies the
  same rule to params.yaml itself (Hydra merges a mapping into a mapping and replaces anything else;
  `-S '~key'` removes a key).

`build` then validates the merged mapping as the pydantic config it becomes; its errors name the key
path of the layer that set the bad value (`merge_layers` keeps the origin of every key).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, NamedTuple, Sequence

from pydantic import ValidationError

from medkd.config.problems import ParamsError, Problem, known_keys, message

Layers = Sequence[tuple[str, Mapping | None]]  # (the section's params.yaml path, its mapping), lowest first


def merge(base: Mapping | None, overlay: Mapping | None) -> dict:
    """`overlay` laid over `base` (neither is changed): mappings merge, other values replace, None removes."""
    merged = copy.deepcopy(dict(base or {}))
    for key, value in (overlay or {}).items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def overlay_of(values: Mapping[str, Any]) -> dict:
    """{"loss.kl.weight": 0.3} -> {"loss": {"kl": {"weight": 0.3}}}: key-path overrides as one overlay."""
    overlay: dict = {}
    for path, value in values.items():
        *parents, last = path.split(".")
        node = overlay
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise KeyError(f"params: {path!r} goes through {key!r}, which another override sets to a value")
        node[last] = value
    return overlay


def with_values(tree: Mapping, values: Mapping[str, Any]) -> dict:
    """`tree` with each key path in `values` set (the merge of their overlay)."""
    for path in values:
        node: Any = tree
        for depth, key in enumerate(path.split(".")[:-1]):
            node = node.get(key) if isinstance(node, Mapping) else None
            if node is not None and not isinstance(node, Mapping):
                raise KeyError(f"params: {path!r} goes through {'.'.join(path.split('.')[:depth + 1])!r}, "
                               "which is not a mapping")
    return merge(tree, overlay_of(values))


class Layered(NamedTuple):
    """Merged layers, and where each key came from: {key path inside the merge: its params.yaml path}."""

    values: dict
    origin: dict[tuple[str, ...], str]
    last: str | None  # the path of the last layer that set anything (where a problem of the whole merge is shown)

    def where(self, loc: Sequence, home: str) -> str:
        """The params.yaml path of `loc` (a pydantic error location): the layer that set it or its nearest
        parent, else `home` (a key no layer set: a missing key)."""
        loc = tuple(str(part) for part in loc)
        for depth in range(len(loc), 0, -1):
            if loc[:depth] in self.origin:
                return ".".join([self.origin[loc[:depth]], *loc[depth:]])
        return ".".join(p for p in (home, *loc) if p) or home


def merge_layers(layers: Sequence[tuple[str, Mapping | None]]) -> Layered:
    """The merge of `layers` (each: its section's params.yaml path, its mapping), lowest first."""
    values: dict = {}
    origin: dict[tuple[str, ...], str] = {}
    last = None
    for prefix, layer in layers:
        if layer:
            _record_origins(origin, layer, values, (), prefix)
            values = merge(values, layer)
            last = prefix
    return Layered(values, origin, last)


def _record_origins(origin: dict, layer: Mapping, below: Mapping, at: tuple, prefix: str) -> None:
    for key, value in layer.items():
        path = (*at, str(key))
        where = ".".join(p for p in (prefix, str(key)) if p)
        replaced = not (isinstance(value, Mapping) and isinstance(below.get(key), Mapping))
        if replaced:
            for stale in [p for p in origin if p[:len(path)] == path]:
                del origin[stale]
        if value is None:
            continue
        origin[path] = where
        if isinstance(value, Mapping):
            _record_origins(origin, value, below.get(key) if not replaced else {}, path, where)


def build(cls, layers: Layers, home: str | None = None):
    """`cls` from the merge of `layers`; a ParamsError names each bad key by the path of the layer that set
    it (a missing key: at `home`, default the last layer; a problem of the whole config: at the last layer
    that set anything)."""
    merged = merge_layers(layers)
    try:
        return cls.from_dict(merged.values)
    except ValidationError as err:
        renamed = getattr(cls, "renamed_keys", None)
        home = home or layers[-1][0]
        problems = [Problem(merged.where(e["loc"], home) if e["loc"] else merged.last or home,
                            message(e, known_keys(cls, tuple(e["loc"][:-1])), renamed)) for e in err.errors()]
        raise ParamsError(problems) from None
