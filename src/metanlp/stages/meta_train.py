"""Corpus files + tuned values -> the meta-trained learner in artifacts/model/ (safetensors + JSON spec),
with its validation history and learning curve."""

from __future__ import annotations

from pathlib import Path

from metanlp.config import DataParams, LearnerSpec, MetaTrainParams, PipelineParams, Provenance
from metanlp.stages.build_corpus import CORPUS, MANIFEST, load_split, split_spaces
from metanlp.stages.common import Stage, read_json, write_json
from metanlp.stages.pretrain import PRETRAINED, starting_encoder

MODEL = "artifacts/model"
TRAINING = f"{MODEL}/training.json"
BEST = "artifacts/tune/best.json"  # the tune stage's record (tune imports this module, not the reverse)


def with_overrides(base: MetaTrainParams, overrides: dict[str, float | int]) -> MetaTrainParams:
    """Apply dotted-key values ("train.lr", "learner.inner_steps") and validate the result."""
    data = base.model_dump(mode="json")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    return MetaTrainParams.model_validate(data)


def train_model(params: MetaTrainParams, root: Path, data: DataParams, out_dir: Path | None,
                show_progress: bool = True, on_validation=None, checkpoint_dir: Path | None = None):
    """Meta-train the learner `params` name on the corpus files (the tune stage's trials use this too)."""
    from metanlp.train import train_learner

    manifest = read_json(root / MANIFEST, "build_corpus")
    drawn_from = {"pool": data.pool} if data.pool is not None else {"split": data.split}
    spec = LearnerSpec(learner=params.learner, encoder=params.encoder, adaptation=params.adaptation,
                       provenance=Provenance(classes=manifest["classes"], train_data=manifest["source"], **drawn_from))
    train, val = load_split(root, "train"), load_split(root, "val")
    return train_learner(spec, train, val, params.train, out_dir, show_progress, checkpoint_dir=checkpoint_dir,
                         on_validation=on_validation,
                         train_spaces=split_spaces(root, "train", train, data.label_spaces),
                         val_spaces=split_spaces(root, "val", val, data.label_spaces))


def run(params: PipelineParams, root: Path, show_progress: bool = True) -> dict:
    from metanlp.reporting import write_training_report

    tuned = read_json(root / BEST, "tune")
    config = with_overrides(starting_encoder(params, root), tuned["overrides"])
    # A checkpoint beside the output lets a retried or preempted run resume where it stopped.
    checkpoint = root / "artifacts" / "model.checkpoint"
    result = train_model(config, root, params.data, root / MODEL, show_progress, checkpoint_dir=checkpoint)
    write_training_report(root / MODEL)
    summary = {"best_val_accuracy": result.best_val_accuracy, "best_episode": result.best_episode,
               "episodes_run": result.episodes_run, "stopped_early": result.stopped_early,
               "config": config.model_dump(mode="json")}
    write_json(root / TRAINING, summary)
    return {"model": str(root / MODEL), **{k: v for k, v in summary.items() if k != "config"}}


STAGE = Stage(name="meta_train", run=run, params=("meta_train", "data.label_spaces"),
              deps=(CORPUS, BEST, PRETRAINED), outs=(MODEL,),
              done=(TRAINING,), plots=(f"{MODEL}/learning_curve.png",))
