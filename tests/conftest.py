"""Shared fixtures. Unit tests run a tiny random BERT (built in code, offline); tests marked `slow` load the
packaged all-MiniLM-L6-v2 or read the real data sets in ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture
def small_jsonl(tmp_path: Path) -> Path:
    """Four classes of six examples each."""
    words = {"weather": "rain", "music": "song", "food": "pizza", "travel": "flight"}
    rows = [{"text": f"{word} example number {i}", "label": label}
            for label, word in words.items() for i in range(6)]
    return write_jsonl(tmp_path / "small.jsonl", rows)
