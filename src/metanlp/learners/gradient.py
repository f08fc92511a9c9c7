"""Gradient-based meta-learners, composed of an inner-step rule (`inner_loop`), an encoder split
(`encoder_split`) and a meta-batch execution (`meta_batch`):

- `maml`: second-order MAML (Finn et al., 2017): the query loss is differentiated through the inner steps;
  `fomaml` (first order), `anil` (head only, Raghu et al., 2020) and `metasgd` (learned rates, Li et al.,
  2017) are MAML with the options their specs fix;
- `reptile`: its own outer step, the weights move toward the adapted ones (Nichol et al., 2018);
- `leopard`: the head is generated from the support set, then refined (Bansal et al., 2020);
- `lstm`: the inner steps are taken by a learned, coordinate-wise LSTM optimizer (Ravi & Larochelle, 2017).

The head is a linear layer on unit-norm features, initialised from the support prototypes (Proto-MAML).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metanlp.config import GradientConfig, LeopardConfig, LSTMConfig, MAMLConfig, Provenance, ReptileConfig
from metanlp.data.episodes import Episode
from metanlp.encoder import TextEncoder, TokenBatch, TokenizedTexts
from metanlp.learners.base import Classifier, Learner, check_state, logits_in_chunks, support_targets
from metanlp.learners.encoder_split import EncoderSplit
from metanlp.learners.inner_loop import (
    HEAD,
    CoordinateLSTM,
    InnerRule,
    LearnedRule,
    adapt_fast_weights,
    adapted_parameter_names,
    add_lora_adapters,
    learned_rates,
)
from metanlp.learners.meta_batch import choose_execution
from metanlp.learners.protonet import prototypes


class MAML(Learner):
    meta_trainable = True

    def __init__(self, encoder: TextEncoder, config: GradientConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or MAMLConfig(), provenance)
        config = self.config
        self.log_scale = nn.Parameter(torch.tensor(math.log(config.init_scale)))
        if config.adapt == "lora":
            add_lora_adapters(encoder, config)
        adapted = adapted_parameter_names(encoder, config.adapt, config.top_layers)
        self.split = EncoderSplit(encoder, config)
        self.log_inner_lrs = learned_rates(config, adapted)
        self.rule = InnerRule(config, adapted, self.log_inner_lrs)
        self.execution = choose_execution(config, adapted, self.split.packed)

    @property
    def adapted(self) -> list[str]:
        return self.rule.adapted

    def initial_head(self, h: torch.Tensor, targets: torch.Tensor, n_classes: int):
        """Proto-MAML: class weights are the scaled prototypes, biases zero; step 0 is ProtoNet."""
        weight = self.log_scale.exp() * F.normalize(prototypes(h, targets, n_classes), dim=-1)
        return weight, torch.zeros(*h.shape[:-2], n_classes, device=h.device, dtype=h.dtype, requires_grad=True)

    def inner_loop(self, support: TokenBatch, targets: torch.Tensor, n_classes: int, *, create_graph: bool,
                   track_meta: bool, steps: int | None = None, features=None,
                   tasks: int | None = None) -> dict[str, torch.Tensor]:
        """The fast tensors after adapting on `support` (see `inner_loop.adapt_fast_weights`).

        features: a feature function of the support batch, when the caller already ran the bottom layers."""
        features = features or self.split.feature_fn(support, track_meta=track_meta)
        adapted = set(self.rule.adapted)
        start = {n: p for n, p in self.encoder.named_parameters() if n in adapted}
        return adapt_fast_weights(self.rule, start, features, targets, n_classes, self.initial_head,
                                  steps=self.config.inner_steps if steps is None else steps,
                                  create_graph=create_graph, track_meta=track_meta, tasks=tasks)

    def logits(self, fast: dict[str, torch.Tensor], batch: TokenBatch, features=None) -> torch.Tensor:
        features = features or self.split.feature_fn(batch, track_meta=False)
        h = features({n: fast[n] for n in self.rule.adapted})
        return h @ fast[HEAD[0]].mT + fast[HEAD[1]].unsqueeze(-2)

    def episode_loss(self, tokens: TokenizedTexts, episode: Episode):
        loss, logits = self.batch_loss(tokens, [episode])
        return loss, logits[0]

    def batch_loss(self, tokens: TokenizedTexts, episodes: list[Episode]):
        """Mean query loss over a meta-batch, and each task's query logits."""
        return self.execution.loss(self, tokens, episodes)

    def backward_batch(self, tokens: TokenizedTexts, episodes: list[Episode]):
        return self.execution.backward(self, tokens, episodes)

    def adapt(self, support, labels) -> Classifier:
        classes, targets = support_targets(list(labels))
        tokens = self.tokens(support)
        was_training = self.training
        self.eval()
        with torch.enable_grad():
            fast = self.inner_loop(tokens.batch(), targets, len(classes), create_graph=False, track_meta=False)
        self.train(was_training)
        return self.restore(classes, {n: t.detach().cpu() for n, t in fast.items()})

    def restore(self, classes: list[str], state: dict[str, torch.Tensor]) -> Classifier:
        parameters = dict(self.encoder.named_parameters())
        shapes = {n: tuple(parameters[n].shape) for n in self.rule.adapted if n in parameters}
        shapes.update({HEAD[0]: (len(classes), self.encoder.dim), HEAD[1]: (len(classes),)})
        check_state(state, shapes)
        device = self.encoder.device
        fast = {n: t.to(device) for n, t in state.items()}

        def logits(queries: TokenizedTexts) -> torch.Tensor:
            return logits_in_chunks(self.encoder, queries, lambda batch: self.logits(fast, batch))

        return Classifier(classes, self.encoder, logits, state)


