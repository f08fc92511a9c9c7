"""The one learner interface: a mapping from a labelled support set to a classifier.

    classifier = learner.adapt(support_texts, support_labels)
    predictions = classifier.predict(query_texts)

Meta-trainable learners also give `backward_batch` (the meta-gradient of a meta-batch) for the training
loop. A learner is built from its spec (`metanlp.config.LearnerConfig`) by the registry, and saved and
loaded by `persistence`; this module knows neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metanlp.config import DefaultAdaptation, LearnerSpec, Provenance
from metanlp.data.episodes import Episode
from metanlp.data.load import DataError, LabelledTexts
from metanlp.encoder import TextEncoder, TokenBatch, TokenizedTexts


@dataclass(frozen=True)
class Predictions:
    labels: list[str]
    scores: np.ndarray  # [texts, classes] probabilities
    classes: list[str]

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """The k best (class, probability) pairs of each text, best first."""
        order = np.argsort(-self.scores, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(row[j])) for j in best] for row, best in zip(self.scores, order, strict=True)]


class Classifier:
    """What `adapt` returns: scores texts over the support set's classes.

    `state`: the tensors that, with the learner's own weights, make this classifier (prototypes, a head, fast
    weights), so `Learner.restore` can rebuild it without adapting again; None when only adapting again can
    (the whole encoder was tuned)."""

    def __init__(self, classes: list[str], encoder: TextEncoder,
                 logits_fn: Callable[[TokenizedTexts], torch.Tensor],
                 state: dict[str, torch.Tensor] | None = None) -> None:
        self.classes = classes
        self.encoder = encoder
        self._logits = logits_fn
        self.state = state

    def predict(self, texts: list[str] | TokenizedTexts) -> Predictions:
        tokens = texts if isinstance(texts, TokenizedTexts) else self.encoder.tokenize(list(texts))
        with torch.no_grad():
            scores = torch.softmax(self._logits(tokens).float(), dim=-1).cpu().numpy()
        return Predictions([self.classes[i] for i in scores.argmax(axis=1)], scores, self.classes)


def logits_in_chunks(encoder: TextEncoder, queries: TokenizedTexts,
                     logits_of: Callable[[TokenBatch], torch.Tensor], batch_size: int = 128) -> torch.Tensor:
    """Query logits batch by batch, without gradients or dropout (the encoder's mode is restored after)."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            chunks = [logits_of(queries.batch(np.arange(start, min(start + batch_size, len(queries)))))
                      for start in range(0, len(queries), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(chunks).cpu()


def support_targets(labels: list[str]) -> tuple[list[str], torch.Tensor]:
    """Class names in first-seen-sorted order and each support row's position among them."""
    if not labels:
        raise DataError("the support set is empty")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"the support set has one class ({classes[0]!r}); a classifier needs at least two")
    position = {c: i for i, c in enumerate(classes)}
    return classes, torch.tensor([position[label] for label in labels])


def check_state(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse an adapted state whose tensors are not the ones (names and shapes) this learner makes."""
    if set(state) != set(shapes):
        raise DataError(f"adapted state: tensors {sorted(state)[:5]} are not the expected {sorted(shapes)[:5]}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != tuple(shape):
            raise DataError(f"adapted state: {name!r} has shape {tuple(state[name].shape)}, expected {tuple(shape)}")


class Learner(nn.Module):
    """Base class. Subclasses implement `adapt`, and if meta-trainable, `episode_loss` (or `backward_batch`).

    `config` is the learner's spec (its `kind` names it); `provenance` says where its weights came from.
    """

    meta_trainable: bool = False
    # Submodules meta-trained at the encoder's learning rate: networks, unlike a temperature or inner rates,
    # which take the faster `scale_lr`.
    encoder_rate_modules: tuple[str, ...] = ()
    # Names `save_extra` may write beside the weights (files or folders): part of what makes a model this model,
    # so the registry's digest covers them where present.
    saved_beside: tuple[str, ...] = ()

    def __init__(self, encoder: TextEncoder, config, provenance: Provenance | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = config
        self.provenance = provenance or Provenance()
        self.adaptation: DefaultAdaptation | None = None  # what strategy "default" tunes first (learner.json)

    @property
    def name(self) -> str:
        return self.config.kind

    def tokens(self, texts: list[str] | TokenizedTexts) -> TokenizedTexts:
        return texts if isinstance(texts, TokenizedTexts) else self.encoder.tokenize(list(texts))

    def adapt(self, support: list[str] | TokenizedTexts, labels: list[str]) -> Classifier:
        raise NotImplementedError

    def restore(self, classes: list[str], state: dict[str, torch.Tensor]) -> Classifier:
        """The classifier `adapt` made, rebuilt from its `state` (see `Classifier.state`)."""
        raise NotImplementedError(f"learner {self.name!r} keeps no adapted state; adapt again")

    def episode_loss(self, tokens: TokenizedTexts, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and query logits of one training episode (support and query rows of `tokens`)."""
        raise NotImplementedError(f"learner {self.name!r} is not meta-trainable")

    def batch_loss(self, tokens: TokenizedTexts, episodes: list[Episode]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean loss over a meta-batch of episodes, and each episode's query logits."""
        losses, logits = zip(*(self.episode_loss(tokens, e) for e in episodes), strict=True)
        return torch.stack(losses).mean(), list(logits)

    def backward_batch(self, tokens: TokenizedTexts, episodes: list[Episode]):
        """Accumulate the meta-gradient of a meta-batch into `.grad`; returns the loss (detached) and logits."""
        loss, logits = self.batch_loss(tokens, episodes)
        loss.backward()
        return loss.detach(), [lg.detach() for lg in logits]

    def learn_from_training_rows(self, data: LabelledTexts) -> None:
        """What the learner takes from its meta-training rows themselves rather than by gradient (ProtoNet's
        label base rates); called once, after meta-training."""

    def save_extra(self, directory: Path) -> None:
        """Write what the learner keeps beside its weights (e.g. an episodic memory) into the model folder."""

    def load_extra(self, directory: Path) -> None:
        """Read back what `save_extra` wrote, after the weights are loaded."""

    def spec(self) -> LearnerSpec:
        return LearnerSpec(learner=self.config, encoder=self.encoder.config, provenance=self.provenance,
                           adaptation=self.adaptation)
