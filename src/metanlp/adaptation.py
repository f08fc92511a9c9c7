"""A meta-trained model + a new domain's support set (+ its unlabeled text) -> a domain-adapted model.

Strategies, applied in this order when combined:
- `selfsup`: a bounded number of masked-LM steps on the domain's unlabeled text (the support texts when
  there is none), with an L2 pull toward the starting weights so the encoder does not drift far;
- `finetune`: encoder fine-tuning with a cosine head initialised from the class prototypes (Proto-MAML
  style); the number of steps is chosen on the support set itself: one shot per class is held out, the
  rest trains, the step with the lowest held-out loss wins (none, if no step beats the start), then all
  shots train for that many steps;
- `fused`: the fine-tuned weights averaged with the starting ones, (1 - a) * start + a * tuned, with a
  chosen on the same held-out shot (model fusion);
- `prototypes`: no weight change (the learner's own adaptation: class means of the support set).

Queries are never seen. Budgets are explicit: steps and seconds per strategy.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metanlp.data.load import DataError
from metanlp.encoder import autocast
from metanlp.learners.base import Learner, support_targets
from metanlp.learners.protonet import prototypes
from metanlp.runtime import seeded

STRATEGIES = ("prototypes", "selfsup", "finetune", "fused")
FUSION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class AdaptBudget:
    finetune_steps: int = 30  # upper bound; the held-out shot picks the number actually used
    one_shot_steps: int = 5  # with one shot per class nothing can be held out: this many steps
    selfsup_steps: int = 20
    seconds: float = 90.0  # wall-clock cap per strategy, all its passes together
    lr: float = 5e-5  # as the fine-tuning baseline (FineTuneConfig.encoder_lr)
    head_lr: float = 1e-2
    anchor: float = 0.1  # selfsup: weight of the L2 pull toward the starting weights
    batch_size: int = 32
    seed: int = 0


@dataclass
class AdaptReport:
    strategies: list[str]
    finetune_steps: int | None = None
    fusion: float | None = None
    held_out_loss: dict = field(default_factory=dict)
    selfsup_steps: int | None = None
    seconds: dict = field(default_factory=dict)


def fuse(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """(1 - factor) * start + factor * tuned, tensor by tensor (integer buffers are taken from `start`)."""
    return {k: (torch.lerp(start[k], tuned[k], factor) if start[k].is_floating_point() else start[k])
            for k in start}


def held_out_split(targets: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One shot of every class held out (the rest trains); None when some class has a single shot."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(targets):
        rows = rng.permutation(np.flatnonzero(targets == c))
        if len(rows) < 2:
            return None
        held.append(rows[0])
        train.extend(rows[1:])
    return np.sort(np.asarray(train)), np.sort(np.asarray(held))


class _Tuner:
    """Fine-tunes a copy of the encoder weights on some support rows; scores other rows on request."""

    def __init__(self, learner: Learner, tokens, targets: torch.Tensor, n_classes: int, budget: AdaptBudget):
        self.encoder, self.tokens, self.targets, self.n_classes, self.budget = (
            learner.encoder, tokens, targets, n_classes, budget)
        self.start = {k: v.detach().clone() for k, v in self.encoder.named_parameters()}

    def embed(self, weights, rows) -> torch.Tensor:
        with autocast(self.encoder.device):
            return F.normalize(functional_call(self.encoder, weights, (self.tokens.batch(rows),)).float(), dim=-1)

    def train(self, rows: np.ndarray, steps: int, score_rows: np.ndarray | None = None,
              deadline: float | None = None):
        """Returns the tuned weights, the head, the held-out loss after every step (if scoring) and the steps
        run: no step starts after `deadline` (a `time.perf_counter()` value), so fewer may run."""
        b = self.budget
        weights = {k: v.clone().requires_grad_() for k, v in self.start.items()}
        head = self.prototype_head(rows).requires_grad_()
        optimizer = torch.optim.AdamW([{"params": list(weights.values()), "lr": b.lr},
                                       {"params": [head], "lr": b.head_lr}], weight_decay=0.0)
        rng = np.random.default_rng(b.seed)
        scores, done = [], 0
        for _ in range(steps):
            batch = rows if len(rows) <= b.batch_size else rng.choice(rows, size=b.batch_size, replace=False)
            loss = F.cross_entropy(self.embed(weights, batch) @ head.T, self.targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if score_rows is not None:
                scores.append(self.loss(weights, head, score_rows))
            if deadline is not None and time.perf_counter() > deadline:
                break
        return {k: v.detach() for k, v in weights.items()}, head.detach(), scores, done

    def prototype_head(self, rows: np.ndarray) -> torch.Tensor:
        """Proto-MAML head: the starting encoder's class prototypes of `rows`, unit norm, temperature 10."""
        with torch.no_grad():
            protos = prototypes(self.embed(self.start, rows), self.targets[rows], self.n_classes)
        return F.normalize(protos, dim=-1) * 10.0

    def loss(self, weights, head, rows) -> float:
        """Held-out cross-entropy: finer than accuracy on a handful of held-out shots."""
        with torch.no_grad():
            return float(F.cross_entropy(self.embed(weights, rows) @ head.T, self.targets[rows]))


