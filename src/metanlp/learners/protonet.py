"""Prototypical Networks (Snell et al., 2017) on a Transformer encoder, and the frozen-encoder baseline.

A class is the mean embedding of its support examples; a text goes to the nearest prototype. Meta-training
fine-tunes the encoder (and a temperature) so that this nearest-prototype rule works on new classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metanlp.config import FrozenConfig, ProtoNetConfig, Provenance
from metanlp.data.episodes import Episode
from metanlp.encoder import TextEncoder, TokenizedTexts, autocast
from metanlp.learners.base import Classifier, Learner, check_state, support_targets


def prototypes(embeddings: torch.Tensor, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    # A membership matrix rather than index_add_: no in-place op, so it runs under torch.func.vmap over tasks,
    # and on a stack of tasks ([tasks, rows, dim] with [tasks, rows] targets) as well as on one.
    classes = torch.arange(n_classes, device=embeddings.device)[:, None]
    members = (targets.to(embeddings.device)[..., None, :] == classes).to(embeddings.dtype)
    return (members @ embeddings) / members.sum(dim=-1, keepdim=True)


def prototype_logits(queries: torch.Tensor, protos: torch.Tensor, distance: str, scale: torch.Tensor):
    if distance == "cosine":
        return scale * F.normalize(queries, dim=-1) @ F.normalize(protos, dim=-1).T
    return -scale * torch.cdist(queries, protos).pow(2) / queries.shape[-1]


class ProtoNet(Learner):
    meta_trainable = True

    def __init__(self, encoder: TextEncoder, config: ProtoNetConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or ProtoNetConfig(), provenance)
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.config.init_scale)),
                                      requires_grad=self.config.learn_scale)

    def episode_loss(self, tokens: TokenizedTexts, episode: Episode):
        n_support = len(episode.support)
        rows = list(episode.support) + list(episode.query)  # one forward pass for support and queries
        with autocast(self.encoder.device):
            embedded = self.encoder(tokens.batch(rows)).float()
        support_targets_ = torch.as_tensor(episode.support_labels)
        protos = prototypes(embedded[:n_support], support_targets_, len(episode.classes))
        logits = prototype_logits(embedded[n_support:], protos, self.config.distance, self.log_scale.exp())
        query_targets = torch.as_tensor(episode.query_labels, device=logits.device)
        return F.cross_entropy(logits, query_targets), logits

    def adapt(self, support, labels) -> Classifier:
        classes, targets = support_targets(list(labels))
        protos = prototypes(self.encoder.embed(self.tokens(support)), targets, len(classes))
        return self.restore(classes, {"prototypes": protos, "scale": self.log_scale.detach().exp().cpu()})

    def restore(self, classes: list[str], state: dict[str, torch.Tensor]) -> Classifier:
        check_state(state, {"prototypes": (len(classes), self.encoder.dim), "scale": ()})
        protos, scale = state["prototypes"].float(), state["scale"].float()

        def logits(queries: TokenizedTexts) -> torch.Tensor:
            return prototype_logits(self.encoder.embed(queries), protos, self.config.distance, scale)

        return Classifier(classes, self.encoder, logits, state)


class FrozenEncoder(ProtoNet):
    """The untouched pretrained encoder with class prototypes: the baseline every table keeps."""

    meta_trainable = False

    def __init__(self, encoder: TextEncoder, config: FrozenConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or FrozenConfig(), provenance)
