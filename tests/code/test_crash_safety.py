"""Crash safety: `metanlp train` killed (SIGKILL) at every step of writing its checkpoint and its model. The
output path always holds a complete old or new model, the next run resumes to the same weights as an
uninterrupted run, and what the killed run left beside its folders is cleaned. Fault points, not timing luck:
METANLP_FAULT names the write step at which the process kills itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metanlp.atomic import FAULT_ENV
from metanlp.learners import build_learner, load_learner, save_learner

TRAIN = [sys.executable, "-m", "metanlp.cli", "train", "--encoder", "tiny-random-bert", "--episodes", "6",
         "--val-every", "2", "--val-episodes", "3", "--lr", "1e-3", "--quiet"]


def train(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([*TRAIN, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted") / "model"
    done = train(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def old_model(tmp_path_factory, tiny_encoder_config) -> Path:
    """A model already at the output path: a crash must never leave less than it."""
    learner = build_learner("protonet", tiny_encoder_config)
    with torch.no_grad():
        learner.log_scale.add_(0.5)
    return save_learner(learner, tmp_path_factory.mktemp("old") / "model")


@pytest.mark.parametrize("point", [
    "model.checkpoint.staged@2",   # the second checkpoint written, not yet swapped in
    "model.checkpoint.swapped@2",  # swapped in, the previous one not yet removed
    "model.staged",                # the final model written, not yet swapped in
    "model.swapped",               # swapped in, the old model not yet removed
])
def test_a_kill_at_any_write_step_loses_nothing_and_resumes_to_the_same_weights(tmp_path, reference, old_model,
                                                                                point):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(old_model, out)
    killed = train(out, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    load_learner(out)  # complete: it loads
    left = load_file(str(out / "model.safetensors"))
    assert same(left, load_file(str(old_model / "model.safetensors"))) or same(left, reference)
    assert any(p.name.startswith(".model") for p in tmp_path.iterdir())  # the kill left something behind

    resumed = train(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same(load_file(str(out / "model.safetensors")), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # leftovers cleaned, checkpoint done with


def same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_leftovers_of_a_dead_writer_are_cleaned_and_a_retired_model_is_put_back(tmp_path):
    """Where the filesystem has no atomic exchange, the swap is two renames; a kill between them leaves only
    the retired copy, which the next start puts back. A live writer's staging folder is left alone."""
    from metanlp.atomic import clean_leftovers

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".model.old-{dead}").mkdir()
    (tmp_path / f".model.old-{dead}" / "learner.json").write_text("{}")
    (tmp_path / f".model.staging-{dead}-abc").mkdir()
    (tmp_path / f".model.staging-{os.getpid()}-xyz").mkdir()  # this process: a writer still at work
    (tmp_path / ".model.checkpoint.staging-1-q").mkdir()  # another folder's leftover: not this one's to touch
    clean_leftovers(tmp_path / "model")
    assert (tmp_path / "model" / "learner.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.checkpoint.staging-1-q",
                                                          f".model.staging-{os.getpid()}-xyz", "model"]