def domain_adapt(learner: Learner, support: list[str], labels: list[str], unlabeled: list[str] | None = None,
                 strategies: list[str] | tuple[str, ...] = ("finetune",), budget: AdaptBudget = AdaptBudget()
                 ) -> tuple[Learner, AdaptReport]:
    """A copy of `learner` whose encoder is adapted to the support set's domain; the learner is unchanged."""
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        raise DataError(f"unknown adaptation strategy {unknown or strategies}; choose from {list(STRATEGIES)}")
    if "fused" in strategies and "finetune" not in strategies:
        strategies = [*strategies, "finetune"]  # fusion mixes fine-tuned weights with the start
    with seeded(budget.seed):  # dropout while tuning draws from torch's generator
        return _domain_adapt(learner, support, labels, unlabeled, strategies, budget)


def _domain_adapt(learner, support, labels, unlabeled, strategies, budget) -> tuple[Learner, AdaptReport]:
    adapted = copy.deepcopy(learner).eval()
    report = AdaptReport(strategies=[s for s in STRATEGIES if s in strategies])
    if "selfsup" in strategies:
        from metanlp.pretrain import mlm_pretrain

        started = time.perf_counter()
        texts = list(unlabeled) if unlabeled else list(support)
        losses = mlm_pretrain(adapted.encoder, texts, budget.selfsup_steps, lr=budget.lr,
                              batch_size=min(16, len(texts)), seed=budget.seed, show_progress=False,
                              anchor=budget.anchor, deadline=started + budget.seconds)
        report.selfsup_steps, report.seconds["selfsup"] = len(losses), time.perf_counter() - started
    if "finetune" in strategies:
        started = time.perf_counter()
        deadline = started + budget.seconds  # for both passes: choosing the steps gets half, the final pass the rest
        classes, targets = support_targets(list(labels))
        tokens = adapted.encoder.tokenize(list(support))
        tuner = _Tuner(adapted, tokens, targets.to(adapted.encoder.device), len(classes), budget)
        split = held_out_split(targets.numpy(), budget.seed)
        factor = 1.0
        if split is None:  # one shot: nothing to hold out
            steps, factor = budget.one_shot_steps, (0.5 if "fused" in strategies else 1.0)
        else:
            fit, held = split
            tuned, head, losses, _ = tuner.train(fit, budget.finetune_steps, score_rows=held,
                                              deadline=started + budget.seconds / 2)
            before = tuner.loss(tuner.start, tuner.prototype_head(fit), held)
            report.held_out_loss = {"start": before, "best": min(losses)}
            steps = int(np.argmin(losses)) + 1 if min(losses) < before else 0
            if "fused" in strategies and steps:
                fused_losses = [tuner.loss(fuse(tuner.start, tuned, a), head, held) for a in FUSION_GRID]
                report.held_out_loss["fused"] = dict(zip(map(str, FUSION_GRID), fused_losses, strict=True))
                factor = FUSION_GRID[int(np.argmin(fused_losses))]
        weights = tuner.start
        if steps:
            tuned, _, _, steps = tuner.train(np.arange(len(tokens)), steps, deadline=deadline)
            weights = fuse(tuner.start, tuned, factor)
        adapted.encoder.load_state_dict({**adapted.encoder.state_dict(), **weights})
        report.finetune_steps, report.fusion = steps, (factor if "fused" in strategies else None)
        report.seconds["finetune"] = time.perf_counter() - started
    return adapted, report



class DomainAdaptedLearner(Learner):
    """A learner whose every `adapt` first adapts the encoder to the support set's domain, so `evaluate`
    compares strategies on the same episodes (the time shown as adaptation ms includes it)."""

    def __init__(self, base: Learner, strategies: list[str], budget: AdaptBudget = AdaptBudget(),
                 unlabeled: list[str] | None = None) -> None:
        super().__init__(base.encoder, base.config, base.provenance)
        self.base, self.strategies, self.budget, self.unlabeled = base, list(strategies), budget, unlabeled

    @property
    def name(self) -> str:
        return f"{self.base.name}+{'+'.join(self.strategies)}"

    def adapt(self, support, labels):
        texts = support.texts if hasattr(support, "texts") else list(support)
        adapted, _ = domain_adapt(self.base, texts, list(labels), self.unlabeled, self.strategies, self.budget)
        classifier = adapted.adapt(texts, list(labels))
        classifier.state = None  # it lives on an encoder tuned to this support set: only adapting again rebuilds it
        return classifier
