"""Do the claims survive another set of seeds? The claims table again, on fresh seeds.

Retrains the arms of the claims table (the primary student's no-KD control, Hinton KD, the tuned
combined loss and the search's best weights) on a second set of seeds, with the committed run's
teacher, teacher cache and search result, and builds the claims table from those runs exactly as
the report stage does from the committed ones. Where a verdict flips between the two seed sets, the
intervals did not cover seed-to-seed variation. Each new run's per-image dev and test predictions
are kept under benchmarks/results/seed_sets/, so its intervals can be recomputed.

    .venv/bin/python benchmarks/seed_sets.py --seeds 45 46 47
Run after `dvc repro` (it reads models/ and reports/); results: benchmarks/results/seed_sets.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import yaml

from medkd.config.sections import student_configs
from medkd.config.study import primary_student
from medkd.data.prepared import load_data
from medkd.engine.loop import Distillation, TeacherSource, distill_student
from medkd.pipeline.paths import Paths
from medkd.reporting import tables
from medkd.scoring.metrics import load_run
from medkd.stages.report import collect_runs, run_row
from medkd.util.environment import cpu_model

ARMS = (tables.NO_KD, tables.KL_ONLY, "tuned", tables.OPTUNA_BEST)


def claims(runs: pd.DataFrame, dataset: str, student: str, seed: int) -> pd.DataFrame:
    return tables.claims_table(tables.interval_table(runs, dataset, seed=seed), student)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[45, 46, 47])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/seed_sets.json"))
    args = parser.parse_args()
    root = Path.cwd()
    params = yaml.safe_load((root / "params.yaml").read_text())
    paths = Paths(root)
    student = primary_student(params)
    spec = params["students"][student]
    dataset = spec["dataset"]
    committed = collect_runs(params, paths)
    committed = committed[(committed.model == student) & committed.variant.isin(ARMS)]
    overlap = set(args.seeds) & set(committed.seed)
    if overlap:
        raise SystemExit(f"--seeds {sorted(overlap)} are the committed run's own: give a disjoint seed set")
    best = json.loads((paths.search_report() / "best_params.json").read_text())["params"]
    data = load_data(params, dataset, root)
    teacher = TeacherSource(paths.teacher_checkpoint(dataset), cache_path=paths.teacher_cache(dataset),
                            rebuild_stale=False)
    keep = args.out.parent / "seed_sets"
    rows, started = [], time.perf_counter()
    for arm in ARMS:
        for seed in args.seeds:
            variant, overrides = ("tuned", best) if arm == tables.OPTUNA_BEST else (arm, None)
            model_cfg, loss_cfg, cfg = student_configs(params, student, variant, overrides, seed=seed)
            run_dir = keep / arm / f"seed-{seed}"
            print(f"--- {student} {arm}, seed {seed}", flush=True)
            distill_student(data, Distillation(model_cfg, loss_cfg, cfg, run_dir, teacher,
                                               checkpoint_path=run_dir / "model.pt", trunk_dir=paths.trunks()))
            (run_dir / "model.pt").unlink()  # predictions are what the intervals need
            rows.append(run_row(dataset, student, arm, seed, load_run(run_dir), spec))
    fresh = pd.DataFrame(rows)
    seed = params.get("seed", 42)
    first, second = claims(committed, dataset, student, seed), claims(fresh, dataset, student, seed)
    both = first.merge(second, on="Claim", suffixes=(" (committed seeds)", " (fresh seeds)"))
    both["Same reading"] = both["Reading (committed seeds)"] == both["Reading (fresh seeds)"]
    print(both.to_markdown(index=False))
    args.out.write_text(json.dumps({
        "machine": cpu_model(), "student": student, "committed_seeds": sorted(set(committed.seed)),
        "fresh_seeds": args.seeds, "seconds": round(time.perf_counter() - started, 1),
        "claims": both.to_dict(orient="records")}, indent=1) + "\n")


if __name__ == "__main__":
    main()
