"""Presets: overlays on params.yaml, run as DVC experiments, never written over it.

A preset file (`configs/full.yaml`, `configs/paper.yaml`) states only what differs from
params.yaml, laid over it by the one merge (`medkd.config.merge`): mappings merge key by key, any
other value replaces the one below it, and `null` removes a key (a student or variant the preset
does not run). `medkd preset run FILE` starts
`dvc exp run --temp` with the overlay as `--set-param` overrides, so the experiment runs in a
temporary copy of the workspace and the user's params.yaml is left as it is; each preset sets
`preset: <name>`, which `dvc exp show` lists beside the results.

    medkd preset show configs/full.yaml       # the merged params, checked, as YAML
    medkd preset overrides configs/full.yaml  # the --set-param overrides, one per line
    medkd preset run configs/full.yaml        # the experiment (make full)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

from medkd.config.merge import merge
from medkd.config.params import project_root
from medkd.config.schema import validate_params


class PresetError(ValueError):
    """A preset file that is not an overlay of params.yaml."""


def load_overlay(path: Path) -> dict:
    try:
        overlay = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PresetError(f"{path}: cannot read the preset: {err}") from None
    if not isinstance(overlay, Mapping) or not isinstance(overlay.get("preset"), str):
        raise PresetError(f"{path}: a preset is a mapping with its name under `preset:` (then only what differs "
                          "from params.yaml)")
    return dict(overlay)


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar (what `dvc exp run --set-param` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    raise PresetError(f"cannot express {value!r} ({type(value).__name__}) as a --set-param value")


def overrides(base: Mapping, overlay: Mapping, prefix: str = "") -> list[str]:
    """The `--set-param` overrides that turn `base` into `merge(base, overlay)`."""
    result = []
    for key, value in overlay.items():
        path = f"{prefix}{key}"
        if value is None:
            if key in base:
                result.append(f"~{path}")
        elif isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            result += overrides(base[key], value, f"{path}.")
        else:
            result.append(f"++{path}={hydra_value(value)}")
    return result


def preset_params(path: Path, root: Path | None = None) -> tuple[dict, dict]:
    """(the overlay, params.yaml with it laid over), the latter checked against the schema."""
    root = root or project_root()
    base = yaml.safe_load((root / "params.yaml").read_text())
    overlay = load_overlay(path)
    merged = merge(base, overlay)
    validate_params(merged, f"params.yaml + {path}")
    return overlay, merged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medkd preset", description=__doc__.split("\n\n")[0],
                                     epilog="`run` passes any further arguments to `dvc exp run`")
    parser.add_argument("action", choices=["show", "overrides", "run"])
    parser.add_argument("preset", type=Path, help="a preset file, e.g. configs/full.yaml")
    parser.add_argument("--name", help="the experiment's name (default: the preset's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, dvc_args = build_parser().parse_known_args(argv)
    root = project_root()
    try:
        overlay, merged = preset_params(args.preset, root)
    except (PresetError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    base = yaml.safe_load((root / "params.yaml").read_text())
    sets = overrides(base, overlay)
    if args.action == "show":
        print(yaml.safe_dump(merged, sort_keys=False), end="")
    elif args.action == "overrides":
        print("\n".join(sets))
    else:
        name = args.name or overlay["preset"]
        command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", name, "--force",
                   *[f"--set-param={item}" for item in sets], *dvc_args]
        print(f"dvc exp run --temp --name {name} with {len(sets)} overrides from {args.preset} "
              f"(params.yaml is left as it is; see `dvc exp show`)", flush=True)
        return subprocess.run(command, cwd=root).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())

