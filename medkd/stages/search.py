"""Stage `search`: tune a student's hyperparameters on dev average macro-F1 (test never seen).

`optuna.search_space` holds key paths inside a distill variant (model / loss / train), flat or nested; each leaf
({type, low, high, log} or {type: categorical, choices}) becomes an Optuna parameter named by its
key path (`loss.kl.weight`, `model.fusion_dim`, `train.lr`), the path the trial's value is set at.

Any number of workers can share one study: the stage's own (`optuna.workers` of them, on this
machine) and `medkd optuna-worker` processes on other machines pointed at the same storage
(PostgreSQL, or a journal file / SQLite on one machine). Together they run exactly
`optuna.n_trials` trials: a worker reserves a trial (enqueues it) under a lock held across
workers, then runs it (see `run_worker`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import optuna
import pandas as pd

from medkd.config.params import project_root
from medkd.config.problems import ParamsError
from medkd.config.sections import student_configs
from medkd.config.stage_settings import OptunaSection, flatten_search_space, optuna_section
from medkd.config.study import OPTUNA_BEST, Run, seed_lists
from medkd.data.prepared import PreparedData, load_data
from medkd.engine.loop import Distillation, TeacherSource, distill_student
from medkd.engine.teacher_cache import load_or_build_teacher_cache
from medkd.pipeline.paths import Paths, rebuild_teacher
from medkd.pipeline.stage import seed_summary
from medkd.scoring.metrics import headline_metrics
from medkd.util import progress
from medkd.util.files import reset_dir, sha256_file, write_json
from medkd.util.keys import content_key

JOURNAL_PREFIX = "journal:"
# Heartbeats on database storages: a trial whose worker died is marked failed after the grace
# period and its slot is run again by the next worker that reserves one.
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 120
TRIAL_ERROR_ATTR = "medkd_error"  # set on trials that failed by an exception (they count; interrupted ones do not)


def suggest(trial: optuna.Trial, search_space: Mapping) -> dict:
    """Sample one value per leaf of the (nested) search space, named by its key path."""
    values = {}
    for name, spec in flatten_search_space(search_space).items():
        kind = spec.get("type", "float")
        if kind == "float":
            values[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif kind == "int":
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif kind == "categorical":
            values[name] = trial.suggest_categorical(name, list(spec["choices"]))
        else:
            raise ValueError(f"optuna.search_space.{name}: unknown type {kind!r}")
    return values


# --------------------------------------------------------------------------- storage


def resolve_storage(url: str | None, paths: Paths) -> str:
    """The study's storage URL: `optuna.storage`, or a SQLite file under .medkd/ by default.

    `journal:PATH` is Optuna's journal file storage (several processes, one machine, no server);
    a relative PATH is taken from the project root.
    """
    url = url or f"sqlite:///{paths.optuna_storage()}"
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url.removeprefix(JOURNAL_PREFIX))
        return JOURNAL_PREFIX + str(path if path.is_absolute() else paths.root / path)
    return url


def quiet_optuna() -> None:
    """Optuna's log through Python logging (no colour codes in rendered notebooks), warnings only;
    its ExperimentalWarnings (heartbeats, constant liar) say nothing a study's reader needs."""
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    quiet_optuna()
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url.removeprefix(JOURNAL_PREFIX))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                      engine_kwargs={"pool_pre_ping": True})


