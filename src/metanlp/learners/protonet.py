"""Prototypical Networks (Snell et al., 2017) on a Transformer encoder, and the frozen-encoder baseline.

A class is the mean embedding of its support examples; a text goes to the nearest prototype. Meta-training
fine-tunes the encoder (and a temperature) so that this nearest-prototype rule works on new classes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from metanlp.config import FrozenConfig, ProtoNetConfig, Provenance, uses_label_names
from metanlp.data.episodes import Episode
from metanlp.data.load import DataError, LabelledTexts
from metanlp.data.pool import label_base_rates, split_label
from metanlp.encoder import TextEncoder, TokenizedTexts, autocast
from metanlp.learners.base import Classifier, Learner, check_state, support_targets
from metanlp.learners.logreg import fit_logistic_regression

LABEL_PRIOR_FILE = "label_prior.json"  # the learned label base rates, beside the weights
LABEL_HEAD_FILE = "label_head.safetensors"  # the label head's weight and bias; its label names in the metadata
LABEL_NAME_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # what `label_names: auto` chooses from
LABEL_HEAD_ITERATIONS = 500  # L-BFGS iterations of the label head's fit


def prototypes(embeddings: torch.Tensor, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    # A membership matrix rather than index_add_: no in-place op, so it runs under torch.func.vmap over tasks,
    # and on a stack of tasks ([tasks, rows, dim] with [tasks, rows] targets) as well as on one.
    classes = torch.arange(n_classes, device=embeddings.device)[:, None]
    members = (targets.to(embeddings.device)[..., None, :] == classes).to(embeddings.dtype)
    return (members @ embeddings) / members.sum(dim=-1, keepdim=True)


def supervised_contrastive_loss(embeddings: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al., 2020, the L_out form): each row's mean log-probability of picking a row of its own
    class among all the other rows, by cosine similarity / temperature; rows alone in their class are no
    anchor."""
    unit = F.normalize(embeddings.float(), dim=-1)
    itself = torch.eye(len(unit), dtype=torch.bool, device=unit.device)
    similarity = (unit @ unit.T / temperature).masked_fill(itself, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    targets = targets.to(unit.device)
    positives = (targets[:, None] == targets[None, :]) & ~itself
    counts = positives.sum(dim=1)
    anchors = counts > 0
    if not anchors.any():
        return unit.sum() * 0.0  # no pair in the batch: nothing to pull together
    per_anchor = log_prob.masked_fill(~positives, 0.0).sum(dim=1)[anchors] / counts[anchors]
    return -per_anchor.mean()


def leave_one_out_loss(embedded: torch.Tensor, targets: torch.Tensor, n_classes: int, extra: torch.Tensor,
                       extra_weight: torch.Tensor, distance: str, scale: torch.Tensor) -> float:
    """Mean cross-entropy of the support rows, each against the prototypes with itself left out of its own
    class's. A prototype is (its rows' sum + `extra_weight` x `extra`) / (its count + `extra_weight`): `extra`
    [classes, dim] is what a class holds beside its rows (an embedded label name), weight 0 for nothing. A row
    alone in its class is skipped whatever its class holds, so that every weight is scored on the same rows;
    NaN when every row is alone (one shot)."""
    counts = torch.bincount(targets, minlength=n_classes).to(embedded.dtype)
    sums = torch.zeros(n_classes, embedded.shape[1], dtype=embedded.dtype).index_add_(0, targets, embedded)
    held = extra_weight[:, None] * extra
    logits = prototype_logits(embedded, (sums + held) / (counts + extra_weight)[:, None], distance, scale).clone()
    kept = counts[targets] > 1
    own = (sums[targets] - embedded + held[targets]) / (counts[targets] - 1 + extra_weight[targets]).clamp_min(
        1e-12)[:, None]
    rows = torch.arange(len(embedded))
    # each row against its own left-out prototype alone: a batch of one-row sets, not the rows x rows matrix
    logits[rows, targets] = prototype_logits(embedded[:, None], own[:, None], distance, scale)[:, 0, 0]
    return float(F.cross_entropy(logits[kept], targets[kept])) if kept.any() else float("nan")


LABEL_SEPARATORS = re.compile(r"[_\-./:]+")
NAME_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters in a row: "card arrival" or "joy", not "17" or "t4"


def label_text(label: str) -> str | None:
    """A label's name as text ("card_arrival" -> "card arrival", a pool's "snips::PlayMusic" -> "PlayMusic"), or
    None when the label is an id that says nothing about its class ("0", "17", "t4")."""
    text = LABEL_SEPARATORS.sub(" ", split_label(label)[1]).strip()
    return text if NAME_WORD.search(text) else None


def prototype_logits(queries: torch.Tensor, protos: torch.Tensor, distance: str, scale: torch.Tensor):
    # [..., queries, dim] against [..., protos, dim]: one set, or a batch of sets (mT transposes the last two)
    if distance == "cosine":
        return scale * F.normalize(queries, dim=-1) @ F.normalize(protos, dim=-1).mT
    return -scale * torch.cdist(queries, protos).pow(2) / queries.shape[-1]


def class_proportions(logits: torch.Tensor, counts: torch.Tensor | None = None, iterations: int = 50,
                      tolerance: float = 1e-5) -> torch.Tensor:
    """The log class proportions of a batch under a classifier that assumes equal ones (Saerens et al., 2002):
    the fixed point of pi = mean over the batch of softmax(logits + log pi), from equal proportions. `counts`:
    labelled rows of each class (the support) pooled with the batch's soft counts, as soft k-means pools them
    for the prototypes, so a batch with few rows per class cannot run away from them."""
    log_prior = torch.full((logits.shape[-1],), -math.log(logits.shape[-1]), dtype=logits.dtype,
                           device=logits.device)
    known = torch.zeros_like(log_prior) if counts is None else counts.to(logits.dtype)
    for _ in range(iterations):
        soft = torch.softmax(logits + log_prior, dim=-1).sum(dim=0) + known
        updated = (soft / soft.sum()).clamp_min(1e-8).log()
        converged = bool((updated - log_prior).abs().max() < tolerance)
        log_prior = updated
        if converged:
            break
    return log_prior


def query_logits(queries: torch.Tensor, protos: torch.Tensor, counts: torch.Tensor | None, distance: str,
                 scale: torch.Tensor, proportions: bool, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The queries' logits under `protos` (plus an `offset`, per class or per query and class: what meta-training
    taught about the label names, `ProtoNet.label_offsets`), plus, with `proportions`, the batch's log class
    proportions estimated from them: the refinement's E-step (their softmax is each query's weight in each
    class) and its answer; `counts` (the support's rows per class) are pooled into that estimate."""
    logits = prototype_logits(queries, protos, distance, scale)
    logits = logits if offset is None else logits + offset
    return logits + class_proportions(logits, counts) if proportions else logits


def refine_prototypes(protos: torch.Tensor, counts: torch.Tensor, queries: torch.Tensor, distance: str,
                      scale: torch.Tensor, steps: int, proportions: bool = False, offset: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Transductive refinement (soft k-means, Ren et al., 2018): each step, every query joins every class with its
    predicted probability, and each prototype becomes the weighted mean of its support rows (`counts` of them,
    mean `protos`) and of the queries. `proportions`: the class proportions are estimated too (EM of a mixture
    whose weights are not assumed equal: an imbalanced batch would otherwise pull the prototypes of its rare
    classes toward the common one) and their log added to the logits. Returns the refined prototypes and the
    queries' logits under them (`query_logits`); zero steps return `protos`."""
    support_sums, refined = counts[:, None].to(protos.dtype) * protos, protos
    logits = query_logits(queries, refined, counts, distance, scale, proportions, offset)
    for _ in range(steps):
        weights = torch.softmax(logits, dim=-1)
        refined = (support_sums + weights.T @ queries) / (counts[:, None] + weights.sum(dim=0)[:, None])
        logits = query_logits(queries, refined, counts, distance, scale, proportions, offset)
    return refined, logits


@dataclass(frozen=True)
class LabelHead:
    """A linear classifier of label names on unit embeddings: row i of `weight` and `bias` scores `names[i]`."""

    names: tuple[str, ...]
    weight: torch.Tensor  # [names, dim]
    bias: torch.Tensor  # [names]

    @classmethod
    def fit(cls, embedded: torch.Tensor, names: list[str]) -> LabelHead:
        """Multinomial logistic regression of `names` (one per row) on the unit `embedded` rows, at C = 1 (the
        rows' summed cross-entropy against half the squared weights)."""
        vocabulary = sorted(set(names))
        if len(vocabulary) < 2:
            raise DataError(f"a label head needs at least two label names in the training rows, got {vocabulary}")
        index = {name: i for i, name in enumerate(vocabulary)}
        targets = torch.tensor([index[name] for name in names])
        weight, bias = fit_logistic_regression(F.normalize(embedded.float().cpu(), dim=-1), targets,
                                               len(vocabulary), C=1.0, max_iter=LABEL_HEAD_ITERATIONS)
        return cls(tuple(vocabulary), weight, bias)

    def logits(self, embedded: torch.Tensor, classes: list[str]) -> torch.Tensor | None:
        """[queries, classes]: the head's logits of the classes it knows by name, 0 for the others; None if it
        knows none of them."""
        index = {name: i for i, name in enumerate(self.names)}
        known = [(column, index[c]) for column, c in enumerate(classes) if c in index]
        if not known:
            return None
        columns, rows = (list(values) for values in zip(*known, strict=True))
        weight, bias = self.weight.to(embedded.device), self.bias.to(embedded.device)
        out = torch.zeros(len(embedded), len(classes), device=embedded.device)
        out[:, columns] = F.normalize(embedded.float(), dim=-1) @ weight[rows].T + bias[rows]
        return out

    def save(self, path: Path) -> None:
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path),
                  metadata={"names": json.dumps(list(self.names))})

    @classmethod
    def load(cls, path: Path, dim: int) -> LabelHead:
        try:
            with safe_open(str(path), framework="pt") as tensors:
                names = json.loads((tensors.metadata() or {}).get("names", "null"))
                weight, bias = tensors.get_tensor("weight"), tensors.get_tensor("bias")
        except (OSError, SafetensorError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: the model's label_head needs its label head ({err})") from err
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) \
                or tuple(weight.shape) != (len(names), dim) or tuple(bias.shape) != (len(names),):
            raise DataError(f"{path}: not a label head of {dim}-dimensional embeddings (its names, weight "
                            f"[names, {dim}] and bias [names] do not agree)")
        return cls(tuple(names), weight.float(), bias.float())


