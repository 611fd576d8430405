"""Stage `optuna`: tune a student's hyperparameters on dev average macro-F1 (test never seen).

`optuna.search_space` is nested like a distill variant (model / loss / train); each leaf
({type, low, high, log} or {type: categorical, choices}) becomes an Optuna parameter named by its
key path (`loss.weights.kl`, `model.fusion_dim`, `train.lr`), the path the trial's value is set at.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Mapping

import optuna

from medkd import report
from medkd.files import reset_dir, sha256_file, write_json
from medkd.metrics import headline_metrics
from medkd.params import project_root
from medkd.stages.common import Paths, load_data
from medkd.stages.schema import ParamsError, flatten_search_space, optuna_section, student_configs
from medkd.train import distill_student, load_or_build_teacher_cache, resume_key


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


def optuna_stage(params: Mapping, root: Path | None = None) -> dict:
    root = root or project_root()
    paths = Paths(root)
    section = optuna_section(params)
    student = section.student
    dataset = params["students"][student]["dataset"]
    data = load_data(params, dataset, root)
    # The study outlives a killed stage (DVC deletes the stage's outputs, not .medkd/): a re-run
    # continues with the remaining trials. Its name carries a fingerprint of everything the trials
    # depend on, so trials of another teacher, data or search space are never mixed in.
    storage = section.storage or f"sqlite:///{paths.optuna_storage()}"
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    fingerprint = resume_key(section.model_dump(exclude={"n_trials", "storage", "retrain_best"}),
                             params["students"][student], params["distill"], params.get("seed"), params.get("runtime"),
                             data.content_key("train"), sha256_file(paths.teacher_checkpoint(dataset)))
    study_name = f"{section.study_name or f'medkd-{student}'}-{fingerprint[:10]}"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=section.pruner_startup_trials,
                                         n_warmup_steps=section.pruner_warmup_epochs)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", pruner=pruner,
                                load_if_exists=True)
    states = optuna.trial.TrialState
    if section.storage is None:  # our own storage has no other worker: a RUNNING trial was interrupted
        for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            study.tell(trial.number, state=states.FAIL)
    seed = params.get("seed", 42) if section.sampler_seed is None else section.sampler_seed
    # Offset by the trials already there: a continued study does not redraw the first trials' values.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=section.n_startup_trials)
    per_trial = {f"train.{key}": value for key, value in section.train.items()}
    # Read the teacher's cached outputs once for all trials and the retrain, not once per trial.
    _, _, base_cfg = student_configs(params, student, "tuned")
    cache = load_or_build_teacher_cache(paths.teacher_checkpoint(dataset), data, base_cfg,
                                        paths.teacher_cache(dataset), rebuild_stale=False)

    def objective(trial):
        values = suggest(trial, section.search_space)
        try:
            model_cfg, loss_cfg, cfg = student_configs(params, student, "tuned", {**values, **per_trial}, "optuna")
        except ParamsError as err:  # a combination no model can have, e.g. fusion_dim not divisible by heads
            raise optuna.TrialPruned(str(err)) from None

        def report_epoch(epoch: int, score: float) -> None:
            trial.report(score, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        with tempfile.TemporaryDirectory() as tmp:
            result = distill_student(data, paths.teacher_checkpoint(dataset), model_cfg, loss_cfg, cfg, Path(tmp),
                                     teacher_cache=cache,
                                     report_epoch=report_epoch, evaluate_test=False)
        return result.dev["avg_f1"]

    done = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))
    remaining = max(0, section.n_trials - len(done))
    if done:
        print(f"study {study_name}: {len(done)} of {section.n_trials} trials already done, {remaining} to run")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=remaining, gc_after_trial=True)

    out = reset_dir(paths.optuna_report())
    trials = study.trials_dataframe(attrs=("number", "value", "params", "state", "duration"))
    trials["duration_s"] = trials.pop("duration").dt.total_seconds().round(1)
    trials.to_csv(out / "trials.csv", index=False)
    best = study.best_trial
    write_json(out / "best_params.json", {"study": study_name, "trial": best.number, "dev_avg_f1": best.value,
                                          "params": best.params})
    write_json(paths.optuna_models() / "study.json", {"study": study_name, "storage": storage,
                                                      "n_trials": len(study.trials)})
    report.plot_optuna(study, out)
    result_metrics = {"best_dev_avg_f1": round(best.value, 4), "n_trials": len(study.trials),
                      "n_complete": sum(t.state == states.COMPLETE for t in study.trials),
                      "n_pruned": sum(t.state == states.PRUNED for t in study.trials)}
    if section.retrain_best:
        model_cfg, loss_cfg, cfg = student_configs(params, student, "tuned", best.params)
        retrained = distill_student(data, paths.teacher_checkpoint(dataset), model_cfg, loss_cfg, cfg,
                                    out / "best", teacher_cache=cache, checkpoint_path=paths.optuna_models() / "best.pt",
                                    resume_path=paths.resume("optuna-best"))
        paths.resume("optuna-best").unlink(missing_ok=True)
        result_metrics["best_retrained"] = headline_metrics(json.loads((out / "best" / "metrics.json").read_text()))
        result_metrics["best_retrained_epochs"] = len(retrained.history)
    write_json(paths.metrics("optuna"), result_metrics)
    return {"study": study, "trials": trials, "best": best, "metrics": result_metrics}