@contextlib.contextmanager
def study_lock(url: str, study_name: str) -> Iterator[None]:
    """A lock shared by every worker of this study: a PostgreSQL advisory lock on the study's
    server, or a file lock beside a SQLite/journal file (workers on one machine)."""
    if url.startswith(("postgresql", "postgres")):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        finally:
            engine.dispose()
        return
    if url.startswith(JOURNAL_PREFIX):
        target = Path(url.removeprefix(JOURNAL_PREFIX))
    elif url.startswith("sqlite:///"):
        target = Path(url.removeprefix("sqlite:///"))
    else:
        raise ValueError(f"optuna.storage {url!r}: shared studies need PostgreSQL (postgresql://...), "
                         f"a journal file ({JOURNAL_PREFIX}PATH) or SQLite (sqlite:///PATH)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not `<file>.lock`: Optuna's journal backend keeps its own lock file by that name.
    with open(f"{target}.medkd-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the search


@dataclass
class Search:
    """One study and everything a worker needs to run its trials."""

    params: Mapping
    section: OptunaSection
    paths: Paths
    student: str
    dataset: str
    data: PreparedData
    storage_url: str
    study_name: str

    @classmethod
    def open(cls, params: Mapping, root: Path | None = None, storage: str | None = None) -> "Search":
        root = root or project_root()
        paths = Paths(root)
        section = optuna_section(params)
        student = section.student
        dataset = params["students"][student]["dataset"]
        data = load_data(params, dataset, root)
        # The study outlives a killed stage (DVC deletes the stage's outputs, not .medkd/): a re-run
        # continues with the remaining trials. Its name carries a fingerprint of everything the trials
        # depend on, so trials of another teacher, data or search space are never mixed in.
        fingerprint = content_key(section.model_dump(exclude={"n_trials", "storage", "retrain_best", "workers"}),
                                 params["students"][student],
                                 {k: v for k, v in params["distill"].items()
                                  if k in ("pretrained", "model", "train", "tuned")},
                                 params.get("seed"),
                                 params.get("runtime"), data.content_key("train"),
                                 sha256_file(paths.teacher_checkpoint(dataset)))
        study_name = f"{section.study_name or f'medkd-{student}'}-{fingerprint[:10]}"
        url = resolve_storage(storage or section.storage, paths)
        return cls(params, section, paths, student, dataset, data, url, study_name)

    def study(self, worker: int = 0, shared: bool = False) -> optuna.Study:
        """The study (created on first use). Worker k samples with its own seed; `shared` (other
        workers may run at the same time) makes TPE treat running trials as a constant liar."""
        section = self.section
        pruner = optuna.pruners.MedianPruner(n_startup_trials=section.pruner_startup_trials,
                                             n_warmup_steps=section.pruner_warmup_epochs)
        with self.lock():  # workers starting together: one creates the storage's tables and the study
            study = optuna.create_study(study_name=self.study_name, storage=open_storage(self.storage_url),
                                        direction="maximize", pruner=pruner, load_if_exists=True)
        seed = self.sampler_seed
        # Offset by the trials already there: a continued study does not redraw the first trials' values.
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials) + 7919 * worker,
                                                   n_startup_trials=section.n_startup_trials,
                                                   **({"constant_liar": True} if shared else {}))
        return study

    @property
    def trial_seeds(self) -> list[int]:
        """The seeds every trial trains with (`optuna.trial_seeds`; default: the top-level seed)."""
        return list(self.section.trial_seeds or [self.params.get("seed", 42)])

    @property
    def units(self) -> int:
        """The stage's runs, for its progress: every trial, then the retrained best on each primary seed."""
        return self.section.n_trials + (len(seed_lists(self.params)[1]) if self.section.retrain_best else 0)

    @property
    def sampler_seed(self) -> int:
        return self.params.get("seed", 42) if self.section.sampler_seed is None else self.section.sampler_seed

    def lock(self):
        return study_lock(self.storage_url, self.study_name)

    @functools.cached_property
    def teacher_cache(self) -> dict:
        """The teacher's cached outputs, read once for all of this process's trials and the retrain."""
        _, _, base_cfg = student_configs(self.params, self.student, "tuned")
        return load_or_build_teacher_cache(self.paths.teacher_checkpoint(self.dataset), self.data, base_cfg,
                                           self.paths.teacher_cache(self.dataset), rebuild_stale=False,
                                           trunk_dir=self.paths.trunks(),
                                           rebuild_with=rebuild_teacher(self.paths, self.dataset))


def counted_trials(study: optuna.Study) -> int:
    """Trials that hold a slot of the budget: all but those interrupted (failed without an error)."""
    return sum(t.state != optuna.trial.TrialState.FAIL or TRIAL_ERROR_ATTR in t.user_attrs
               for t in study.get_trials(deepcopy=False))


