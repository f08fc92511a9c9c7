"""Learners by name. Every learner maps a labelled support set to a classifier (see `base`)."""

from __future__ import annotations

from metanlp.config import EncoderConfig, GradientConfig, LearnerSpec
from metanlp.encoder import TextEncoder
from metanlp.learners.base import Classifier, Learner, Predictions, load_learner, read_spec, save_learner
from metanlp.learners.finetune import FineTune
from metanlp.learners.gradient import ANIL, FOMAML, GradientMetaLearner, Leopard, MetaSGD, Reptile
from metanlp.learners.protonet import FrozenEncoder, ProtoNet

LEARNERS: dict[str, type[Learner]] = {
    cls.name: cls for cls in (ProtoNet, FrozenEncoder, FineTune, GradientMetaLearner, FOMAML, ANIL, MetaSGD, Reptile,
                                    Leopard)
}


def build_learner(name: str, encoder: TextEncoder | EncoderConfig, spec: LearnerSpec | None = None) -> Learner:
    """A learner by name around `encoder` (a built encoder, or a config to load the pretrained one)."""
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; choose one of {sorted(LEARNERS)}")
    cls = LEARNERS[name]
    if issubclass(cls, GradientMetaLearner):
        config = (spec.gradient if spec else None) or GradientConfig.for_algorithm(name)
        if isinstance(encoder, EncoderConfig) and not config.first_order:
            # Second-order gradients need attention with a double backward: eager, not flash SDPA.
            encoder = encoder.model_copy(update={"attn_implementation": "eager"})
    if isinstance(encoder, EncoderConfig):
        encoder = TextEncoder.from_config(encoder)
    if issubclass(cls, GradientMetaLearner):
        return cls(encoder, config)
    if cls is FineTune:
        return cls(encoder, spec.finetune if spec else None)
    return cls(encoder, spec.protonet if spec else None)


__all__ = ["LEARNERS", "Classifier", "Learner", "Predictions", "build_learner", "load_learner", "read_spec",
           "save_learner"]
