"""Does a change leave the study's results alone? Run the CI study (configs/ci.yaml on synthetic data,
the whole DVC pipeline) from two git revisions and compare every per-image prediction file byte by byte.

    .venv/bin/python benchmarks/same_predictions.py BEFORE [AFTER]     # AFTER: the working tree

Each revision runs in a temporary copy of its dvc.yaml, notebooks/, medkd/ and configs/ci.yaml, with
this environment's packages (about 6 minutes each on 2 cores). Prints one line per prediction file
that differs (or is missing on one side) and exits 1 if any does. Search trials are compared by
value, not bytes (their durations differ from run to run).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SYNTHETIC = """
from pathlib import Path
try:
    from medkd.catalog.synthetic import make_synthetic_medpix, make_synthetic_wound
except ImportError:  # revisions before the layered layout
    from medkd.synthetic import make_synthetic_medpix, make_synthetic_wound
make_synthetic_medpix(Path('data/medpix-2.0'), sizes=(32, 12, 12), image_size=32)
make_synthetic_wound(Path('data/wound-1-0'), sizes=(32, 12, 12), image_size=32)
"""


def run(cmd, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(cwd)}
    subprocess.run(cmd, cwd=cwd, env=env, check=True, shell=isinstance(cmd, str), stdout=subprocess.DEVNULL)


def study(revision: str | None, into: Path) -> Path:
    """The CI study's outputs of `revision` (None: the working tree)."""
    into.mkdir(parents=True)
    if revision is None:
        for item in ("dvc.yaml", "notebooks", "medkd", "configs"):
            (shutil.copytree if (REPO / item).is_dir() else shutil.copy)(REPO / item, into / item)
    else:
        archive = subprocess.run(["git", "archive", revision, "dvc.yaml", "notebooks", "medkd", "configs"],
                                 cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x"], input=archive, cwd=into, check=True)
    shutil.copy(into / "configs" / "ci.yaml", into / "params.yaml")
    run(["git", "init", "-q"], into)
    run(["dvc", "init", "-q"], into)
    run([sys.executable, "-c", SYNTHETIC], into)
    run(["dvc", "add", "-q", "data"], into)
    run("git add -A && git -c user.email=ci@example.com -c user.name=ci commit -qm study", into)
    print(f"dvc repro of {revision or 'the working tree'} ...", flush=True)
    run(["dvc", "repro"], into)
    return into / "reports"


def digests(reports: Path) -> dict[str, str]:
    return {str(p.relative_to(reports)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(reports.rglob("predictions_*.csv"))}


def trial_values(reports: Path) -> pd.DataFrame | None:
    found = next(iter(reports.glob("*/trials.csv")), None)  # reports/search (reports/optuna before it)
    if found is None:
        return None
    trials = pd.read_csv(found)
    return trials[["number", "value", "state"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="a git revision, e.g. HEAD~1")
    parser.add_argument("after", nargs="?", help="a git revision (default: the working tree)")
    parser.add_argument("--rename", nargs=2, action="append", default=[], metavar=("OLD", "NEW"),
                        help="an output folder renamed between the two, e.g. optuna search")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = study(args.before, Path(tmp) / "before")
        after = study(args.after, Path(tmp) / "after")
        old, new = digests(before), digests(after)
        for a, b in args.rename:
            old = {name.replace(f"{a}/", f"{b}/", 1) if name.startswith(f"{a}/") else name: d for name, d in old.items()}
        differ = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
        for name in differ:
            print(f"differs: {name}" if name in old and name in new else f"only in {'before' if name in old else 'after'}: {name}")
        trials = trial_values(before), trial_values(after)
        if all(t is not None for t in trials):
            same = trials[0].equals(trials[1])
            print(f"search trials: {'the same values and states' if same else 'differ'}\n"
                  f"{pd.concat(trials, axis=1, keys=['before', 'after']).to_string(index=False)}")
        print(f"{len(new) - len(differ)} of {len(old.keys() | new.keys())} prediction files byte-identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