def objective(search: Search):
    """The function Optuna maximises: a trial's values trained on each of `optuna.trial_seeds` (seeds the
    retrain never uses), its dev average macro-F1 averaged over them. Each epoch's dev score is reported
    at step (seed's position · epochs + epoch), so the median pruner compares like with like."""
    section, cache = search.section, search.teacher_cache
    per_trial = {f"train.{key}": value for key, value in section.train.items()}
    checkpoint = search.paths.teacher_checkpoint(search.dataset)
    seeds = search.trial_seeds

    def run(trial) -> float:
        values = suggest(trial, section.search_space)
        trial.set_user_attr("seeds", seeds)
        label = f"trial {trial.number + 1}/{section.n_trials}"
        scores = []
        for position, seed in enumerate(seeds):
            try:
                model_cfg, loss_cfg, cfg = student_configs(search.params, search.student, "tuned",
                                                           {**values, **per_trial}, "optuna", seed=seed)
            except ParamsError as err:  # a combination no model can have, e.g. fusion_dim not divisible by heads
                raise optuna.TrialPruned(str(err)) from None

            def report_epoch(epoch: int, score: float, position=position, epochs=cfg.epochs) -> None:
                trial.report(score, position * epochs + epoch)
                last = position == len(seeds) - 1 and epoch == epochs
                if not last and trial.should_prune():  # a finished trial keeps its value
                    raise optuna.TrialPruned(f"pruned after epoch {epoch} of seed {seed}")

            units, done = search.units, min(trial.number + position / len(seeds), search.units - 1)
            try:
                with tempfile.TemporaryDirectory() as tmp, progress.span(
                        f"{label}, seed {seed}", done / units, (done + 1 / len(seeds)) / units):
                    result = distill_student(search.data, Distillation(
                        model_cfg, loss_cfg, cfg, Path(tmp), TeacherSource(checkpoint, outputs=cache),
                        trunk_dir=search.paths.trunks(), evaluate_test=False, report_epoch=report_epoch))
            except optuna.TrialPruned as pruned:
                print(f"{label}: {pruned}")
                raise
            except KeyboardInterrupt:
                raise
            except Exception as err:
                trial.set_user_attr(TRIAL_ERROR_ATTR, f"{type(err).__name__}: {err}")
                raise
            scores.append(result.dev["avg_f1"])
        print(f"{label}: dev avg F1 {sum(scores) / len(scores):.4f} (seeds {', '.join(map(str, seeds))})")
        return sum(scores) / len(scores)

    return run


def run_worker(search: Search, worker: int = 0, shared: bool = False, reserve: bool = True) -> int:
    """Run trials until the study holds `n_trials` of them; return how many this worker ran.

    Reserving a trial (count, then enqueue one) happens under the study's lock, so concurrent
    workers never overshoot the budget; `optimize` then takes a waiting trial, which always
    exists because every worker enqueues before it takes. A trial that raises is recorded as
    failed (with its error) and counts; one whose worker was killed does not, and is run again.
    """
    study = search.study(worker, shared)
    run = objective(search)
    if not reserve:
        study.optimize(run, n_trials=1, gc_after_trial=True, catch=(Exception,))
        return 1
    ran = 0
    while True:
        with search.lock():
            if counted_trials(study) >= search.section.n_trials:
                return ran
            study.enqueue_trial({}, user_attrs={"worker": worker})
        study.optimize(run, n_trials=1, gc_after_trial=True, catch=(Exception,))
        ran += 1


def start_workers(search: Search, count: int) -> list[subprocess.Popen]:
    """`count` more worker processes on this machine (`medkd optuna-worker`), on the same study."""
    command = [sys.executable, "-m", "medkd", "optuna-worker", "--root", str(search.paths.root),
               "--storage", search.storage_url, "--shared", "--with-parent"]
    return [subprocess.Popen([*command, "--worker", str(k)]) for k in range(1, count + 1)]


