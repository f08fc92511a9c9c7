"""A meta-trained model + a new domain's support set (+ its unlabeled text) -> a domain-adapted model.

Strategies, applied in this order when combined:
- `selfsup`: a bounded number of masked-LM steps on the domain's unlabeled text (the support texts when
  there is none), with an L2 pull toward the starting weights so the encoder does not drift far;
- `finetune`: encoder fine-tuning with a cosine head initialised from the class prototypes (Proto-MAML
  style); the number of steps is chosen on the support set itself: one shot of each class that has two or
  more is held out, the rest trains, and the weights at the step with the lowest held-out loss are kept (the
  start, if no step beats it); with `AdaptBudget.refit` all shots then train again for that many steps;
- `contrastive`: SetFit-style contrastive fine-tuning of the encoder, started from the meta-learned weights:
  a supervised contrastive loss (same-class support rows together, others apart) on class-balanced batches
  of classes at random, or (`AdaptBudget.contrastive_batches = "nearest"`) each a class and the classes
  nearest it under the starting weights, the confusions of a fine-grained label space; no head is trained,
  the learner's own adaptation (prototypes) then runs on the tuned encoder. The steps are chosen as for
  `finetune`, by the nearest-prototype loss of the held-out shot, checked every few steps;
- `fused`: the fine-tuned weights averaged with the starting ones, (1 - a) * start + a * tuned, with a
  chosen on the same held-out shot (model fusion);
- `prototypes`: no weight change (the learner's own adaptation: class means of the support set);
- `transductive`: no weight change either, and the only strategy that reads the texts being classified (never
  their labels): the prototypes are refined by soft k-means over the query embeddings (Ren et al., 2018), with
  the batch's class proportions estimated alongside (EM of the mixture, Saerens et al., 2002) when it has enough
  texts per class, so a text's prediction depends on the other texts predicted with it. Only when asked for.

Budgets are explicit: steps and seconds per strategy. `contrastive` and `finetune` may tune only the top layers
(`AdaptBudget.top_layers`): the layers below then run once per support set, not at every step and check, so the
same seconds buy several times the steps.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metanlp.config import GradientConfig
from metanlp.data.load import DataError, quote
from metanlp.encoder import TokenizedTexts, autocast
from metanlp.learners.base import Classifier, Learner, support_targets
from metanlp.learners.encoder_split import EncoderSplit
from metanlp.learners.protonet import (
    ProtoNet,
    prototype_logits,
    prototypes,
    query_logits,
    refine_prototypes,
    supervised_contrastive_loss,
)
from metanlp.runtime import seeded

STRATEGIES = ("prototypes", "selfsup", "contrastive", "finetune", "fused", "transductive")
ENCODER_STRATEGIES = ("selfsup", "contrastive", "finetune", "fused")  # those that change the encoder's weights
FUSION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
HELD_OUT_SCALES = (5.0, 10.0, 20.0, 40.0, 80.0)  # cosine temperatures the contrastive held-out loss is taken at
CONTRASTIVE_BATCHES = ("nearest", "random")  # AdaptBudget.contrastive_batches


class BudgetError(DataError):
    """An `AdaptBudget` value out of range; `field` names it, so an entry point can say it in its own words."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class AdaptBudget:
    finetune_steps: int = 30  # upper bound; the held-out shot picks the number actually used
    one_shot_steps: int = 5  # with one shot of every class nothing can be held out: this many steps
    selfsup_steps: int = 20
    contrastive_steps: int = 40  # upper bound, as finetune_steps
    contrastive_every: int = 5  # the held-out shot is scored every this many contrastive steps
    contrastive_temperature: float = 0.1
    # contrastive: which classes share a batch. "nearest": one class and those whose prototypes (under the starting
    # weights) are nearest it, hard negatives (+0.9 / +1.2 pp on 181 COVID intents at 5 / 10 shots, -0.7 to -1.9 on
    # GoEmotions' 28 emotions: README "Hard-negative batches"); "random": classes at random. Only a label space
    # with more classes than a batch holds (batch_size / 4) sees a difference: with fewer, both take the same batches.
    contrastive_batches: str = "random"
    transductive_steps: int = 1  # soft k-means iterations over the queries
    # estimate the batch's class proportions with the prototypes (a mixture's EM), not assume them equal, when
    # the batch has at least this many texts per class (with fewer the estimate runs to a few hub classes); 0: never
    transductive_proportion_rows: int = 50
    # refine only when the support's leave-one-out loss says the queries help (off: always refine)
    transductive_check: bool = True
    seconds: float = 90.0  # wall-clock cap per strategy, all its passes together
    lr: float = 5e-5  # as the fine-tuning baseline (FineTuneConfig.encoder_lr)
    head_lr: float = 1e-2
    anchor: float = 0.1  # selfsup: weight of the L2 pull toward the starting weights
    batch_size: int = 32
    # contrastive and finetune tune only the top N encoder layers, the ones below run once per support set (BERT
    # family; other encoders tune everything); None: every weight
    top_layers: int | None = None
    # on: after the steps are chosen on the held-out shot, train again on every row for that many steps (half the
    # seconds each pass); off: keep the choosing pass's weights at its best step, the whole budget for that one
    # pass (as accurate in the mean on every suite measured, and faster: README "One pass the default")
    refit: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise BudgetError("seconds", f"{self.seconds} is not a positive number of seconds")
        if self.top_layers is not None and self.top_layers < 1:
            raise BudgetError("top_layers", f"{self.top_layers} is not a number of layers (1 or more)")
        if self.contrastive_batches not in CONTRASTIVE_BATCHES:
            raise BudgetError("contrastive_batches", f"unknown {quote(self.contrastive_batches)}; choose from "
                                                     f"{list(CONTRASTIVE_BATCHES)}")


