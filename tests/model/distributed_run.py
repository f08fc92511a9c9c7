"""One meta-training run, in one process or as a rank of `torchrun` (the distributed-training test starts it).

    python tests/model/distributed_run.py RUN_DIR RECORD_DIR

Trains a tiny float64 FOMAML without dropout (so ranks draw no random numbers that a single process would draw
in another order) to the end of its last step, stopping there as a preemption would; keeps the last weights
in RECORD_DIR; then runs again from the checkpoint, which saves the best weights to RUN_DIR/model. On ranks
other than 0, Python's audit hook records every file this process creates, writes, renames or deletes under
RUN_DIR (RECORD_DIR/writes-RANK.json).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from torch import nn

from metanlp.config import EncoderConfig, EpisodeConfig, SplitConfig, TrainConfig, learner_config
from metanlp.data.load import load_labelled
from metanlp.data.splits import split_classes
from metanlp.distributed import joined
from metanlp.learners import build_learner
from metanlp.train import TrainingInterrupted, meta_train

CONFIG = TrainConfig(episodes=6, tasks_per_step=4, val_every=3, val_episodes=4, warmup_episodes=0, lr=1e-3,
                     patience=10, seed=3, device="cpu", episode=EpisodeConfig(ways=3, shots=2, queries=2),
                     val_episode=EpisodeConfig(ways=3, shots=1, queries=2))
# audit events that change the file tree (shutil.move and copies end in these or in "open")
WRITING = ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree")


def tiny_learner():
    learner = build_learner(learner_config("fomaml", inner_steps=1, top_layers=1),
                            EncoderConfig(name_or_path="tiny-random-bert", attn_implementation="eager"))
    learner.double()
    config = learner.encoder.model.config  # the packed layers read their dropout from the config
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    for module in learner.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return learner


def watch_writes(under: Path, writes: list) -> None:
    prefix = str(under)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        else:
            path, writing = args[0] if args else None, event in WRITING
        if writing and isinstance(path, str | os.PathLike) and str(path).startswith(prefix):
            writes.append([event, str(path)])

    sys.addaudithook(hook)


def run(run_dir: Path, record_dir: Path) -> None:
    corpus = load_labelled("default")
    split = split_classes(corpus, SplitConfig(by="random", sizes=(24, 6, 6), seed=0))
    train, val = corpus.with_classes(split.train), corpus.with_classes(split.val)
    writes: list = []
    with joined("cpu") as world:
        if not world.main:
            watch_writes(run_dir, writes)
        learner = tiny_learner()
        checkpoint = run_dir / "checkpoint"
        try:
            meta_train(learner, train, val, CONFIG, show_progress=False, checkpoint_dir=checkpoint,
                       stop_after=CONFIG.episodes)
        except TrainingInterrupted:
            pass
        if world.main:
            shutil.copy(checkpoint / "weights.safetensors", record_dir / "last.safetensors")
        world.barrier()
        result = meta_train(tiny_learner(), train, val, CONFIG, run_dir / "model", show_progress=False,
                            checkpoint_dir=checkpoint)
        if world.main:
            (record_dir / "history.json").write_text(json.dumps(result.history))
        else:
            (record_dir / f"writes-{world.rank}.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    run(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
