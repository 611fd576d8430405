"""params.yaml: finding and reading it, and key paths into it (`loss.kl.weight`).

The stage side and the report read params.yaml; the engine never does (it takes configs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

_MISSING = object()


def project_root(start: Path | None = None) -> Path:
    """The folder holding dvc.yaml and params.yaml, searched upwards (notebooks may run from notebooks/)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() and (folder / "params.yaml").exists():
            return folder
    raise FileNotFoundError(f"no dvc.yaml + params.yaml in {here} or above")


def load_params(root: Path | None = None) -> dict:
    root = root or project_root()
    with open(root / "params.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def get_path(tree: Mapping, path: str, default: Any = _MISSING) -> Any:
    """`get_path(params, "distill.tuned.loss.kl.temperature")`; a missing key is a KeyError naming the path."""
    node = tree
    for depth, key in enumerate(path.split(".")):
        if not isinstance(node, Mapping) or key not in node:
            if default is not _MISSING:
                return default
            where = ".".join(path.split(".")[:depth]) or "the top level"
            raise KeyError(f"params: no key {key!r} under {where} (looking up {path!r})")
        node = node[key]
    return node
