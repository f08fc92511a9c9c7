"""Evaluation -> MLflow: one run with params, metrics, plots, reports and lineage; the model logged as a
pyfunc and registered; alias `challenger` on the new version, `champion` only when it beats the current
champion on the same evaluation episodes (paired per episode). The decision and its reason are recorded in
the run and in artifacts/registry.json. A model identical to a registered version (same spec and weights) is
not registered again: the record names that version.

registry.json holds what the registry decided (a DVC output: a fresh registry given the same model decides
the same); which MLflow run, at which tracking URI, from which commit goes to the run record
(artifacts/runs/register.json), so a `dvc repro` after `metanlp run` finds this stage up to date.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import yaml

from metanlp.atomic import file_digest
from metanlp.config import PipelineParams
from metanlp.evaluation import mean_ci
from metanlp.learners.persistence import SPEC_FILE, WEIGHTS_FILE, kept_beside
from metanlp.stages.build_corpus import MANIFEST
from metanlp.stages.common import Stage, StageError, read_json, run_record, write_json
from metanlp.stages.evaluate import METRICS, RESULTS, TIMINGS, read_timings, timing_metrics
from metanlp.stages.meta_train import BEST, MODEL, TRAINING
from metanlp.stages.validate import REPORT
from metanlp.tracking import tracking

RECORD = "artifacts/registry.json"
RUN = run_record("register")

CHAMPION, CHALLENGER = "champion", "challenger"


PIPELINE_WRITES = ("artifacts", "dvc.lock")  # what the pipeline itself rewrites: not a change to the code or data


def git_commit(root: Path) -> str:
    """HEAD, with `-dirty` when tracked files differ from it, the pipeline's own outputs aside."""
    excluded = [f":(exclude){path}" for path in PIPELINE_WRITES]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                               cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def data_version(root: Path) -> str:
    """The md5 that data.dvc records for the raw corpus folder (the DVC data version)."""
    record = root / "data.dvc"
    if not record.exists():
        return "untracked"
    outs = (yaml.safe_load(record.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "unknown"))


def _flat(prefix: str, value, into: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), inner, into)
    else:
        into[prefix] = value
    return into


def _primary_per_episode(results: dict, primary: str) -> np.ndarray:
    for entry in results["settings"]:
        if entry["setting"] == primary:
            return np.asarray(entry["methods"][results["learner"]]["per_episode"])
    raise StageError(f"evaluation has no {primary!r} setting")


