"""Add a label head to models already meta-trained, without training them again.

`metanlp train --label-head W` fits the head at the end of meta-training, on the training rows, with the weights
validation kept. This script does the same to a saved ProtoNet: the pool's `meta_train` rows, the model's weights
unchanged, `ProtoNet.learn_from_training_rows` (the one code path; it also recomputes the label base rates from
the same rows, which gives the same rates), and writes the model with the head to --out.

    python benchmarks/label_head.py --model models/arsc128_tail --pool benchmarks/pools/arsc.yaml --weight 2 \
        --out models/arsc128_tail_head2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metanlp.data.load import DataError
from metanlp.data.pool import read_pool, role_set
from metanlp.learners.persistence import load_learner, save_learner
from metanlp.train import HISTORY_FILE


def with_label_head(model: Path, pool: Path, weight: float, out: Path, force: bool = False) -> Path:
    learner = load_learner(model)
    if learner.config.kind != "protonet":
        raise DataError(f"{model}: a label head is for meta-trained ProtoNet models, not {learner.config.kind!r}")
    learner.config = learner.config.model_copy(update={"label_head": weight})
    task_pool, root = read_pool(pool)
    train_set, _ = role_set(task_pool, root, "meta_train")
    learner.learn_from_training_rows(train_set)
    history = model / HISTORY_FILE
    return save_learner(learner, out, force=force,
                        extra_files={HISTORY_FILE: history.read_text()} if history.is_file() else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a meta-trained ProtoNet model")
    parser.add_argument("--pool", type=Path, required=True, help="the pool it was meta-trained on")
    parser.add_argument("--weight", type=float, default=2.0, help="the head's weight (label_head)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="replace --out even if it is not a metanlp model")
    args = parser.parse_args()
    if args.weight <= 0:
        parser.error("--weight must be above 0")
    print(with_label_head(args.model, args.pool, args.weight, args.out, args.force))


if __name__ == "__main__":
    main()
