"""Code tests: the gradient-based meta-learners compute the gradients their papers define."""

from __future__ import annotations

import pytest
import torch

from metanlp.config import EncoderConfig, learner_config
from metanlp.data.episodes import EpisodeSampler
from metanlp.learners import build_learner
from metanlp.learners.meta_batch import StackedTasks, TaskLoop, VmappedHeads

TINY_EAGER = EncoderConfig(name_or_path="tiny-random-bert", attn_implementation="eager")


def _setup(corpus, name, **overrides):
    learner = build_learner(learner_config(name, inner_steps=2, **overrides), TINY_EAGER)
    learner.double().eval()  # float64 for finite differences; eval: no dropout, so the loss is a function
    tokens = learner.encoder.tokenize(corpus.texts)
    episode = EpisodeSampler(corpus, 3, 2, 2, seed=0).sample()
    return learner, tokens, episode


def _shift(params, direction, step):
    with torch.no_grad():
        for p, v in zip(params, direction, strict=True):
            p.add_(step * v)


def _directional(learner, tokens, episode, direction, eps=1e-5):
    """Central finite difference of the meta-loss along `direction` (the inner loop still needs autograd)."""
    params = [p for p in learner.parameters() if p.requires_grad]
    _shift(params, direction, eps)
    plus = learner.episode_loss(tokens, episode)[0].item()
    _shift(params, direction, -2 * eps)
    minus = learner.episode_loss(tokens, episode)[0].item()
    _shift(params, direction, eps)
    return (plus - minus) / (2 * eps)


def _analytic(learner, tokens, episode, direction):
    learner.zero_grad()
    learner.episode_loss(tokens, episode)[0].backward()
    params = [p for p in learner.parameters() if p.requires_grad]
    return sum((p.grad * v).sum().item() for p, v in zip(params, direction, strict=True) if p.grad is not None)


def _direction(learner):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in learner.parameters() if p.requires_grad]


@pytest.mark.parametrize("adapt", ["top", "head", "lora"])
def test_second_order_maml_gradient_matches_finite_differences(corpus, adapt):
    learner, tokens, episode = _setup(corpus, "maml", adapt=adapt, top_layers=1)
    direction = _direction(learner)
    numeric = _directional(learner, tokens, episode, direction)
    analytic = _analytic(learner, tokens, episode, direction)
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_first_order_maml_differs_from_the_true_gradient(corpus):
    learner, tokens, episode = _setup(corpus, "fomaml", top_layers=1)
    direction = _direction(learner)
    numeric = _directional(learner, tokens, episode, direction)
    first_order = _analytic(learner, tokens, episode, direction)
    assert first_order != pytest.approx(numeric, rel=1e-3)
    # ... yet it is an approximation of it, not noise: same sign along a random direction
    assert first_order * numeric > 0


def test_reptile_gradient_is_start_minus_adapted(corpus):
    learner, tokens, episode = _setup(corpus, "reptile", top_layers=1)
    import numpy as np

    rows = np.concatenate([episode.support, episode.query])
    labels = torch.as_tensor(np.concatenate([episode.support_labels, episode.query_labels]))
    adapted = learner.inner_loop(tokens.batch(rows), labels, len(episode.classes), create_graph=False,
                                 track_meta=False)
    start = {n: p.detach().clone() for n, p in learner.encoder.named_parameters()}
    learner.zero_grad()
    learner.backward_batch(tokens, [episode])  # Reptile's own outer step
    epsilon = 0.1
    with torch.no_grad():
        for name, p in learner.encoder.named_parameters():
            if name in learner.adapted:
                torch.testing.assert_close(p.grad, start[name] - adapted[name].detach())
                p.sub_(epsilon * p.grad)  # the outer SGD step ...
                # ... is Reptile's update: theta + epsilon * (phi - theta)
                torch.testing.assert_close(p, start[name] + epsilon * (adapted[name].detach() - start[name]))
            else:
                assert p.grad is None


def test_metasgd_learning_rates_receive_gradients(corpus):
    learner, tokens, episode = _setup(corpus, "metasgd")
    learner.episode_loss(tokens, episode)[0].backward()
    grads = [p.grad for p in learner.log_inner_lrs.values()]
    assert len(grads) == len(learner.adapted) + 2
    assert all(g is not None and torch.isfinite(g) for g in grads)
    assert sum(g.abs().item() for g in grads) > 0