def search_stage(params: Mapping, root: Path | None = None) -> dict:
    search = Search.open(params, root)
    section = search.section
    study = search.study()
    states = optuna.trial.TrialState
    own_storage = section.storage is None
    if own_storage:  # our own storage has no worker outside this stage: a RUNNING trial was interrupted
        for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            study.tell(trial.number, state=states.FAIL)
        # A trial reserved but never started (the stage was killed in between) holds a slot: run it now,
        # while no other worker is about, so that each later reservation is taken by its own worker.
        while study.get_trials(deepcopy=False, states=(states.WAITING,)):
            run_worker(search, 0, reserve=False)
    done = counted_trials(study)
    if done:
        print(f"study {search.study_name}: {done} of {section.n_trials} trials already done")
    helpers = start_workers(search, section.workers - 1)
    try:
        run_worker(search, 0, shared=section.workers > 1 or not own_storage)
    finally:
        failed = [p.args[-1] for p in helpers if p.wait() != 0]
    if failed:
        raise RuntimeError(f"optuna workers {', '.join(failed)} failed (their output is above)")
    return collect(search, study)  # the same study: its trials are read from the storage afresh


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, dev score, parameters, state, the seeds it trained with, seconds, and the last
    step it reported (seed's position · epochs + epoch; a pruned trial's score there): what the report's
    search figure draws."""
    trials = study.trials_dataframe(attrs=("number", "value", "params", "state", "duration", "user_attrs"))
    trials = trials.drop(columns=[c for c in trials if c.startswith("user_attrs_") and c != "user_attrs_seeds"])
    trials = trials.rename(columns={"user_attrs_seeds": "seeds"})
    trials["duration_s"] = trials.pop("duration").dt.total_seconds().round(1)
    last = {t.number: max(t.intermediate_values) for t in study.trials if t.intermediate_values}
    trials["last_step"] = trials["number"].map(last)
    trials["last_step_value"] = [t.intermediate_values[last[t.number]] if t.number in last else None
                                  for t in sorted(study.trials, key=lambda t: t.number)]
    return trials


def importances(study: optuna.Study, seed: int) -> dict:
    """The parameters' fANOVA importances over the complete trials (seeded: the same study, the same
    numbers), or why there are none."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2 or len({tuple(sorted(t.params.items())) for t in complete}) < 2:
        return {"complete_trials": len(complete), "importances": None,
                "reason": "fewer than two distinct complete trials"}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as err:  # e.g. a parameter with a single value
        return {"complete_trials": len(complete), "importances": None, "reason": str(err)}
    return {"complete_trials": len(complete), "importances": {k: round(float(v), 4) for k, v in found.items()}}


def collect(search: Search, study: optuna.Study) -> dict:
    """The finished study into the stage's reports; the best trial retrained and tested."""
    section, paths, states = search.section, search.paths, optuna.trial.TrialState
    out = reset_dir(paths.search_report())
    trials = trials_table(study)
    trials.to_csv(out / "trials.csv", index=False)
    best = study.best_trial
    write_json(out / "best_params.json", {"study": search.study_name, "trial": best.number,
                                          "dev_avg_f1": best.value, "params": best.params})
    write_json(paths.search_models() / "study.json", {"study": search.study_name, "storage": search.storage_url,
                                                      "n_trials": len(study.trials)})
    found = importances(study, search.sampler_seed)
    write_json(out / "importances.json", found)
    result_metrics = {"best_dev_avg_f1": round(best.value, 4), "best_trial": best.number,
                      "trial_seeds": search.trial_seeds,
                      # A best among the random start-up trials says the sampler's model added nothing yet.
                      "best_is_startup_trial": best.number < section.n_startup_trials,
                      "n_trials": len(study.trials),
                      "n_complete": sum(t.state == states.COMPLETE for t in study.trials),
                      "n_pruned": sum(t.state == states.PRUNED for t in study.trials),
                      "n_failed": sum(t.state == states.FAIL for t in study.trials)}
    if section.retrain_best:  # on the primary comparison's seeds: compared with `tuned` seed for seed
        headline = {}
        for seed in seed_lists(search.params)[1]:
            run = Run(OPTUNA_BEST, seed)
            model_cfg, loss_cfg, cfg = student_configs(search.params, search.student, "tuned", best.params, seed=seed)
            print(f"--- retraining the best trial ({best.number}) with seed {seed}")
            run_dir = out / "best" / f"seed-{seed}"
            teacher = TeacherSource(paths.teacher_checkpoint(search.dataset), outputs=search.teacher_cache)
            done = section.n_trials + len(headline)
            with progress.span(f"retraining the best trial, seed {seed}", done / search.units, (done + 1) / search.units):
                distill_student(search.data, Distillation(
                    model_cfg, loss_cfg, cfg, run_dir, teacher,
                    checkpoint_path=paths.search_models() / f"best-seed{seed}.pt",
                    resume_path=paths.resume(run.slug), trunk_dir=paths.trunks()))
            paths.clear_resume(run.slug)
            headline[run] = headline_metrics(json.loads((run_dir / "metrics.json").read_text()))
        result_metrics["best_retrained"] = seed_summary(headline)[OPTUNA_BEST]
    write_json(paths.metrics("search"), result_metrics)
    return {"study": study, "trials": trials, "best": best, "metrics": result_metrics, "importances": found}
