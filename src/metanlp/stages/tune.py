"""Corpus files -> tuned hyperparameters (artifacts/tune/best.json), by an Optuna study.

A seeded TPE sampler proposes values; each trial meta-trains for a short budget and reports its validation
accuracy at every validation, where the median pruner may stop it. The study lives in its own database
(a sqlite file under artifacts/ by default, any RDB URL so that several workers share one study), named
after a hash of what it tunes, so an unchanged re-run continues the same study and a changed input starts
a new one. Each trial is a nested MLflow run under one "tune" run. Where the study and that run live goes to
the stage's run record (artifacts/runs/tune.json), not to best.json, which holds only what was tuned.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from metanlp.atomic import fault_point, file_digest
from metanlp.config import DistributedConfig, PipelineParams
from metanlp.stages.build_corpus import CORPUS
from metanlp.stages.common import Stage, Workspace, params_slice, run_record, write_json
from metanlp.stages.meta_train import BEST, train_model, with_overrides
from metanlp.stages.pretrain import PRETRAINED, starting_encoder
from metanlp.tracking import tracking

PARAMS = ("meta_train", "tune", "data.label_spaces")


def study_name(params: PipelineParams, root: Path) -> str:
    if params.tune.study_name:
        return params.tune.study_name
    sliced = params_slice(params, PARAMS)
    sliced["tune"].pop("heartbeat_s", None)  # how workers signal life is not what the study tunes
    tuned = {"params": sliced, "train": file_digest(root / CORPUS),
             "start": file_digest(root / PRETRAINED)}
    return "metanlp-" + hashlib.md5(json.dumps(tuned, sort_keys=True).encode()).hexdigest()[:12]


def storage_url(params: PipelineParams, root: Path) -> str:
    if params.tune.storage:
        return params.tune.storage
    if os.environ.get("METANLP_OPTUNA_STORAGE"):  # e.g. PostgreSQL in docker/compose.yaml
        return os.environ["METANLP_OPTUNA_STORAGE"]
    folder = Workspace(root).artifacts.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def storage(params: PipelineParams, root: Path):
    """The study's database, with a heartbeat: the trial of a worker that died (kill -9, a lost machine) is
    marked failed by the next worker instead of staying 'running' for ever."""
    import optuna

    beat = params.tune.heartbeat_s
    return optuna.storages.RDBStorage(storage_url(params, root), heartbeat_interval=beat, grace_period=2 * beat)


def prepare(params: PipelineParams, root: Path) -> None:
    """Create the study and the tracking store once, before several workers start: processes creating them at
    the same moment race on the databases' first migrations."""
    import optuna

    with tracking(params.register_.tracking_uri, root, params.register_.experiment):
        optuna.create_study(study_name=study_name(params, root), storage=storage(params, root),
                            direction="maximize", load_if_exists=True)


def run(params: PipelineParams, root: Path, show_progress: bool = True, worker: int = 0) -> dict:
    """Run this worker's share of the study's budget (`tune.trials` in all, however many workers share it) and
    write the study's best values. `worker`: this process's index among the workers (its sampler's seed is
    tune.seed + worker, so workers propose different values; worker 0 alone is the plain seeded run)."""
    name = study_name(params, root)
    if not params.tune.enabled:
        return _write(root, {"study": None, "overrides": {}, "best_value": None, "trials": 0}, {})
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = params.tune
    study = optuna.create_study(
        study_name=name, storage=storage(params, root), direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=tune.seed + worker),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=tune.val_every))
    start = starting_encoder(params, root)  # meta_train's params, with the pretrained encoder if any

    def objective(trial) -> float:
        if trial.number >= tune.trials:  # another worker took the last trial of the budget meanwhile
            trial.set_user_attr(OVER_BUDGET, True)
            trial.study.stop()
            raise optuna.TrialPruned("the study's budget of trials is spent")
        trial.set_user_attr("metanlp.worker", worker)
        values = start.learner.search_space(trial)
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"tune: trial {trial.number + 1} of {tune.trials} ({shown})", flush=True)
        config = with_overrides(start, values)
        # A trial is one process (its pruning reports each validation); tuning scales out with workers.
        config = config.model_copy(update={"train": config.train.model_copy(update={
            "episodes": tune.episodes, "val_every": tune.val_every, "val_episodes": tune.val_episodes,
            "warmup_episodes": min(config.train.warmup_episodes, tune.episodes // 2),
            "distributed": DistributedConfig()})})

        def report(step: int, accuracy: float) -> None:
            fault_point("tune.validation")  # crash tests: a worker killed in the middle of a trial
            trial.report(accuracy, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {accuracy:.3f} at step {step} is below the median")

        return train_model(config, root, params.data, None, show_progress, on_validation=report
                           ).best_val_accuracy

    with tracking(params.register_.tracking_uri, root, params.register_.experiment) as experiment_id:
        run_id, best = _optimize(study, objective, tune, name, experiment_id)
    counted = budgeted(study)  # one read of the study's trials from its database
    return _write(root, {"study": name, "overrides": best.params, "best_value": best.value,
                         "best_trial": best.number, "trials": len(counted), "trials_planned": tune.trials,
                         "stopped_by_timeout": len(counted) < tune.trials,
                         "pruned": sum(t.state.name == "PRUNED" for t in counted)},
                  {"storage": _redacted(storage_url(params, root)), "mlflow_run_id": run_id})


def _optimize(study, objective, tune, name: str, experiment_id: str):
    """Run the remaining trials, each a nested MLflow run under one "tune" run; returns (run id, best trial)."""
    import mlflow
    import optuna
    from optuna_integration.mlflow import MLflowCallback

    with warnings.catch_warnings():  # deprecated in optuna-integration 4.9 (moving to OptunaHub), works to 6.0
        warnings.simplefilter("ignore", FutureWarning)
        callback = MLflowCallback(tracking_uri=mlflow.get_tracking_uri(), metric_name="val_accuracy",
                                  create_experiment=False,
                                  mlflow_kwargs={"nested": True, "experiment_id": experiment_id})
    remaining = max(tune.trials - len([t for t in budgeted(study) if t.state.is_finished()]), 0)
    with mlflow.start_run(run_name=f"tune {name}", experiment_id=experiment_id,
                          tags={"metanlp.stage": "tune", "optuna.study": name}) as parent:
        if remaining:
            study.optimize(objective, n_trials=remaining, timeout=tune.timeout_s, callbacks=[callback],
                           gc_after_trial=True)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise RuntimeError(f"study {name}: no trial completed within the budget; raise tune.timeout_s")
        best = study.best_trial
        mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
        mlflow.log_metric("best_val_accuracy", best.value)
        run_id = parent.info.run_id
    return run_id, best


OVER_BUDGET = "metanlp.over_budget"


def budgeted(study) -> list:
    """The study's trials within the budget: not those a worker opened after the last one was taken."""
    return [t for t in study.trials if not t.user_attrs.get(OVER_BUDGET)]


def _redacted(url: str) -> str:
    """A database URL without its password, fit for a report."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _write(root: Path, best: dict, where: dict) -> dict:
    """best.json (what was tuned: a DVC output) and the run record (where the study and its MLflow run are)."""
    write_json(root / run_record("tune"), {"study": best["study"], **where})
    write_json(root / BEST, best)
    return best | where


STAGE = Stage(name="tune", run=run, params=PARAMS, deps=(CORPUS, PRETRAINED), outs=("artifacts/tune",), done=(BEST,),
              tracks=True, records=(run_record("tune"),))


