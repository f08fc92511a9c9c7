"""Logistic regression on embeddings: what many users fit on frozen sentence embeddings (and SetFit's head).

The head minimises C * sum of cross-entropies + 0.5 * ||W||^2 (scikit-learn's LogisticRegression objective,
multinomial, bias unpenalised) by L-BFGS on the unit-norm embeddings of the support set; the encoder is only
read, so it works on the pretrained encoder and on a meta-trained one alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metanlp.config import LogRegConfig, Provenance
from metanlp.encoder import TextEncoder, TokenizedTexts
from metanlp.learners.base import Classifier, Learner, check_state, support_targets


def fit_logistic_regression(features: torch.Tensor, targets: torch.Tensor, n_classes: int, C: float,
                            max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [classes, dim], bias [classes]) of the multinomial logistic regression, fitted in float64."""
    x, y = features.double(), targets
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-6,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = C * F.cross_entropy(x @ weight.T + bias, y, reduction="sum") + 0.5 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach().float(), bias.detach().float()


class LogisticRegressionHead(Learner):
    def __init__(self, encoder: TextEncoder, config: LogRegConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or LogRegConfig(), provenance)

    def adapt(self, support, labels) -> Classifier:
        classes, targets = support_targets(list(labels))
        features = F.normalize(self.encoder.embed(self.tokens(support)), dim=-1)
        weight, bias = fit_logistic_regression(features, targets, len(classes), self.config.C, self.config.max_iter)
        return self.restore(classes, {"weight": weight, "bias": bias})

    def restore(self, classes: list[str], state: dict[str, torch.Tensor]) -> Classifier:
        check_state(state, {"weight": (len(classes), self.encoder.dim), "bias": (len(classes),)})
        weight, bias = state["weight"].float(), state["bias"].float()

        def logits(queries: TokenizedTexts) -> torch.Tensor:
            return F.normalize(self.encoder.embed(queries), dim=-1) @ weight.T + bias

        return Classifier(classes, self.encoder, logits, state)
