"""The transfer-learning baseline: a new linear head, and all encoder weights fine-tuned on the support set.

Written functionally: each `adapt` clones the weights into a dict and trains that with
`torch.func.functional_call`, so the learner itself never changes and earlier classifiers stay valid.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metanlp.config import FineTuneConfig, Provenance
from metanlp.encoder import TextEncoder, TokenBatch, TokenizedTexts, autocast
from metanlp.learners.base import Classifier, Learner, logits_in_chunks, support_targets


class FineTune(Learner):
    def __init__(self, encoder: TextEncoder, config: FineTuneConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or FineTuneConfig(), provenance)

    def adapt(self, support, labels) -> Classifier:
        cfg = self.config
        classes, targets = support_targets(list(labels))
        tokens = self.tokens(support)
        device = self.encoder.device
        weights = {k: v.detach().clone().requires_grad_() for k, v in self.encoder.named_parameters()}
        head_w = (torch.randn(len(classes), self.encoder.dim) * 0.02).to(device).requires_grad_()
        head_b = torch.zeros(len(classes), device=device, requires_grad=True)
        optimizer = torch.optim.AdamW(
            [{"params": list(weights.values()), "lr": cfg.encoder_lr},
             {"params": [head_w, head_b], "lr": cfg.head_lr}],
            weight_decay=cfg.weight_decay,
        )
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))  # follows torch's seed
        targets = targets.to(device)
        was_training = self.encoder.training
        self.encoder.train()  # dropout on while fine-tuning, as in ordinary fine-tuning
        steps = max(cfg.steps, math.ceil(cfg.min_epochs * len(tokens) / cfg.batch_size))
        try:
            for _ in range(steps):
                rows = np.arange(len(tokens))
                if len(rows) > cfg.batch_size:
                    rows = rng.choice(rows, size=cfg.batch_size, replace=False)
                with autocast(device):
                    embedded = functional_call(self.encoder, weights, (tokens.batch(rows),)).float()
                loss = F.cross_entropy(embedded @ head_w.T + head_b, targets[torch.as_tensor(rows)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            self.encoder.train(was_training)
        tuned = {k: v.detach() for k, v in weights.items()}
        head_w, head_b = head_w.detach(), head_b.detach()

        def logits(queries: TokenizedTexts) -> torch.Tensor:
            def batch_logits(batch: TokenBatch) -> torch.Tensor:
                with autocast(device):
                    embedded = functional_call(self.encoder, tuned, (batch,)).float()
                return embedded @ head_w.T + head_b

            return logits_in_chunks(self.encoder, queries, batch_logits)

        return Classifier(classes, self.encoder, logits)
