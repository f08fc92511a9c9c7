"""Model tests: data-parallel meta-training (2 gloo ranks under torchrun) ends with the weights one process
reaches on the same total meta-batch and seed, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from distributed_run import run, tiny_learner  # noqa: E402

# float64 and no dropout: what is left is the order of summation (a rank's share, then the all-reduce)
TOLERANCE = 1e-10


def test_two_gloo_ranks_reach_the_single_process_weights_and_only_rank_0_writes(tmp_path):
    single, distributed = tmp_path / "single", tmp_path / "distributed"
    for folder in (single, distributed):
        (folder / "run").mkdir(parents=True)
        (folder / "record").mkdir()
    run(single / "run", single / "record")

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "distributed_run.py"), str(distributed / "run"), str(distributed / "record")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    one, two = load_file(single / "record" / "last.safetensors"), load_file(distributed / "record" / "last.safetensors")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < TOLERANCE, f"largest difference {worst:.3g}"
    start = tiny_learner().state_dict()
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-4, "the weights never moved: the comparison says nothing"

    history_one = json.loads((single / "record" / "history.json").read_text())
    history_two = json.loads((distributed / "record" / "history.json").read_text())
    assert [h["val_accuracy"] for h in history_one] == [h["val_accuracy"] for h in history_two]
    assert [h["train_loss"] for h in history_one[1:]] == pytest.approx([h["train_loss"] for h in history_two[1:]],
                                                                       rel=1e-9)
    saved_one = load_file(single / "run" / "model" / "model.safetensors")
    saved_two = load_file(distributed / "run" / "model" / "model.safetensors")
    assert max((saved_one[k] - saved_two[k]).abs().max().item() for k in saved_one) < TOLERANCE
    assert not (distributed / "run" / "checkpoint").exists()

    assert json.loads((distributed / "record" / "writes-1.json").read_text()) == []  # rank 1 wrote nothing


def test_a_rank_without_a_task_is_refused():
    from metanlp.distributed import World

    with pytest.raises(ValueError, match="tasks_per_step >= 4"):
        World(rank=0, size=4).check_meta_batch(2)
    assert World(rank=1, size=3).share(list(range(8))) == [1, 4, 7]


def test_metanlp_train_starts_its_own_processes(tmp_path):
    """`--processes 2` (the meta_train stage's `train.distributed.processes`): torchrun's launcher, one model."""
    out = tmp_path / "model"
    done = subprocess.run([str(Path(sys.executable).parent / "metanlp"), "train", "--encoder", "tiny-random-bert",
                           "--episodes", "4", "--tasks-per-step", "2", "--val-every", "2", "--val-episodes", "3",
                           "--processes", "2", "--out", str(out), "--quiet"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("model written to") == 1  # rank 0 alone reports
    assert (out / "model.safetensors").exists() and not (tmp_path / "model.checkpoint").exists()
    history = json.loads((out / "history.json").read_text())
    assert [h["episode"] for h in history["history"]] == [0, 2, 4]

    refused = subprocess.run([str(Path(sys.executable).parent / "metanlp"), "train", "--encoder", "tiny-random-bert",
                              "--episodes", "4", "--processes", "2", "--out", str(tmp_path / "other"), "--quiet"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "tasks_per_step >= 2" in refused.stdout + refused.stderr
    assert not (tmp_path / "other").exists()