def champion_scores(client, name: str, champion, challenger: dict, params: PipelineParams, root: Path):
    """The champion's per-episode accuracies on the challenger's episodes: read from its run when it was
    evaluated on the same episodes, otherwise measured now on them."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=champion.run_id,
                                                       artifact_path="evaluation/results.json", dst_path=tmp)
            previous = json.loads(Path(path).read_text())
        except Exception:  # an older or foreign run without our evaluation artifact: measure instead
            previous = None
        if previous and previous.get("episodes_id") == challenger["episodes_id"]:
            return _primary_per_episode(previous, params.evaluate.primary), "recorded on the same episodes"
        from metanlp.stages.evaluate import corpus_of, evaluate_on_test

        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}", dst_path=tmp))
        flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
        results = evaluate_on_test(model_dir / flavor["artifacts"]["model"]["path"], root, params.evaluate,
                                   methods=[], show_progress=False, label_spaces=params.data.label_spaces,
                                   corpus=corpus_of(params, root))
        return _primary_per_episode(results, params.evaluate.primary), "re-evaluated on these episodes"


def decide(challenger_scores: np.ndarray, champion_scores_: np.ndarray, min_improvement: float) -> tuple[bool, str]:
    gain, ci = mean_ci(challenger_scores - champion_scores_)
    verdict = gain > min_improvement
    text = (f"paired gain over the champion {100 * gain:+.2f} pp (95% CI ±{100 * ci:.2f}) on "
            f"{len(challenger_scores)} episodes; {'promoted' if verdict else 'champion kept'} "
            f"(needs > {100 * min_improvement:.2f} pp)")
    return verdict, text


def log_model(model_dir: Path, name: str):
    import mlflow

    from metanlp.serving import pyfunc_arguments

    return mlflow.pyfunc.log_model(name="model", registered_model_name=name, **pyfunc_arguments(model_dir))


def log_run_contents(root: Path, params: PipelineParams, training: dict, tuned: dict, metrics: dict) -> None:
    """Params, metrics (with the evaluation's timings, when its run record is here), reports and plots of the
    active run."""
    import mlflow

    flat = _flat("", {"meta_train": training["config"], "evaluate": params.evaluate.model_dump(mode="json"),
                      "tuned": tuned.get("overrides", {}), "data": params.data.model_dump(mode="json")}, {})
    mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})
    metrics = metrics | timing_metrics(read_timings(root))
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
    mlflow.log_metric("best_val_accuracy", training["best_val_accuracy"])
    for name, folder in ((RESULTS, "evaluation"), (RESULTS.replace(".json", ".md"), "evaluation"),
                         (RESULTS.replace(".json", ".png"), "evaluation"), (f"{MODEL}/learning_curve.png", "training"),
                         (f"{MODEL}/history.json", "training"), (REPORT, "validation"),
                         (REPORT.replace(".json", ".md"), "validation"), (BEST, "tune"), (TIMINGS, "evaluation")):
        path = root / name
        if path.exists():
            mlflow.log_artifact(str(path), folder)


DIGEST_TAG = "metanlp.model_md5"


def model_digest(model_dir: Path) -> str:
    """What makes a model this model: its spec, its weights and what its learner keeps beside them (ProtoNet's
    label base rates, a memory learner's memory), not its reports."""
    parts = [file_digest(model_dir / name) for name in (SPEC_FILE, WEIGHTS_FILE)]
    # only those present, so a model without them keeps the digest it was registered under
    parts += kept_beside(model_dir).values()
    return hashlib.md5("".join(parts).encode()).hexdigest()


def identical_version(client, name: str, digest: str):
    """The registered version of `name` whose model has this digest, if any."""
    import mlflow

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    return next((v for v in sorted(versions, key=lambda v: int(v.version)) if v.tags.get(DIGEST_TAG) == digest),
                None)


def alias_version(client, name: str, alias: str) -> str | None:
    import mlflow

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def guard_promotion(client, version: str, results: dict, params: PipelineParams, root: Path) -> tuple[bool, str]:
    """Champion only when the new version beats the current champion on the same episodes."""
    import mlflow

    name = params.register_.model_name
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        champion = None
    if champion is None:
        promoted, reason = True, "first registered version: champion by default"
    else:
        mine = _primary_per_episode(results, params.evaluate.primary)
        theirs, how = champion_scores(client, name, champion, results, params, root)
        promoted, verdict = decide(mine, theirs, params.register_.min_improvement)
        reason = f"against champion v{champion.version} ({how}): {verdict}"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion", reason)
    mlflow.set_tag("metanlp.promotion", reason)
    return promoted, reason


def run(params: PipelineParams, root: Path) -> dict:
    import mlflow
    from mlflow import MlflowClient

    results = read_json(root / RESULTS, "evaluate")
    metrics = read_json(root / METRICS, "evaluate")
    training = read_json(root / TRAINING, "meta_train")
    tuned = read_json(root / BEST, "tune")
    manifest = read_json(root / MANIFEST, "build_corpus")
    reg = params.register_
    commit = git_commit(root)
    lineage = {"data_dvc_md5": data_version(root), "corpus_md5": manifest["source_md5"],
               "optuna_study": str(tuned.get("study")), "episodes_id": results["episodes_id"],
               "metanlp.stage": "register"}
    digest = model_digest(root / MODEL)
    with tracking(reg.tracking_uri, root, reg.experiment) as experiment_id:
        client = MlflowClient()
        same = identical_version(client, reg.model_name, digest)
        if same is not None:  # e.g. `dvc repro` after `metanlp run`: the same model is not a new version
            version, run_id, promoted = str(same.version), same.run_id, False
            reason = f"identical to v{version} (same spec and weights): not registered again"
        else:
            with mlflow.start_run(run_name=f"{results['learner']} {commit[:8]}", experiment_id=experiment_id,
                                  tags={"git_commit": commit, **lineage}) as active:
                log_run_contents(root, params, training, tuned, metrics)
                version = str(log_model(root / MODEL, reg.model_name).registered_model_version)
                client.set_model_version_tag(reg.model_name, version, DIGEST_TAG, digest)
                client.set_registered_model_alias(reg.model_name, CHALLENGER, version)
                promoted, reason = guard_promotion(client, version, results, params, root)
                run_id = active.info.run_id
        record = {"model_name": reg.model_name, "version": version, "promoted": promoted, "reason": reason,
                  "champion_version": alias_version(client, reg.model_name, CHAMPION), "model_md5": digest,
                  **lineage}
        where = {"run_id": run_id, "tracking_uri": mlflow.get_tracking_uri(), "git_commit": commit}
    write_json(root / RUN, where)
    write_json(root / RECORD, record)
    return record | where


def promote(name: str, version: str, tracking_uri: str | None, root: Path) -> str:
    """Manual promotion: move the champion alias to `version` of `name`."""
    import mlflow
    from mlflow import MlflowClient

    with tracking(tracking_uri, root, "metanlp"):
        client = MlflowClient()
        try:
            client.get_model_version(name, version)
        except mlflow.exceptions.MlflowException as err:
            raise StageError(f"model {name!r} has no version {version!r} at {mlflow.get_tracking_uri()}") from err
        before = alias_version(client, name, CHAMPION)
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "promotion", "promoted by hand (metanlp promote)")
        after = alias_version(client, name, CHAMPION)  # read back: a promotion elsewhere may have come after
    was = f" (was v{before})" if before and before != version else ""
    if after != version:
        return f"{name} v{version} was made {CHAMPION}, but v{after} is {CHAMPION} now: another promotion followed"
    return f"{name} v{version} is now {CHAMPION}{was}"


STAGE = Stage(name="register", run=run, params=("evaluate", "register"),
              deps=(RESULTS, METRICS, MODEL, "artifacts/validation", BEST), outs=(), done=(RECORD, RUN),
              uncached=(RECORD,), tracks=True, records=(RUN,))
