"""`medkd experiments`: DVC experiments side by side, readable in a 100-column terminal.

`dvc exp show` lists every param and metric of every stage (hundreds of columns); this shows, for the
workspace, the commit it is on and each experiment, the params that differ between them and the
study's headline numbers (test average macro-F1): each teacher, each student's variants (mean over
seeds), the search's best dev score. It reads `dvc exp show --json`, so it shows what DVC knows.

    medkd experiments              # the experiments of the current commit
    medkd experiments --all        # of every commit (dvc exp show -A)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any, Iterator, Mapping

METRICS = "reports/metrics/"
WIDTH = 100


def rows(shown: list[dict]) -> Iterator[dict]:
    """Each experiment (and baseline) of `dvc exp show --json`: name, params, metrics."""
    for entry in shown:
        yield _row(entry)
        for group in entry.get("experiments") or []:
            for rev in group.get("revs") or []:
                yield _row(rev)


def _row(entry: Mapping) -> dict:
    data = entry.get("data") or {}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    metrics = {name.removeprefix(METRICS).removesuffix(".json"): (value or {}).get("data") or {}
               for name, value in (data.get("metrics") or {}).items()}
    rev = entry.get("rev") or "?"
    name = entry.get("name") or (rev if rev == "workspace" else rev[:7])
    return {"name": name, "params": _flat(params), "metrics": metrics}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def headline(metrics: Mapping[str, Mapping]) -> dict[str, float]:
    """{short name: test avg F1}: each teacher, each student's variants, the search's best (dev)."""
    found = {}
    for name, values in metrics.items():
        if name.startswith("teacher-") and "test_avg_f1" in values:
            found[name] = values["test_avg_f1"]
        elif name.startswith("distill-"):
            for variant, summary in values.items():
                if isinstance(summary, Mapping) and "test_avg_f1" in summary:
                    found[f"{name.removeprefix('distill-')} {variant}"] = summary["test_avg_f1"]
        elif name == "search" and "best_dev_avg_f1" in values:
            found["search best (dev)"] = values["best_dev_avg_f1"]
    return found


def table(experiments: list[dict], width: int = WIDTH) -> str:
    """The experiments as columns: the params that differ, then the headline numbers; wrapped to `width`."""
    keys = sorted({k for e in experiments for k in e["params"]})
    changed = [k for k in keys if len({json.dumps(e["params"].get(k), sort_keys=True) for e in experiments}) > 1]
    numbers = [headline(e["metrics"]) for e in experiments]
    labels = list(dict.fromkeys(k for found in numbers for k in found))
    names = [e["name"] for e in experiments]
    column = max(9, min(16, (width - 36) // max(len(names), 1) - 1))
    label_width = width - (column + 1) * len(names)
    lines = [_line("", [_fit(n, column) for n in names], label_width, column)]
    lines.append("-" * min(width, label_width + (column + 1) * len(names)))
    for key in changed:
        cells = [_fit(_text(e["params"].get(key)), column) for e in experiments]
        lines.append(_line(key, cells, label_width, column))
    if changed:
        lines.append("")
    lines.append(_line("test avg macro-F1", [""] * len(names), label_width, column))
    for label in labels:
        cells = [f"{found[label]:.4f}" if label in found else "-" for found in numbers]
        lines.append(_line(f"  {label}", cells, label_width, column))
    if not changed:
        lines.append("(no params differ between these)")
    return "\n".join(lines)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _line(label: str, cells: list[str], label_width: int, column: int) -> str:
    label = label if len(label) <= label_width - 1 else "…" + label[-(label_width - 2):]  # a key path's end says most
    return (label.ljust(label_width) + " ".join(cell.rjust(column) for cell in cells)).rstrip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command = ["dvc", "exp", "show", "--json", *(["-A"] if "--all" in argv else [])]
    done = subprocess.run([shutil.which("dvc") or "dvc", *command[1:]], capture_output=True, text=True)
    if done.returncode:
        print(f"medkd experiments: `{' '.join(command)}` failed:\n{done.stderr.strip()}", file=sys.stderr)
        return done.returncode
    print(table(list(rows(json.loads(done.stdout or "[]")))))
    return 0
