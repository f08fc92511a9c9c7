"""Masked-LM continued pretraining on a tiny random BERT: the loss on a fixed masked batch goes down, and the
encoder (not only the head) changes."""

from __future__ import annotations

import torch

from metanlp.encoder import TextEncoder
from metanlp.pretrain import mlm_batches, mlm_pretrain, with_mlm_head


def fixed_batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_mlm_steps_lower_the_loss_and_change_the_encoder(corpus, tiny_encoder_config):
    encoder = TextEncoder.from_config(tiny_encoder_config)
    texts = corpus.texts[:256]
    torch.manual_seed(123)
    batch = next(mlm_batches(encoder, texts, 64, 0.15, seed=123))
    model = with_mlm_head(encoder)
    before = fixed_batch_loss(model, batch)
    start = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    losses = mlm_pretrain(encoder, texts, steps=40, lr=2e-3, batch_size=16, seed=0, show_progress=False,
                          model=model)
    assert len(losses) == 40
    after = fixed_batch_loss(model, batch)
    assert after < before - 0.5, (before, after)
    changed = [k for k, v in encoder.model.state_dict().items() if not torch.equal(v, start[k])]
    assert any("encoder.layer" in k for k in changed)


def test_mlm_pretraining_is_seeded(corpus, tiny_encoder_config):
    runs = []
    for _ in range(2):
        encoder = TextEncoder.from_config(tiny_encoder_config)
        runs.append(mlm_pretrain(encoder, corpus.texts[:64], steps=3, lr=1e-3, batch_size=16, seed=5,
                                 show_progress=False))
    assert runs[0] == runs[1]