class ProtoNet(Learner):
    meta_trainable = True
    saved_beside = (LABEL_PRIOR_FILE, LABEL_HEAD_FILE)

    def __init__(self, encoder: TextEncoder, config: ProtoNetConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or ProtoNetConfig(), provenance)
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.config.init_scale)),
                                      requires_grad=self.config.learn_scale)
        self.label_rates: dict[str, float] = {}  # `label_prior`: label name -> base rate, from meta-training
        self.label_head: LabelHead | None = None  # `label_head`: fitted on the training rows after meta-training

    def learn_from_training_rows(self, data: LabelledTexts) -> None:
        if self.config.label_prior > 0:
            self.label_rates = label_base_rates(data)
        if self.config.label_head > 0:  # `embed` runs without gradients, in eval mode
            embedded = self.encoder.embed(self.tokens(data.texts))
            self.label_head = LabelHead.fit(embedded, [split_label(label)[1] for label in data.labels])

    def class_log_prior(self, classes: list[str]) -> torch.Tensor | None:
        """The learned base rates of `classes` times `label_prior` (0 for a name never met in meta-training),
        to add to their logits; None when off or no class was met."""
        rates = [self.label_rates.get(c) for c in classes]
        if not self.config.label_prior or all(r is None for r in rates):
            return None
        return self.config.label_prior * torch.tensor([r or 0.0 for r in rates])

    def label_offsets(self, classes: list[str], embedded: torch.Tensor) -> torch.Tensor | None:
        """What meta-training taught about the names of `classes`, added to the logits of the `embedded`
        queries: the label base rates ([classes]) and the label head's logits ([queries, classes]), each times
        its weight; None when neither applies."""
        prior = self.class_log_prior(classes)
        head = None if self.label_head is None else self.label_head.logits(embedded, classes)
        if head is None:
            return None if prior is None else prior.to(embedded.device)
        head = self.config.label_head * head
        return head if prior is None else head + prior.to(embedded.device)

    def save_extra(self, directory: Path) -> None:
        if self.config.label_prior > 0:
            (directory / LABEL_PRIOR_FILE).write_text(json.dumps(self.label_rates, indent=2, sort_keys=True))
        if self.label_head is not None:
            self.label_head.save(directory / LABEL_HEAD_FILE)

    def load_extra(self, directory: Path) -> None:
        if self.config.label_prior > 0:
            path = directory / LABEL_PRIOR_FILE
            try:
                rates = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise DataError(f"{path}: the model's label_prior needs its label base rates ({err})") from err
            if not isinstance(rates, dict) or not all(isinstance(v, int | float) for v in rates.values()):
                raise DataError(f"{path}: not a mapping of label names to numbers")
            self.label_rates = {str(k): float(v) for k, v in rates.items()}
        if self.config.label_head > 0:
            self.label_head = LabelHead.load(directory / LABEL_HEAD_FILE, self.encoder.dim)

    def episode_loss(self, tokens: TokenizedTexts, episode: Episode):
        n_support = len(episode.support)
        rows = list(episode.support) + list(episode.query)  # one forward pass for support and queries
        with autocast(self.encoder.device):
            embedded = self.encoder(tokens.batch(rows)).float()
        support_targets_ = torch.as_tensor(episode.support_labels)
        protos = prototypes(embedded[:n_support], support_targets_, len(episode.classes))
        logits = prototype_logits(embedded[n_support:], protos, self.config.distance, self.log_scale.exp())
        query_targets = torch.as_tensor(episode.query_labels, device=logits.device)
        loss = F.cross_entropy(logits, query_targets)
        if self.config.supcon > 0:
            every = torch.cat([support_targets_.to(logits.device), query_targets])
            loss = loss + self.config.supcon * supervised_contrastive_loss(embedded, every,
                                                                           self.config.supcon_temperature)
        return loss, logits

    def adapt(self, support, labels) -> Classifier:
        classes, targets = support_targets(list(labels))
        embedded = self.encoder.embed(self.tokens(support))
        protos = prototypes(embedded, targets, len(classes))
        if uses_label_names(self.config):
            protos = self.with_label_names(protos, classes, torch.bincount(targets, minlength=len(classes)),
                                           embedded.norm(dim=-1).mean(), embedded, targets)
        return self.restore(classes, {"prototypes": protos, "scale": self.log_scale.detach().exp().cpu()})

    def name_embeddings(self, names: list[str], norm: torch.Tensor | float) -> torch.Tensor:
        """The embedded label names, scaled to `norm` (the support's mean length) so a name weighs as an example."""
        return F.normalize(self.encoder.embed(self.tokens(names)), dim=-1) * norm

    def with_label_names(self, protos: torch.Tensor, classes: list[str], counts: torch.Tensor,
                         norm: torch.Tensor, support: torch.Tensor | None = None,
                         targets: torch.Tensor | None = None) -> torch.Tensor:
        """Each named class's prototype moved toward its embedded name, which counts as `label_names` examples
        (with "auto", the weight the `support` rows' leave-one-out loss prefers); classes whose labels are ids
        keep their support mean."""
        names = [label_text(c) for c in classes]
        named = [i for i, name in enumerate(names) if name is not None]
        if not named:
            return protos
        embedded_names = self.name_embeddings([names[i] for i in named], norm)
        weight = self.config.label_names
        if weight == "auto":
            weight = self.chosen_name_weight(support, targets, len(classes), named, embedded_names)
        counted = counts[named, None].to(protos.dtype)
        mixed = protos.clone()
        mixed[named] = (counted * protos[named] + weight * embedded_names) / (counted + weight)
        return mixed

    def chosen_name_weight(self, support: torch.Tensor, targets: torch.Tensor, n_classes: int, named: list[int],
                           embedded_names: torch.Tensor) -> float:
        """The weight of `LABEL_NAME_WEIGHTS` with the lowest leave-one-out loss on the support rows at this
        learner's temperature (the smaller on a tie, so 0 unless the names help); 0 at one shot, where no row
        can be left out."""
        support, targets = support.float().cpu(), targets.cpu()
        extra = torch.zeros(n_classes, support.shape[1])
        extra[named] = embedded_names.float().cpu()
        scale, on_named = self.log_scale.detach().exp().cpu(), torch.zeros(n_classes)
        losses = {}
        for weight in LABEL_NAME_WEIGHTS:
            on_named[named] = weight
            losses[weight] = leave_one_out_loss(support, targets, n_classes, extra, on_named.clone(),
                                                self.config.distance, scale)
        if math.isnan(losses[0.0]):
            return 0.0
        return min(LABEL_NAME_WEIGHTS, key=lambda w: (losses[w], w))

    def zero_shot(self, classes: list[str]) -> Classifier:
        """A classifier from the label names alone (no examples): each prototype is its embedded name."""
        names = [label_text(c) for c in classes]
        ids = [c for c, name in zip(classes, names, strict=True) if name is None]
        if ids:
            raise ValueError(f"zero-shot needs label names; {ids[:5]} are ids")
        protos = self.name_embeddings(names, 1.0)
        # ProtoNet's own rule, also for subclasses whose adapted state holds more (a memory's context)
        return ProtoNet.restore(self, list(classes), {"prototypes": protos,
                                                      "scale": self.log_scale.detach().exp().cpu()})

    def restore(self, classes: list[str], state: dict[str, torch.Tensor]) -> Classifier:
        check_state(state, {"prototypes": (len(classes), self.encoder.dim), "scale": ()})
        protos, scale = state["prototypes"].float(), state["scale"].float()

        def logits(queries: TokenizedTexts) -> torch.Tensor:
            embedded = self.encoder.embed(queries)
            return query_logits(embedded, protos.to(embedded.device), None, self.config.distance, scale, False,
                                self.label_offsets(classes, embedded))

        return Classifier(classes, self.encoder, logits, state)


class FrozenEncoder(ProtoNet):
    """The untouched pretrained encoder with class prototypes: the baseline every table keeps."""

    meta_trainable = False

    def __init__(self, encoder: TextEncoder, config: FrozenConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or FrozenConfig(), provenance)