@dataclass
class AdaptReport:
    strategies: list[str]
    finetune_steps: int | None = None
    fusion: float | None = None
    held_out_loss: dict = field(default_factory=dict)
    selfsup_steps: int | None = None
    contrastive_steps: int | None = None
    seconds: dict = field(default_factory=dict)


def fuse(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """(1 - factor) * start + factor * tuned, tensor by tensor (integer buffers are taken from `start`)."""
    return {k: (torch.lerp(start[k], tuned[k], factor) if start[k].is_floating_point() else start[k])
            for k in start}


def held_out_split(targets: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One shot of every class that has two or more held out (the rest trains, a class's single shot included:
    real label spaces have rare classes, and one of them must not stop the tuning of all the others); None when
    every class has a single shot."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(targets):
        rows = rng.permutation(np.flatnonzero(targets == c))
        if len(rows) > 1:
            held.append(rows[0])
            rows = rows[1:]
        train.extend(rows)
    if not held:
        return None
    return np.sort(np.asarray(train)), np.sort(np.asarray(held))


class _Tuner:
    """Fine-tunes a copy of the encoder weights on some support rows; scores other rows on request.

    Objective `head`: cross-entropy through a cosine head started at the class prototypes (Proto-MAML).
    Objective `contrastive`: the supervised contrastive loss on class-balanced batches, no head; the held-out
    rows are then scored against the prototypes of the training rows under the tuned weights."""

    def __init__(self, learner: Learner, tokens, targets: torch.Tensor, n_classes: int, budget: AdaptBudget,
                 objective: str = "head"):
        self.encoder, self.tokens, self.targets, self.n_classes, self.budget, self.objective = (
            learner.encoder, tokens, targets, n_classes, budget, objective)
        self.split, self.bottom_states = None, None
        if budget.top_layers is not None:
            split = EncoderSplit(self.encoder, GradientConfig(adapt="top", top_layers=budget.top_layers, packed=False))
            if split.n_bottom is not None:
                self.split, self.bottom_states = split, self.run_bottom(split)
        tuned = ("",) if self.split is None else tuple(  # name prefixes of the weights that are tuned
            f"model.encoder.layer.{i}." for i in range(self.split.n_bottom, len(self.encoder.model.encoder.layer)))
        self.start = {k: v.detach().clone() for k, v in self.encoder.named_parameters() if k.startswith(tuned)}
        self.start_prototypes: dict[bytes, torch.Tensor] = {}  # by rows: the held-out check and batching share them

    @torch.no_grad()
    def run_bottom(self, split: EncoderSplit, chunk: int = 128) -> torch.Tensor:
        """The token states of every support row after the layers that stay fixed, padded to the longest row:
        [rows, width, hidden]."""
        states = None
        for rows in self.tokens.chunks_by_length(np.arange(len(self.tokens)), chunk):
            hidden, _ = split.bottom(self.tokens.batch(rows))
            if states is None:
                states = hidden.new_zeros(len(self.tokens), self.tokens.input_ids.shape[1], hidden.shape[-1])
            states[torch.as_tensor(rows), : hidden.shape[1]] = hidden
        return states

    def embed(self, weights, rows) -> torch.Tensor:
        batch = self.tokens.batch(rows)
        if self.split is None:
            with autocast(self.encoder.device):
                return F.normalize(functional_call(self.encoder, weights, (batch,)).float(), dim=-1)
        from transformers.masking_utils import create_bidirectional_mask

        attention_mask = batch.attention_mask.to(self.bottom_states.device)
        hidden = self.bottom_states[torch.as_tensor(rows, device=attention_mask.device), : attention_mask.shape[1]]
        mask = create_bidirectional_mask(config=self.encoder.model.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)
        return self.split.top(weights, hidden, mask, attention_mask).float()

    @torch.no_grad()
    def embed_rows(self, weights, rows, chunk: int = 128) -> torch.Tensor:
        """`embed` without gradients for many rows (a held-out check, the prototypes), in chunks of rows sorted by
        length: one batch of every support row is padded to the longest of them (about 5x the time on 1,810
        COVID questions, whose mean is a quarter of the longest)."""
        rows = np.asarray(rows)
        out = None
        for part in self.tokens.chunks_by_length(rows, chunk):
            embedded = self.embed(weights, rows[part])
            if out is None:  # as wide as `embed` gives (a subclass may embed in a space of its own)
                out = embedded.new_empty(len(rows), embedded.shape[1])
            out[torch.as_tensor(part, device=out.device)] = embedded
        return out

    def class_groups(self, rows: np.ndarray) -> list[np.ndarray]:
        """The rows of each class that has at least two of them (a row alone in its class has no positive)."""
        row_targets = self.targets[rows].cpu().numpy()
        return [group for group in (rows[row_targets == c] for c in np.unique(row_targets)) if len(group) >= 2]

    def nearest_classes(self, rows: np.ndarray, by_class: list[np.ndarray]) -> np.ndarray:
        """[groups, groups]: for each group of `by_class` (a class's rows), the groups by how near their
        classes' prototypes of `rows` are to its own under the starting weights (cosine), nearest first."""
        protos = self.prototype_head(rows, scale=1.0)
        own = protos[torch.as_tensor([int(self.targets[group[0]]) for group in by_class])]
        similarity = (own @ own.T).fill_diagonal_(2.0)  # a class first in its own order, even beside a twin
        return torch.argsort(similarity, dim=1, descending=True, stable=True).cpu().numpy()

    def batch(self, rows: np.ndarray, by_class: list[np.ndarray], rng: np.random.Generator,
              nearest: np.ndarray | None = None) -> np.ndarray:
        size = self.budget.batch_size
        if len(rows) <= size:
            return rows
        if self.objective == "head":
            return rng.choice(rows, size=size, replace=False)
        # contrastive: a few classes with several rows each, so every anchor has positives in the batch; with
        # `nearest` (`nearest_classes`), one class and the classes nearest it, else classes at random
        if not by_class:
            return rng.choice(rows, size=size, replace=False)
        per_class, classes = self.batch_shape(by_class)
        if nearest is not None and classes < len(by_class):
            chosen = nearest[rng.integers(len(by_class))][:classes]
        else:
            chosen = rng.choice(len(by_class), size=classes, replace=False)
        return np.concatenate([rng.permutation(by_class[c])[:per_class] for c in chosen])

    def batch_shape(self, by_class: list[np.ndarray]) -> tuple[int, int]:
        """A contrastive batch's rows per class (up to 4) and classes."""
        per_class = min(4, max(len(r) for r in by_class))
        return per_class, min(len(by_class), max(1, self.budget.batch_size // per_class))

    def train(self, rows: np.ndarray, steps: int, score_rows: np.ndarray | None = None,
              deadline: float | None = None, score_every: int = 1, keep_best: bool = False, reserve: float = 0.0):
        """Returns the tuned weights, the head (None for `contrastive`), the held-out loss at each scored step
        ({steps done: loss}) and the steps run: no step starts later than one held-out check's time (`reserve`
        until a check is timed) before `deadline` (a `time.perf_counter()` value), so fewer may run and the
        last check ends near it. `keep_best`: the weights are those of the scored step with the lowest loss."""
        b = self.budget
        weights = {k: v.clone().requires_grad_() for k, v in self.start.items()}
        groups = [{"params": list(weights.values()), "lr": b.lr}]
        head = None
        if self.objective == "head":
            head = self.prototype_head(rows).requires_grad_()
            groups.append({"params": [head], "lr": b.head_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        rng = np.random.default_rng(b.seed)
        by_class = self.class_groups(rows) if self.objective == "contrastive" else []
        nearest = None  # only where a batch cannot hold every class is there a choice to make
        if (by_class and b.contrastive_batches == "nearest" and len(rows) > b.batch_size
                and self.batch_shape(by_class)[1] < len(by_class)):
            nearest = self.nearest_classes(rows, by_class)
        scores, done, kept, kept_loss = {}, 0, None, float("inf")

        def out_of_time() -> bool:
            return deadline is not None and time.perf_counter() + reserve > deadline

        for _ in range(steps):
            batch = self.batch(rows, by_class, rng, nearest)
            embedded = self.embed(weights, batch)
            if head is None:
                loss = supervised_contrastive_loss(embedded, self.targets[batch], b.contrastive_temperature)
            else:
                loss = F.cross_entropy(embedded @ head.T, self.targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            stop = out_of_time()
            if score_rows is not None and (done % score_every == 0 or done == steps or stop):
                checked = time.perf_counter()
                scores[done] = self.loss(weights, head, score_rows, rows)
                reserve = time.perf_counter() - checked  # what the next check will take
                if keep_best and scores[done] < kept_loss:  # the first of equal losses, as min() picks the step
                    kept, kept_loss = {k: v.detach().clone() for k, v in weights.items()}, scores[done]
                stop = stop or out_of_time()  # a check can use the time another step and check would need
            if stop:
                break
        final = kept if kept is not None else {k: v.detach() for k, v in weights.items()}
        return final, (None if head is None else head.detach()), scores, done

    def prototype_head(self, rows: np.ndarray, weights=None, scale: float = 10.0) -> torch.Tensor:
        """Proto-MAML head: the class prototypes of `rows` (under `weights`, the start by default), unit norm,
        times `scale` (the temperature)."""
        at_start = weights is None or weights is self.start
        key = np.asarray(rows).tobytes()
        if at_start and key in self.start_prototypes:
            return self.start_prototypes[key] * scale
        with torch.no_grad():
            protos = F.normalize(prototypes(self.embed_rows(weights or self.start, rows), self.targets[rows],
                                            self.n_classes), dim=-1)
        if at_start:
            self.start_prototypes[key] = protos
        return protos * scale

    def loss(self, weights, head, rows, fit_rows) -> float:
        """Held-out cross-entropy (finer than accuracy on a handful of held-out shots). Without a head, against
        the prototypes of `fit_rows` under the same weights, at the best of a few temperatures: contrastive
        tuning tightens every class, which at one fixed temperature lowers the loss by confidence alone, even
        where the ranking of the classes got worse."""
        with torch.no_grad():
            if head is not None:
                return float(F.cross_entropy(self.embed_rows(weights, rows) @ head.T, self.targets[rows]))
            cosines = self.embed_rows(weights, rows) @ self.prototype_head(fit_rows, weights, scale=1.0).T
            return min(float(F.cross_entropy(cosines * scale, self.targets[rows])) for scale in HELD_OUT_SCALES)

    def choose_and_train(self, steps_cap: int, started: float, score_every: int = 1, fused: bool = False,
                         report: AdaptReport | None = None, one_shot_steps: int | None = None
                         ) -> tuple[dict[str, torch.Tensor], int, float]:
        """Steps chosen on a held-out shot per class (none if no step beats the start; `one_shot_steps` when
        every class has one shot, in a pass on every row): the weights, the steps and the fusion factor. The choosing
        pass's weights at the chosen step are kept and it gets the whole budget; with `budget.refit` a second
        pass on every row trains that many steps, and each pass gets half the seconds."""
        b = self.budget
        deadline = started + b.seconds
        split = held_out_split(self.targets.cpu().numpy(), b.seed)
        factor = 1.0
        if split is None:  # one shot of every class: nothing to hold out
            steps = b.one_shot_steps if one_shot_steps is None else one_shot_steps
            factor = 0.5 if fused else 1.0
        else:
            fit, held = split
            # the start's loss first, inside the cap; its time is what each check costs, kept for the last one
            checked = time.perf_counter()
            before = self.loss(self.start, None, held, fit)
            tuned, head, losses, _ = self.train(fit, steps_cap, score_rows=held,
                                                deadline=started + (b.seconds / 2 if b.refit else b.seconds),
                                                score_every=score_every, keep_best=not b.refit,
                                                reserve=time.perf_counter() - checked)
            best = min(losses, key=losses.get) if losses else 0
            steps = best if best and losses[best] < before else 0
            if report is not None:
                report.held_out_loss = {"start": before, "best": losses.get(best, before)}
            if fused and steps:
                fused_losses = [self.loss(fuse(self.start, tuned, a), head, held, fit) for a in FUSION_GRID]
                if report is not None:
                    report.held_out_loss["fused"] = dict(zip(map(str, FUSION_GRID), fused_losses, strict=True))
                factor = FUSION_GRID[int(np.argmin(fused_losses))]
        weights = self.start
        if steps:
            if b.refit or split is None:
                tuned, _, _, steps = self.train(np.arange(len(self.tokens)), steps, deadline=deadline)
            weights = fuse(self.start, tuned, factor)
        return weights, steps, factor


def check_strategies(strategies) -> None:
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        raise DataError(f"unknown adaptation strategy {unknown or list(strategies)}; choose from {list(STRATEGIES)}")


def refinement_helps(support: torch.Tensor, targets: torch.Tensor, queries: torch.Tensor, distance: str,
                     scale: torch.Tensor, steps: int, proportions: bool = False) -> bool:
    """Whether refining the prototypes with `queries` lowers the support's leave-one-out loss: each support row
    is scored against the prototypes without it, plain and refined (its class's sum of query weights, from
    the refinement with every row, kept). Imbalanced or off-domain queries pull prototypes together, which
    shows here. Needs two rows of some class; else (one shot) False: nothing to check on."""
    n_classes = int(targets.max()) + 1
    rows_of = torch.bincount(targets, minlength=n_classes)
    usable = rows_of[targets] >= 2
    if not bool(usable.any()) or steps < 1:
        return False
    counts = rows_of.to(support.dtype)
    sums = torch.zeros(n_classes, support.shape[1], dtype=support.dtype).index_add_(0, targets, support)
    # the E-step of the refinement's last step: the queries' weights in each class after steps - 1
    weights = torch.softmax(refine_prototypes(sums / counts[:, None], rows_of, queries, distance, scale, steps - 1,
                                              proportions)[1], dim=-1)
    query_sums, query_mass = weights.T @ queries, weights.sum(dim=0)
    rows, own = support[usable], targets[usable]

    def left_out_loss(extra_sums: torch.Tensor, extra_mass: torch.Tensor) -> float:
        full = (sums + extra_sums) / (counts + extra_mass)[:, None]
        without = (sums[own] - rows + extra_sums[own]) / (counts[own] - 1 + extra_mass[own])[:, None]
        logits = prototype_logits(rows, full, distance, scale)
        own_logit = torch.diagonal(prototype_logits(rows, without, distance, scale))
        logits = logits.scatter(1, own[:, None], own_logit[:, None])
        return float(F.cross_entropy(logits, own))

    no_queries = left_out_loss(torch.zeros_like(sums), torch.zeros_like(counts))
    return left_out_loss(query_sums, query_mass) < no_queries


def transductive(learner: Learner, classifier: Classifier, texts: list[str], labels: list[str], steps: int,
                 check: bool = True,
                 proportion_rows: int = AdaptBudget.transductive_proportion_rows) -> Classifier:
    """`classifier` whose prototypes are refined, at each prediction, by soft k-means over the texts predicted
    (`refine_prototypes`); the support rows keep their weight (one each). `proportion_rows`: with at least this
    many texts per class in the batch, its class proportions are estimated with them and added to the final
    logits (log prior), so an imbalanced batch is neither pulled toward equal classes nor scored as if balanced
    (0: never). `check`: refine a batch (prototypes and proportions) only when `refinement_helps` says so on the
    support's leave-one-out loss (never at one shot)."""
    state = classifier.state
    if not isinstance(learner, ProtoNet) or state is None or set(state) != {"prototypes", "scale"}:
        raise DataError(f"adaptation strategy 'transductive' refines class prototypes; learner {learner.name!r} "
                        f"does not classify by prototypes")
    targets = support_targets(list(labels))[1]
    counts = torch.bincount(targets, minlength=len(classifier.classes))
    protos, scale, distance = state["prototypes"].float(), state["scale"].float(), learner.config.distance
    support = learner.encoder.embed(learner.encoder.tokenize(list(texts))).float() if check else None

    def logits(queries: TokenizedTexts) -> torch.Tensor:
        embedded = learner.encoder.embed(queries).float()
        plain = protos.to(embedded.device)
        offset = learner.label_offsets(classifier.classes, embedded)  # learned base rates and head stay in every logit
        proportions = proportion_rows > 0 and len(embedded) >= proportion_rows * len(plain)
        if check and not refinement_helps(support.to(embedded.device), targets.to(embedded.device), embedded,
                                          distance, scale, steps, proportions):
            return query_logits(embedded, plain, counts, distance, scale, False, offset)
        return refine_prototypes(plain, counts.to(embedded.device), embedded, distance, scale, steps, proportions,
                                 offset)[1]

    return Classifier(classifier.classes, learner.encoder, logits)


def domain_adapt(learner: Learner, support: list[str], labels: list[str], unlabeled: list[str] | None = None,
                 strategies: list[str] | tuple[str, ...] = ("finetune",), budget: AdaptBudget = AdaptBudget()
                 ) -> tuple[Learner, AdaptReport]:
    """A copy of `learner` whose encoder is adapted to the support set's domain; the learner is unchanged."""
    check_strategies(strategies)
    if "transductive" in strategies:
        raise DataError("adaptation strategy 'transductive' refines prototypes from the texts being classified, so "
                        "it acts when predicting (evaluate or benchmark --adapt), not on a saved model")
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
    tuned_by_support = [s for s in ("contrastive", "finetune") if s in strategies]
    if tuned_by_support:  # both tune on the same tokenized support
        classes, targets = support_targets(list(labels))
        tokens = adapted.encoder.tokenize(list(support))
    for strategy in tuned_by_support:
        started = time.perf_counter()
        objective = "head" if strategy == "finetune" else "contrastive"
        tuner = _Tuner(adapted, tokens, targets.to(adapted.encoder.device), len(classes), budget, objective)
        if strategy == "finetune":
            weights, steps, factor = tuner.choose_and_train(budget.finetune_steps, started,
                                                            fused="fused" in strategies, report=report)
            report.finetune_steps, report.fusion = steps, (factor if "fused" in strategies else None)
        else:
            weights, steps, _ = tuner.choose_and_train(budget.contrastive_steps, started,
                                                       score_every=budget.contrastive_every,
                                                       one_shot_steps=0)  # one shot: no positive pair
            report.contrastive_steps = steps
        adapted.encoder.load_state_dict({**adapted.encoder.state_dict(), **weights})
        report.seconds[strategy] = time.perf_counter() - started
    return adapted, report


class DomainAdaptedLearner(Learner):
    """A learner whose every `adapt` first adapts the encoder to the support set's domain, so `evaluate`
    compares strategies on the same episodes (the time shown as adaptation ms includes it)."""

    def __init__(self, base: Learner, strategies: list[str], budget: AdaptBudget = AdaptBudget(),
                 unlabeled: list[str] | None = None) -> None:
        super().__init__(base.encoder, base.config, base.provenance)
        check_strategies(strategies)
        self.base, self.strategies, self.budget, self.unlabeled = base, list(strategies), budget, unlabeled

    @property
    def name(self) -> str:
        return f"{self.base.name}+{'+'.join(self.strategies)}"

    def adapt(self, support, labels):
        texts = support.texts if hasattr(support, "texts") else list(support)
        learner = self.base
        if any(s in ENCODER_STRATEGIES for s in self.strategies):
            learner, _ = domain_adapt(self.base, texts, list(labels), self.unlabeled,
                                      [s for s in self.strategies if s != "transductive"], self.budget)
        classifier = learner.adapt(texts, list(labels))
        if "transductive" in self.strategies:
            classifier = transductive(learner, classifier, texts, list(labels), self.budget.transductive_steps,
                                      self.budget.transductive_check, self.budget.transductive_proportion_rows)
        # a tuned encoder, or prototypes that move with each prediction: only adapting again rebuilds it
        classifier.state = None
        return classifier
