"""What every stage shares: the stage declaration, the project's folders, params.yaml loading, and JSON
records written atomically."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from metanlp.atomic import write_text_atomic
from metanlp.config import EvaluateParams, PipelineParams, describe_validation_error
from metanlp.data.load import DataError

SOURCE_DIR = "src/metanlp"  # every stage depends on the code; Prefect hashes it, DVC lists it


class StageError(RuntimeError):
    """A stage that cannot go on (bad input, a missing upstream result); retrying it would fail the same way."""


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, declared once in its module: the CLI command, the Prefect task, its cache key and
    its dvc.yaml entry are all made from this.

    Paths are relative to the project root. `done`: files whose absence means the stage must run again even if
    its cache key is known. `inputs`: files that params name (e.g. pretraining text outside data/): hashed into
    the Prefect cache key; DVC sees them through the param. `tracks`: the stage writes to the MLflow tracking
    server, so another server is another result. `records`: what one run of the stage did (MLflow run ids,
    database URLs, timings, absolute paths): git-ignored and not DVC outputs, so that `metanlp run` and
    `dvc repro` of the same inputs write the same outputs and either finds the other's work up to date."""

    name: str
    run: Callable[[PipelineParams, Path], dict]
    params: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    done: tuple[str, ...]
    uncached: tuple[str, ...] = ()  # outputs kept in git rather than the DVC cache
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    inputs: Callable[[PipelineParams, Path], list[Path]] | None = None
    tracks: bool = False
    records: tuple[str, ...] = ()


RUNS = "artifacts/runs"


def run_record(stage: str) -> str:
    """The file of what the last run of `stage` did (see `Stage.records`)."""
    return f"{RUNS}/{stage}.json"


@dataclass(frozen=True)
class Workspace:
    """The project's folders; each stage's own files are named in its declaration."""

    root: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    def source(self, params: PipelineParams) -> Path:
        """The raw corpus file (the pipeline reads a task pool's files instead when data.tasks is set)."""
        return (self.root / params.data.corpus).resolve()


def corpus_file(params: PipelineParams, root: Path) -> list[Path]:
    """The raw corpus params.yaml names, or every file of its task pool (an input of the stages that read
    them, wherever they lie)."""
    from metanlp.data.pool import pool_files

    if params.data.pool is not None:
        return pool_files(params.data.pool, root)
    return [Workspace(root).source(params)]


def dataset_files(evaluate: EvaluateParams, root: Path) -> list[Path]:
    """The files of evaluate.datasets, read at their test split ('default', the embedded corpus, is none)."""
    from metanlp.data.pool import dataset_path

    files = [dataset_path(entry, root, "test") for entry in evaluate.datasets]
    return sorted({Path(f).resolve() for f in files if f != "default"})


def eval_dataset_files(params: PipelineParams, root: Path) -> list[Path]:
    """The stage inputs that evaluate.datasets names (hashed into the Prefect cache key)."""
    return dataset_files(params.evaluate, root)


def load_params(path: str | Path) -> PipelineParams:
    """params.yaml -> validated params; a wrong key or value is named with the file it came from."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {err}") from err
    if raw is None:
        raise DataError(f"{path}: empty; it needs the pipeline's keys (see the params.yaml of the repository)")
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping of stage keys, got {type(raw).__name__}")
    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as err:
        raise DataError(f"{path}: {describe_validation_error(err)}") from err


def params_slice(params: PipelineParams, keys: tuple[str, ...]) -> dict:
    """The part of params.yaml under `keys` (dotted), as plain data."""
    full = params.model_dump(mode="json", by_alias=True)
    picked: dict = {}
    for key in keys:
        value = full
        for part in key.split("."):
            value = value[part]
        picked[key] = value
    return picked


def write_json(path: Path, payload: dict) -> Path:
    """Written atomically: a reader never sees half a file."""
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def read_json(path: Path, stage: str) -> dict:
    if not path.exists():
        raise StageError(f"{path}: missing; run the {stage} stage first")
    return json.loads(path.read_text())
