"""Shared fixtures. Unit tests run a tiny random BERT (built in code, offline); tests marked `slow` load the
packaged all-MiniLM-L6-v2 or read the real data sets in ../shared/data."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect, MLflow, DVC and GE stay offline and keep their state out of the home folder.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="metanlp-test-prefect-"))
for _key, _value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
                     ("MLFLOW_DISABLE_TELEMETRY", "true"),
                     ("DVC_NO_ANALYTICS", "1"), ("GX_ANALYTICS_ENABLED", "false"),
                     ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")):
    os.environ.setdefault(_key, _value)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # every test's MLflow is the sqlite file in its own project

from metanlp.config import TINY_ENCODER, EncoderConfig  # noqa: E402
from metanlp.data.load import load_labelled  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def corpus():
    return load_labelled("default")


@pytest.fixture(scope="session")
def tiny_encoder_config() -> EncoderConfig:
    return EncoderConfig(name_or_path=TINY_ENCODER)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the real data sets are expected at {SHARED_DATA} (see README)")
    return SHARED_DATA


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def review_pool_train_args(folder: Path, counts: dict[str, dict[str, int]]) -> list[str]:
    """`metanlp train` arguments (less --out) for one episode of the tiny random BERT on a pool written to
    `folder`: a review-sentiment task per key of `counts` (label -> rows), in a train file (meta_train) and a
    test file of the same rows (meta_val)."""
    for split in ("train", "test"):
        write_jsonl(folder / f"reviews_{split}.jsonl", [
            {"text": f"{'good' if label == 'positive' else 'bad'} {task} {split} {i}", "label": label, "task": task}
            for task, labels in counts.items() for label, n in labels.items() for i in range(n)])
    pool = {"tasks": [{"name": "src", "path": "reviews_train.jsonl", "role": "meta_train", "task_column": "task"},
                      {"name": "val", "path": "reviews_test.jsonl", "role": "meta_val", "task_column": "task"}]}
    (folder / "pool.yaml").write_text(yaml.safe_dump(pool))
    return ["train", "--pool", str(folder / "pool.yaml"), "--encoder", "tiny-random-bert", "--episodes", "1",
            "--ways", "2", "--shots", "1", "--queries", "1", "--val-episodes", "2", "--no-checkpoint", "--quiet"]


@pytest.fixture
def small_jsonl(tmp_path: Path) -> Path:
    """Four classes of six examples each."""
    words = {"weather": "rain", "music": "song", "food": "pizza", "travel": "flight"}
    rows = [{"text": f"{word} example number {i}", "label": label}
            for label, word in words.items() for i in range(6)]
    return write_jsonl(tmp_path / "small.jsonl", rows)


REPO = Path(__file__).resolve().parents[1]

# A pipeline small enough for a unit test: the tiny random BERT, a few steps, two Optuna trials.
TINY_PIPELINE = {
    "meta_train": {"encoder": {"name_or_path": TINY_ENCODER},
                   "train": {"episodes": 6, "val_every": 3, "val_episodes": 4, "warmup_episodes": 2}},
    "tune": {"trials": 2, "episodes": 4, "val_every": 2, "val_episodes": 3},
    "evaluate": {"episodes": 6},
}


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_params(root: Path, **overrides) -> Path:
    import yaml

    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), merge(TINY_PIPELINE, overrides))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A project folder with the embedded corpus as data/corpus.jsonl and a tiny params.yaml."""
    from metanlp.data.load import default_corpus_path

    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "data" / "corpus.jsonl").write_bytes(default_corpus_path().read_bytes())
    write_params(root)
    return root


@pytest.fixture(autouse=True)
def _environment_restored():
    """CLI commands run in-process set their environment defaults (Prefect's folders and log level among them);
    each test gets the environment back as it found it, so no test depends on which ran before."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