def test_adaptation_at_test_time_changes_only_fast_weights(corpus):
    learner, _, _ = _setup(corpus, "maml")
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    classifier = learner.adapt(["rain today", "play a song", "rain tomorrow", "play music"], ["w", "m", "w", "m"])
    assert classifier.predict(["rain later"]).scores.shape == (1, 2)
    for key, value in learner.state_dict().items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.parametrize("adapt", ["top", "head"])
def test_split_encoder_equals_the_whole_encoder(corpus, adapt):
    learner, tokens, episode = _setup(corpus, "fomaml", adapt=adapt, top_layers=1)
    assert learner.split.n_bottom == (1 if adapt == "top" else 2)
    batch = tokens.batch(episode.support)
    fast = {n: p for n, p in learner.encoder.named_parameters() if n in learner.adapted}
    torch.testing.assert_close(learner.split.feature_fn(batch)(fast), learner.split.features(fast, batch))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_top_layers_equal_transformers_layers(corpus, pooling):
    """The padding-free layers compute what transformers' BertLayer computes: features and their gradients."""
    learner, tokens, episode = _setup(corpus, "maml", top_layers=1)
    learner.encoder.config = learner.encoder.config.model_copy(update={"pooling": pooling})
    assert learner.split.packed and learner.split.n_bottom == 1
    batch = tokens.batch(episode.support)
    assert not batch.attention_mask.all(), "the batch must hold padding for the test to mean anything"
    fast = {n: p for n, p in learner.encoder.named_parameters() if n in learner.adapted}
    params = list(fast.values()) + [p for n, p in learner.encoder.named_parameters() if ".layer.0." in n]
    results = {}
    for packed in (True, False):  # bottom layer and top layer, values and gradients of both
        learner.split.packed = packed
        features = learner.split.feature_fn(batch)(fast)
        weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(0), dtype=features.dtype)
        grads = torch.autograd.grad((features * weights).sum(), params)
        results[packed] = features, grads
    torch.testing.assert_close(results[True][0], results[False][0])
    for a, b in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(a, b)


def test_lora_layers_fall_back_to_transformers_layers(corpus):
    learner, _, _ = _setup(corpus, "maml", adapt="lora", top_layers=1, lora_rank=2)
    assert not learner.split.packed


def test_gradient_checkpointing_gives_the_same_second_order_meta_gradient(corpus):
    episodes = EpisodeSampler(corpus, 3, 2, 2, seed=2).take(2)
    grads = []
    for checkpointing in (False, True):
        learner, tokens, _ = _setup(corpus, "maml", top_layers=1, gradient_checkpointing=checkpointing)
        learner.zero_grad()
        learner.backward_batch(tokens, episodes)
        grads.append({n: p.grad for n, p in learner.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)


def test_meta_batch_shares_the_bottom_and_equals_the_mean_of_its_tasks(corpus):
    learner, tokens, _ = _setup(corpus, "maml", top_layers=1)
    episodes = EpisodeSampler(corpus, 3, 2, 2, seed=4).take(3)
    together, _ = learner.batch_loss(tokens, episodes)
    separate = torch.stack([learner.episode_loss(tokens, e)[0] for e in episodes]).mean()
    torch.testing.assert_close(together, separate)


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil"])
def test_task_by_task_backward_equals_one_backward_of_the_mean(corpus, name):
    learner, tokens, _ = _setup(corpus, name, top_layers=1)
    episodes = EpisodeSampler(corpus, 3, 2, 2, seed=7).take(3)
    learner.zero_grad()
    learner.batch_loss(tokens, episodes)[0].backward()
    expected = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    learner.zero_grad()
    learner.backward_batch(tokens, episodes)
    got = {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, msg=n)


def test_lora_inner_loop_adapts_only_adapters_and_round_trips(corpus, tmp_path):
    from metanlp.learners import load_learner, save_learner

    learner, _, _ = _setup(corpus, "maml", adapt="lora", top_layers=1, lora_rank=2)
    assert learner.adapted and all(".lora_" in n for n in learner.adapted)
    assert all(".layer.1." in n for n in learner.adapted), "adapters only in the top layer"
    learner.float()
    support, labels = ["rain today", "play a song", "rain tomorrow", "play music"], ["w", "m", "w", "m"]
    torch.manual_seed(0)
    before = learner.adapt(support, labels).predict(["rain later"]).scores
    save_learner(learner, tmp_path / "lora")
    loaded = load_learner(tmp_path / "lora")
    torch.testing.assert_close(torch.as_tensor(loaded.adapt(support, labels).predict(["rain later"]).scores),
                               torch.as_tensor(before))


def test_leopard_starts_as_proto_maml_and_its_generator_learns(corpus):
    learner, tokens, episode = _setup(corpus, "leopard")
    proto_maml, _, _ = _setup(corpus, "fomaml")
    proto_maml.load_state_dict({k: v for k, v in learner.state_dict().items()
                                if not k.startswith(("generator.", "log_inner_lrs."))}, strict=True)
    # A zero-initialised generator: the generated head is exactly the Proto-MAML head.
    h = learner.split.feature_fn(tokens.batch(episode.support))(
        {n: p for n, p in learner.encoder.named_parameters() if n in learner.adapted})
    targets = torch.as_tensor(episode.support_labels)
    for mine, theirs in zip(learner.initial_head(h, targets, 3), proto_maml.initial_head(h, targets, 3), strict=True):
        torch.testing.assert_close(mine, theirs)
    learner.episode_loss(tokens, episode)[0].backward()
    assert learner.generator[2].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in learner.log_inner_lrs.values())


