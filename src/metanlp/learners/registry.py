"""One registry: learner kind -> class. A new learner is a spec in `metanlp.config` and a line here."""

from __future__ import annotations

from metanlp.config import EncoderConfig, LearnerConfig, Provenance, learner_config
from metanlp.encoder import TextEncoder
from metanlp.learners.base import Learner
from metanlp.learners.finetune import FineTune
from metanlp.learners.gradient import MAML, LearnedOptimizer, Leopard, Reptile
from metanlp.learners.logreg import LogisticRegressionHead
from metanlp.learners.memory import MemoryAugmented
from metanlp.learners.protonet import FrozenEncoder, ProtoNet
from metanlp.learners.setfit_peer import SetFitPeer
from metanlp.runtime import seeded

LEARNERS: dict[str, type[Learner]] = {
    "protonet": ProtoNet, "frozen": FrozenEncoder, "finetune": FineTune, "logreg": LogisticRegressionHead,
    "setfit": SetFitPeer,
    # FOMAML, ANIL and Meta-SGD are MAML with the options their specs fix (first order, head only, learned rates).
    "maml": MAML, "fomaml": MAML, "anil": MAML, "metasgd": MAML,
    "reptile": Reptile, "leopard": Leopard, "lstm": LearnedOptimizer, "memory": MemoryAugmented,
}


def build_learner(config: LearnerConfig | str, encoder: TextEncoder | EncoderConfig,
                  provenance: Provenance | None = None, seed: int = 0) -> Learner:
    """The learner `config` specifies (or a kind's defaults) around `encoder`: a built encoder, or a config to
    load the pretrained one. Weights a learner creates (LEOPARD's generator, LoRA adapters, anything a
    checkpoint lacks) are drawn from torch's generator seeded with `seed`, so the same spec builds the same
    learner."""
    if isinstance(config, str):
        config = learner_config(config)
    with seeded(seed):
        if isinstance(encoder, EncoderConfig):
            if getattr(config, "second_order", False):
                # Second-order gradients need attention with a double backward: eager, not flash SDPA.
                encoder = encoder.model_copy(update={"attn_implementation": "eager"})
            encoder = TextEncoder.from_config(encoder)
        return LEARNERS[config.kind](encoder, config, provenance)
