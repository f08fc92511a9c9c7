"""The pipeline's stages, in data order:

    raw corpus (data/, tracked by data.dvc)
      -> validate      Great Expectations suite, report in artifacts/validation/
      -> build_corpus  class-disjoint train/val/test files in artifacts/corpus/
      -> pretrain      optional MLM / SMLMT / hybrid pretraining, artifacts/pretrained/
      -> tune          Optuna study, best values in artifacts/tune/
      -> meta_train    the meta-trained learner in artifacts/model/
      -> evaluate      every method on the same episodes, artifacts/evaluation/
      -> register      MLflow run, registered version and guarded promotion, artifacts/registry.json

Each stage is a plain function `run(params, root) -> dict` whose inputs and outputs are files under the
project root, so it runs alone (`metanlp stage NAME`), under DVC (dvc.yaml) or as a Prefect task (flows/).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from metanlp.config import PipelineParams, describe_validation_error
from metanlp.data.load import DataError

STAGES = ("validate", "build_corpus", "pretrain", "tune", "meta_train", "evaluate", "register")

# The params.yaml keys each stage reads. dvc.yaml lists the same keys (a test keeps them equal), and the
# Prefect cache key hashes the same slice, so a changed key reruns the same stages under both.
STAGE_PARAMS: dict[str, list[str]] = {
    "validate": ["data", "validate", "meta_train.train.episode", "evaluate.shots", "evaluate.queries"],
    "build_corpus": ["data"],
    "pretrain": ["pretrain", "meta_train.encoder", "meta_train.train.device"],
    "tune": ["meta_train", "tune"],
    "meta_train": ["meta_train"],
    "evaluate": ["evaluate"],
    "register": ["evaluate", "register"],
}


class StageError(RuntimeError):
    """A stage that cannot go on (bad input, failed validation); retrying it would fail the same way."""


@dataclass(frozen=True)
class Workspace:
    """Where every stage reads and writes, relative to the project root."""

    root: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def validation(self) -> Path:
        return self.artifacts / "validation"

    @property
    def corpus(self) -> Path:
        return self.artifacts / "corpus"

    @property
    def pretrained(self) -> Path:
        return self.artifacts / "pretrained"

    @property
    def tune(self) -> Path:
        return self.artifacts / "tune"

    @property
    def model(self) -> Path:
        return self.artifacts / "model"

    @property
    def evaluation(self) -> Path:
        return self.artifacts / "evaluation"

    @property
    def registry_record(self) -> Path:
        return self.artifacts / "registry.json"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    def source(self, params: PipelineParams) -> Path:
        return (self.root / params.data.corpus).resolve()


def load_params(path: str | Path) -> PipelineParams:
    """params.yaml -> validated params; a wrong key or value is named with the file it came from."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping of stage keys, got {type(raw).__name__}")
    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as err:
        raise DataError(f"{path}: {describe_validation_error(err)}") from err


def params_slice(params: PipelineParams, stage: str) -> dict:
    """The part of params.yaml that `stage` reads, as plain data."""
    full = params.model_dump(mode="json", by_alias=True)
    picked: dict = {}
    for key in STAGE_PARAMS[stage]:
        value = full
        for part in key.split("."):
            value = value[part]
        picked[key] = value
    return picked


def file_digest(path: Path) -> str:
    """md5 of a file, or of a folder's relative names and contents; 'missing' when absent."""
    if not path.exists():
        return "missing"
    digest = hashlib.md5()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, payload: dict) -> Path:
    """Written to a temporary name and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_json(path: Path, stage: str) -> dict:
    if not path.exists():
        raise StageError(f"{path}: missing; run the {stage} stage first")
    return json.loads(path.read_text())
