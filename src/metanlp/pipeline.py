"""The Prefect flow: validate -> build_corpus -> pretrain -> tune -> meta_train -> evaluate -> register, each a cached,
retried task around the plain stage function of `metanlp.stages`.

Caching is by content: a stage's key hashes its slice of params.yaml, the bytes of the files it reads and
the metanlp source code, so a re-run with nothing changed takes every stage from the cache, and a change
reruns the stages that read it and those downstream of their outputs (the same rule `dvc repro` applies).
A stage whose outputs were deleted runs again even if its key is cached. Transient failures are retried
with exponential backoff; bad input (a failed validation, a wrong parameter) fails at once.

Prefect's home, database and results live under the project's .prefect/ unless PREFECT_HOME and
PREFECT_LOCAL_STORAGE_PATH say otherwise (`configure_prefect`, called before Prefect is imported).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

from pydantic import ValidationError

from metanlp.data.load import DataError
from metanlp.stages import STAGES, StageError, Workspace, file_digest, load_params, params_slice


def configure_prefect(root: Path) -> None:
    """Keep Prefect's state in the project and offline; must run before `import prefect`."""
    home = (root / ".prefect").resolve()
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(home / "storage"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DVC_NO_ANALYTICS", "1"),
                       ("GX_ANALYTICS_ENABLED", "false"), ("HF_HUB_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)


def stage_inputs(stage: str, workspace: Workspace, source: Path, texts: tuple[Path, ...] = ()) -> list[Path]:
    """The files a stage reads (besides params.yaml): its deps in dvc.yaml, and for pretrain the text files
    params.yaml names (DVC sees those only through the `pretrain.text` param)."""
    return {
        "validate": [source],
        "build_corpus": [source, workspace.validation / "report.json"],
        "pretrain": [workspace.corpus / "train.jsonl", *texts],
        "tune": [workspace.corpus, workspace.pretrained],
        "meta_train": [workspace.corpus, workspace.tune / "best.json", workspace.pretrained],
        "evaluate": [workspace.corpus / "test.jsonl", workspace.model],
        "register": [workspace.evaluation / "results.json", workspace.evaluation / "metrics.json", workspace.model,
                     workspace.validation, workspace.tune / "best.json"],
    }[stage]


def stage_outputs(stage: str, workspace: Workspace) -> list[Path]:
    return {
        "validate": [workspace.validation / "report.json"],
        "build_corpus": [workspace.corpus / "manifest.json"],
        "pretrain": [workspace.pretrained / "pretrain.json"],
        "tune": [workspace.tune / "best.json"],
        "meta_train": [workspace.model / "training.json"],
        "evaluate": [workspace.evaluation / "results.json", workspace.evaluation / "metrics.json"],
        "register": [workspace.registry_record],
    }[stage]


def code_version() -> str:
    package = Path(__file__).resolve().parent
    digest = hashlib.md5()
    for file in sorted(package.rglob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def stage_cache_key(stage: str, params_file: str, root: str) -> str:
    from metanlp.tracking import tracking_uri

    params, workspace = load_params(params_file), Workspace(Path(root))
    from metanlp.stages.pretrain import text_sources

    texts = tuple(Path(t) for t in text_sources(params, workspace.root) if t != "default")
    inputs = {str(p.relative_to(workspace.root) if p.is_relative_to(workspace.root) else p): file_digest(p)
              for p in stage_inputs(stage, workspace, workspace.source(params), texts)}
    key = {"stage": stage, "params": params_slice(params, stage), "inputs": inputs, "code": code_version()}
    if stage in ("tune", "register"):  # they write to a tracking server: another server is another result
        key["tracking"] = tracking_uri(params.register_.tracking_uri, workspace.root)
    return f"{stage}-" + hashlib.md5(json.dumps(key, sort_keys=True).encode()).hexdigest()


def run_stage(stage: str, params_file: str, root: str) -> dict:
    """Run one stage in this process (the module is looked up at call time)."""
    module = importlib.import_module(f"metanlp.stages.{stage}")
    return module.run(load_params(params_file), Path(root))


def is_transient(task, task_run, state) -> bool:
    """Retry what may pass next time (I/O, a busy database); never bad input, which fails the same way."""
    error = getattr(state, "data", None)
    return not isinstance(error, StageError | DataError | ValidationError)


def ensure_raw_data(params_file: Path, root: Path) -> None:
    """On a fresh clone the raw corpus is a DVC-tracked folder not yet in the work tree: check it out from
    the project's DVC remote (kept inside the repository, so this works offline)."""
    params = load_params(params_file)
    if Workspace(root).source(params).exists() or not (root / "data.dvc").exists():
        return
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.pull(targets=[str(root / "data.dvc")])


def build_flow():
    """The flow object (built on call, so importing this module starts nothing)."""
    from prefect import flow, task
    from prefect.tasks import exponential_backoff

    def cache_key(context, parameters) -> str:
        return stage_cache_key(parameters["stage"], parameters["params_file"], parameters["root"])

    stage_task = task(run_stage, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                      retry_jitter_factor=0.5, retry_condition_fn=is_transient, cache_key_fn=cache_key,
                      persist_result=True, result_serializer="json")

    @flow(name="metanlp-train", log_prints=True)
    def train_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
        """Validate the corpus, build the splits, tune, meta-train, evaluate and register a model."""
        root_path = Path(root).resolve()
        params_path = Path(params_file) if Path(params_file).is_absolute() else root_path / params_file
        load_params(params_path)  # a wrong parameter stops the flow before any task
        ensure_raw_data(params_path, root_path)
        workspace, results = Workspace(root_path), {}
        for stage in STAGES:
            missing = not all(p.exists() for p in stage_outputs(stage, workspace))
            results[stage] = stage_task.with_options(name=stage, refresh_cache=missing or None)(
                stage, str(params_path), str(root_path))
        return results

    return train_flow


def deployment(name: str, cron: str, timezone: str, params_file: str, root: str):
    """The scheduled retraining deployment of the flow, served by a Prefect runner (`metanlp schedule`)."""
    from prefect.client.schemas.schedules import CronSchedule

    from metanlp.data.load import DataError

    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValueError as err:
        raise DataError(f"--cron {cron!r}: {err}") from err
    return build_flow().to_deployment(name=name, schedules=[schedule],
                                      parameters={"params_file": params_file, "root": root},
                                      description="scheduled retraining: the whole metanlp pipeline")