class Leopard(MAML):
    """LEOPARD-style (Bansal et al., 2020): each task's head is generated from its support set, then refined
    by inner steps with learned learning rates.

    A small network maps every support feature h to a correction (dh, b); a class's head row is the learned
    scale times the unit direction of the mean of h + dh over its examples, its bias the mean of b. The
    network only turns the rows (their length is the learned temperature, as in Proto-MAML), so a generator
    that learns fast cannot blow up the logits. Its last layer starts at zero: training starts from Proto-MAML.
    """

    encoder_rate_modules = ("generator",)

    def __init__(self, encoder: TextEncoder, config: LeopardConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or LeopardConfig(), provenance)
        dim = encoder.dim
        self.generator = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim + 1))
        nn.init.zeros_(self.generator[2].weight)
        nn.init.zeros_(self.generator[2].bias)

    def initial_head(self, h: torch.Tensor, targets: torch.Tensor, n_classes: int):
        generated = self.generator(h)
        corrected = prototypes(h + generated[..., :-1], targets, n_classes)
        weight = self.log_scale.exp() * F.normalize(corrected, dim=-1)
        return weight, prototypes(generated[..., -1:], targets, n_classes).squeeze(-1)


class LearnedOptimizer(MAML):
    """Optimizer learning: MAML whose inner steps a `CoordinateLSTM` takes (`inner_loop.LearnedRule`), from the
    preprocessed gradient and loss of each coordinate. It starts as MAML's SGD with the configured rates and is
    meta-trained with the rest, first or second order."""

    def __init__(self, encoder: TextEncoder, config: LSTMConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or LSTMConfig(), provenance)
        self.update_network = CoordinateLSTM(self.config.hidden_size)
        self.rule = LearnedRule(self.config, self.rule.adapted, self.log_inner_lrs, self.update_network)


class Reptile(MAML):
    """Inner SGD on the whole episode (support and query); the outer step moves the weights toward the adapted
    ones: the meta-gradient handed to the outer optimizer is the mean of (start - adapted) over the tasks."""

    def __init__(self, encoder: TextEncoder, config: ReptileConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or ReptileConfig(), provenance)

    def backward_batch(self, tokens: TokenizedTexts, episodes: list[Episode]):
        """Reptile's outer step into `.grad`; returns the adapted weights' query loss and logits (the support
        and query were both trained on, so this is a training loss, not a held-out one)."""
        start = {n: p for n, p in self.encoder.named_parameters() if n in set(self.rule.adapted)}
        share = 1.0 / len(episodes)
        losses, all_logits = [], []
        for episode in episodes:
            rows = np.concatenate([episode.support, episode.query])
            labels = torch.as_tensor(np.concatenate([episode.support_labels, episode.query_labels]))
            fast = self.inner_loop(tokens.batch(rows), labels, len(episode.classes), create_graph=False,
                                   track_meta=False)
            for name, parameter in start.items():
                step = (parameter - fast[name]).detach() * share
                parameter.grad = step if parameter.grad is None else parameter.grad + step
            with torch.no_grad():
                logits = self.logits(fast, tokens.batch(episode.query))
            query = torch.as_tensor(episode.query_labels, device=logits.device)
            losses.append(F.cross_entropy(logits, query))
            all_logits.append(logits)
        return torch.stack(losses).mean(), all_logits

    def batch_loss(self, tokens: TokenizedTexts, episodes: list[Episode]):
        raise NotImplementedError("Reptile has no differentiable meta-loss; its outer step is backward_batch")
