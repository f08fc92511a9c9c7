"""Corpus files + tuned values -> the meta-trained learner in artifacts/model/ (safetensors + JSON spec),
with its validation history and learning curve."""

from __future__ import annotations

from pathlib import Path

from metanlp.config import GradientConfig, LearnerSpec, MetaTrainParams, PipelineParams
from metanlp.stages import Workspace, read_json, write_json
from metanlp.stages.build_corpus import load_split
from metanlp.stages.pretrain import starting_encoder


def with_overrides(base: MetaTrainParams, overrides: dict[str, float | int]) -> MetaTrainParams:
    """Apply dotted-key values ("train.lr", "gradient.inner_steps") and validate the result."""
    data = base.model_dump(mode="json")
    if data.get("gradient") is None and any(k.startswith("gradient.") for k in overrides):
        data["gradient"] = GradientConfig.for_algorithm(base.learner).model_dump(mode="json")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    return MetaTrainParams.model_validate(data)


def learner_spec(params: MetaTrainParams, manifest: dict, split) -> LearnerSpec:
    from metanlp.learners import LEARNERS, GradientMetaLearner

    if params.learner not in LEARNERS or not LEARNERS[params.learner].meta_trainable:
        trainable = sorted(n for n, c in LEARNERS.items() if c.meta_trainable)
        raise ValueError(f"meta_train.learner: {params.learner!r} cannot be meta-trained; choose from {trainable}")
    gradient = params.gradient
    if gradient is None and issubclass(LEARNERS[params.learner], GradientMetaLearner):
        gradient = GradientConfig.for_algorithm(params.learner)
    return LearnerSpec(learner=params.learner, encoder=params.encoder, protonet=params.protonet, gradient=gradient,
                       split=split, classes=manifest["classes"], train_data=manifest["source"])


def train_learner(params: MetaTrainParams, root: Path, split, out_dir: Path | None, show_progress: bool = True,
                  on_validation=None, checkpoint_dir: Path | None = None):
    """Build the learner that `params` name and meta-train it on the corpus files."""
    from metanlp.learners import build_learner
    from metanlp.train import meta_train

    manifest = read_json(Workspace(root).corpus / "manifest.json", "build_corpus")
    spec = learner_spec(params, manifest, split)
    learner = build_learner(spec.learner, spec.encoder, spec)
    learner.provenance = {"split": spec.split, "classes": spec.classes, "train_data": spec.train_data}
    return meta_train(learner, load_split(root, "train"), load_split(root, "val"), params.train, out_dir,
                      show_progress, checkpoint_dir=checkpoint_dir, on_validation=on_validation)


def run(params: PipelineParams, root: Path, show_progress: bool = True) -> dict:
    workspace = Workspace(root)
    tuned = read_json(workspace.tune / "best.json", "tune")
    config = with_overrides(starting_encoder(params, root), tuned["overrides"])
    # A checkpoint beside the output lets a retried or preempted run resume where it stopped.
    checkpoint = workspace.artifacts / "model.checkpoint"
    result = train_learner(config, root, params.data.split, workspace.model, show_progress,
                           checkpoint_dir=checkpoint)
    summary = {"best_val_accuracy": result.best_val_accuracy, "best_episode": result.best_episode,
               "episodes_run": result.episodes_run, "stopped_early": result.stopped_early,
               "config": config.model_dump(mode="json")}
    write_json(workspace.model / "training.json", summary)
    return {"model": str(workspace.model), **{k: v for k, v in summary.items() if k != "config"}}