@pytest.mark.parametrize("name", ["anil", "metasgd"])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmapped_batch_of_tasks_gives_the_loop_gradients(corpus, name, first_order):
    """Head-only inner loops over a meta-batch run as one torch.func.vmap; the meta-gradient equals the
    task-by-task loop's (anil: second order by default; metasgd: learned head rates get gradients too)."""
    learner, tokens, _ = _setup(corpus, name, adapt="head", first_order=first_order)
    episodes = EpisodeSampler(corpus, 3, 2, 2, seed=1).take(4)
    assert isinstance(learner.execution, VmappedHeads) and learner.execution.applies(learner, episodes)
    grads = {}
    for vmapped in (True, False):
        learner.execution = VmappedHeads() if vmapped else TaskLoop()
        learner.zero_grad()
        loss, logits = learner.backward_batch(tokens, episodes)
        grads[vmapped] = ({n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None},
                          loss, logits)
    (vmapped_grads, vmapped_loss, vmapped_logits), (loop_grads, loop_loss, loop_logits) = grads[True], grads[False]
    assert vmapped_grads.keys() == loop_grads.keys() and len(loop_grads) > 2
    if name == "metasgd":
        assert any("log_inner_lrs" in n for n in vmapped_grads)
    for n, g in loop_grads.items():
        torch.testing.assert_close(vmapped_grads[n], g, rtol=1e-6, atol=1e-9, msg=n)
    torch.testing.assert_close(vmapped_loss, loop_loss)
    for a, b in zip(vmapped_logits, loop_logits, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("name", "checkpointing"), [("maml", False), ("fomaml", False), ("metasgd", False),
                                                     ("leopard", False), ("maml", True)])
def test_stacked_tasks_give_the_task_loop_gradients(corpus, name, checkpointing):
    """Top-layer inner loops of a whole meta-batch at once (task-stacked fast weights, batched products; the
    default on CUDA, also under gradient checkpointing) give the task-by-task loop's meta-gradient, loss and
    logits."""
    learner, tokens, _ = _setup(corpus, name, top_layers=1, gradient_checkpointing=checkpointing)
    episodes = EpisodeSampler(corpus, 3, 2, 2, seed=1).take(3)
    results = {}
    for mode in ("always", "never"):
        learner.execution = StackedTasks(mode) if mode == "always" else TaskLoop()
        assert isinstance(learner.execution, StackedTasks) == (mode == "always")
        learner.zero_grad()
        loss, logits = learner.backward_batch(tokens, episodes)
        results[mode] = ({n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None},
                         loss, logits)
    (stacked, stacked_loss, stacked_logits), (loop, loop_loss, loop_logits) = results["always"], results["never"]
    assert stacked.keys() == loop.keys() and any(n.startswith("encoder.model.embeddings") for n in loop)
    for n, g in loop.items():
        torch.testing.assert_close(stacked[n], g, rtol=1e-6, atol=1e-10, msg=n)
    torch.testing.assert_close(stacked_loss, loop_loss)
    for a, b in zip(stacked_logits, loop_logits, strict=True):
        torch.testing.assert_close(a, b)


