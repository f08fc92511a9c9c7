"""Code tests: meta-training objectives. The supervised contrastive loss on a toy batch equals a hand
computation; it is off unless asked; with a weight it adds to the prototype loss of an episode."""

from __future__ import annotations

import math

import pytest
import torch

from metanlp.config import ProtoNetConfig
from metanlp.learners import build_learner
from metanlp.learners.protonet import supervised_contrastive_loss


def by_hand(rows: list[list[float]], labels: list[int], temperature: float) -> float:
    """Khosla et al.'s L_out written out: for every anchor with a same-class partner, minus the mean over its
    partners p of log(exp(s_ip / t) / sum over a != i of exp(s_ia / t)), s the cosine similarity."""
    unit = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows]

    def cos(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(unit[i], unit[j], strict=True))

    losses = []
    for i in range(len(rows)):
        partners = [p for p in range(len(rows)) if p != i and labels[p] == labels[i]]
        if not partners:
            continue
        denominator = sum(math.exp(cos(i, a) / temperature) for a in range(len(rows)) if a != i)
        losses.append(-sum(math.log(math.exp(cos(i, p) / temperature) / denominator) for p in partners)
                      / len(partners))
    return sum(losses) / len(losses)


@pytest.mark.parametrize(("labels", "temperature"), [([0, 0, 1, 1, 2], 0.5), ([0, 1, 0, 1, 1], 0.1)])
def test_supervised_contrastive_loss_equals_a_hand_computation(labels, temperature):
    rows = [[1.0, 0.0, 0.2], [0.8, 0.6, 0.0], [0.0, 1.0, 0.5], [-1.0, 0.1, 0.3], [0.3, -0.7, 2.0]]
    got = supervised_contrastive_loss(torch.tensor(rows), torch.tensor(labels), temperature)
    assert got.item() == pytest.approx(by_hand(rows, labels, temperature), rel=1e-5)


def test_supervised_contrastive_loss_pulls_a_class_together_and_has_no_anchor_without_a_pair():
    labels = torch.tensor([0, 0, 1, 1])
    together = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    apart = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert supervised_contrastive_loss(together, labels, 0.1) < supervised_contrastive_loss(apart, labels, 0.1)
    alone = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = supervised_contrastive_loss(alone, torch.tensor([0, 1]), 0.1)
    loss.backward()  # a batch without a pair is a zero loss that still backpropagates
    assert loss.item() == 0.0 and torch.equal(alone.grad, torch.zeros_like(alone))


def test_the_episode_loss_adds_the_contrastive_term_only_when_asked(corpus, tiny_encoder_config):
    from metanlp.data.episodes import EpisodeSampler

    assert ProtoNetConfig().supcon == 0
    plain = build_learner(ProtoNetConfig(), tiny_encoder_config)
    plain.encoder.eval()  # no dropout: the two learners embed alike
    tokens = plain.encoder.tokenize(corpus.texts)
    episode = EpisodeSampler(corpus, 3, 2, 2, seed=0).sample()
    with_supcon = build_learner(ProtoNetConfig(supcon=0.5, supcon_temperature=0.2), tiny_encoder_config)
    with_supcon.encoder.load_state_dict(plain.encoder.state_dict())
    with_supcon.encoder.eval()
    base, _ = plain.episode_loss(tokens, episode)
    mixed, _ = with_supcon.episode_loss(tokens, episode)
    rows = list(episode.support) + list(episode.query)
    with torch.no_grad():
        embedded = plain.encoder(tokens.batch(rows)).float()
    targets = torch.as_tensor(list(episode.support_labels) + list(episode.query_labels))
    expected = base + 0.5 * supervised_contrastive_loss(embedded, targets, 0.2)
    assert mixed.item() == pytest.approx(expected.item(), rel=1e-4)
    mixed.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in with_supcon.encoder.parameters())


def test_the_anchor_pulls_meta_training_toward_the_starting_weights_and_survives_a_resume(corpus, tiny_encoder_config,
                                                                                          tmp_path):
    """L2-SP: with `anchor` the encoder ends nearer its pretrained weights; a resumed run anchors to the same start
    (taken before the checkpoint is loaded), so it ends where the whole run does."""
    from metanlp.config import EpisodeConfig, SplitConfig, TrainConfig
    from metanlp.data.splits import split_classes
    from metanlp.train import TrainingInterrupted, meta_train

    split = split_classes(corpus, SplitConfig(by="random", sizes=(30, 6, 6), seed=0))
    train_set, val_set = corpus.with_classes(split.train), corpus.with_classes(split.val)
    drift = {}
    for anchor in (0.0, 100.0):
        learner = build_learner("protonet", tiny_encoder_config)
        start = {k: v.detach().clone() for k, v in learner.encoder.named_parameters()}

        def measure(step, accuracy, learner=learner, start=start, anchor=anchor):
            drift[anchor] = sum(float((p.detach() - start[k]).pow(2).sum())
                                for k, p in learner.encoder.named_parameters())

        config = TrainConfig(episodes=8, val_every=8, val_episodes=4, lr=1e-3, warmup_episodes=0, anchor=anchor,
                             episode=EpisodeConfig(ways=3, shots=2, queries=2))
        meta_train(learner, train_set, val_set, config, show_progress=False, on_validation=measure)
    assert 0 < drift[100.0] < 0.5 * drift[0.0], drift

    config = TrainConfig(episodes=6, val_every=2, val_episodes=4, lr=1e-3, warmup_episodes=0, anchor=10.0,
                         patience=10, episode=EpisodeConfig(ways=3, shots=2, queries=2))
    whole = build_learner("protonet", tiny_encoder_config)
    expected = meta_train(whole, train_set, val_set, config, show_progress=False)
    with pytest.raises(TrainingInterrupted):
        meta_train(build_learner("protonet", tiny_encoder_config), train_set, val_set, config, show_progress=False,
                   checkpoint_dir=tmp_path / "ckpt", stop_after=4)
    resumed = build_learner("protonet", tiny_encoder_config)
    again = meta_train(resumed, train_set, val_set, config, show_progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert again.history == expected.history
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)
