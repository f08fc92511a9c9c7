"""Weight averaging (a "model soup", Wortsman et al. 2022): models meta-trained from the same pretrained start
with different seeds, averaged tensor by tensor into one model of the same size and speed. Averaging only makes
sense between models of one learner, encoder and shape; anything else is refused, naming the model that differs."""

from __future__ import annotations

from pathlib import Path

import torch

from metanlp.data.load import DataError
from metanlp.learners.base import Learner
from metanlp.learners.persistence import kept_beside, load_learner


def average_learners(directories: list[Path]) -> Learner:
    """The first model with every floating-point tensor replaced by its mean over all the models; integer
    tensors (ids, counts) must agree. Its provenance is the first model's with `averaged` naming them all."""
    if len(directories) < 2:
        raise DataError(f"averaging needs at least two models, got {len(directories)}")
    learners = [load_learner(directory) for directory in directories]
    first = learners[0]
    states = [learner.state_dict() for learner in learners]
    first_beside = kept_beside(directories[0])
    for directory, learner, state in zip(directories[1:], learners[1:], states[1:], strict=True):
        if (learner.config, learner.encoder.config) != (first.config, first.encoder.config):
            raise DataError(f"{directory}: not the learner and encoder of {directories[0]} "
                            f"({learner.config.kind}, {learner.encoder.config.name_or_path} against "
                            f"{first.config.kind}, {first.encoder.config.name_or_path}, or their options differ)")
        beside = kept_beside(directory)  # e.g. label base rates (the same rows give the same)
        differing = sorted(name for name in {*beside, *first_beside} if beside.get(name) != first_beside.get(name))
        if differing:
            raise DataError(f"{directory}: what it keeps beside its weights ({differing}) differs "
                            f"from {directories[0]}'s, and a mean of weights cannot merge it")
        for name, tensor in states[0].items():
            other = state.get(name)
            if other is None or other.shape != tensor.shape:
                raise DataError(f"{directory}: tensor {name!r} is missing or of another shape than in "
                                f"{directories[0]}")
            if not tensor.is_floating_point() and not torch.equal(other, tensor):
                raise DataError(f"{directory}: integer tensor {name!r} differs from {directories[0]}'s")
    averaged = {name: (torch.stack([state[name].float() for state in states]).mean(0).to(tensor.dtype)
                       if tensor.is_floating_point() else tensor)
                for name, tensor in states[0].items()}
    first.load_state_dict(averaged)
    first.provenance = first.provenance.model_copy(update={"averaged": [str(d) for d in directories]})
    return first