def test_stacked_tasks_need_same_shaped_episodes(corpus):
    learner, _, _ = _setup(corpus, "maml", batch_tasks="always")
    assert isinstance(learner.execution, StackedTasks)
    mixed = [EpisodeSampler(corpus, 3, 2, 2, seed=1).sample(), EpisodeSampler(corpus, 4, 2, 2, seed=1).sample()]
    assert not learner.execution.applies(learner, mixed)
    assert learner.execution.applies(learner, EpisodeSampler(corpus, 3, 2, 2, seed=1).take(2))
    on_cpu = _setup(corpus, "maml", batch_tasks="auto")[0]
    assert not on_cpu.execution.applies(on_cpu, EpisodeSampler(corpus, 3, 2, 2).take(2))
    assert isinstance(_setup(corpus, "maml", batch_tasks="never")[0].execution, TaskLoop)


def _randomise_update_network(learner, seed: int = 1, scale: float = 0.3):
    """The LSTM optimizer starts with a zero output layer (SGD); give it a random one so its weights matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.update_network.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.mark.parametrize("adapt", ["head", "top"])
def test_the_lstm_optimizer_with_its_output_fixed_to_sgd_takes_sgd_steps(corpus, adapt):
    """Output layer at zero: each step is -rate * grad (its learned step scale is 1 and it shrinks nothing), so the
    inner loop is MAML's, whatever the rest of the network holds."""
    lstm, tokens, episode = _setup(corpus, "lstm", adapt=adapt, top_layers=1)
    _randomise_update_network(lstm)
    with torch.no_grad():
        lstm.update_network.out.weight.zero_()
        lstm.update_network.out.bias.zero_()
    maml, _, _ = _setup(corpus, "maml", adapt=adapt, top_layers=1)
    maml.load_state_dict({k: v for k, v in lstm.state_dict().items() if not k.startswith("update_network.")})
    support, targets = tokens.batch(episode.support), torch.as_tensor(episode.support_labels)
    for track_meta in (True, False):
        learned = lstm.inner_loop(support, targets, 3, create_graph=False, track_meta=track_meta)
        sgd = maml.inner_loop(support, targets, 3, create_graph=False, track_meta=track_meta)
        assert learned.keys() == sgd.keys() and len(learned) == len(lstm.adapted) + 2
        for name in sgd:
            torch.testing.assert_close(learned[name], sgd[name], rtol=0, atol=1e-12, msg=name)
    torch.testing.assert_close(lstm.episode_loss(tokens, episode)[0], maml.episode_loss(tokens, episode)[0])

    _randomise_update_network(lstm)  # a trained-looking network takes other steps
    learned = lstm.inner_loop(support, targets, 3, create_graph=False, track_meta=False)
    assert not torch.allclose(learned["head.weight"], sgd["head.weight"])


def test_the_lstm_learners_meta_gradient_matches_finite_differences(corpus):
    """Second order: the meta-gradient of the query loss, for the LSTM's weights and the encoder's, is the
    derivative a finite difference measures."""
    learner, tokens, episode = _setup(corpus, "lstm", adapt="head")
    _randomise_update_network(learner)
    direction = _direction(learner)
    # log|grad| in the network's input is strongly curved where a gradient is small: a smaller step than MAML's
    # (1e-5 there moves some head gradients by as much as they are, and the difference is off by 4x)
    numeric = _directional(learner, tokens, episode, direction, eps=1e-7)
    analytic = _analytic(learner, tokens, episode, direction)
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-8)
    # ... and the LSTM alone gets its share (the direction restricted to its weights)
    only_lstm = [v if n.startswith("update_network.") else torch.zeros_like(v) for (n, _), v in
                 zip(((n, p) for n, p in learner.named_parameters() if p.requires_grad), direction, strict=True)]
    lstm_part = _analytic(learner, tokens, episode, only_lstm)
    assert lstm_part != 0 and lstm_part == pytest.approx(_directional(learner, tokens, episode, only_lstm, eps=1e-7),
                                                          rel=1e-4, abs=1e-8)
