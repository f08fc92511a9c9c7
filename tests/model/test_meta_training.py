"""Model (behavioural) tests: meta-training learns something that transfers to unseen classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metanlp.config import EncoderConfig, EpisodeConfig, SplitConfig, TrainConfig
from metanlp.data.splits import split_classes
from metanlp.learners import build_learner
from metanlp.train import meta_train


def _tiny_run(corpus, config, seed=0):
    split = split_classes(corpus, SplitConfig(by="random", sizes=(30, 6, 6), seed=0))
    learner = build_learner("protonet", config)
    train_config = TrainConfig(episodes=100, val_every=25, val_episodes=40, lr=1e-3, patience=10, warmup_episodes=0,
                               seed=seed, val_episode=EpisodeConfig(ways=5, shots=5, queries=5))
    result = meta_train(learner, corpus.with_classes(split.train), corpus.with_classes(split.val), train_config,
                        show_progress=False)
    return learner, result


def test_tiny_bert_validation_accuracy_rises_on_unseen_classes(corpus, tiny_encoder_config):
    _, result = _tiny_run(corpus, tiny_encoder_config)
    start = result.history[0]["val_accuracy"]
    assert result.best_val_accuracy >= start + 0.03, [h["val_accuracy"] for h in result.history]
    assert result.history[-1]["train_loss"] < result.history[1]["train_loss"]


def test_same_seed_same_metrics(corpus, tiny_encoder_config):
    _, first = _tiny_run(corpus, tiny_encoder_config)
    _, again = _tiny_run(corpus, tiny_encoder_config)
    assert [h["val_accuracy"] for h in first.history] == [h["val_accuracy"] for h in again.history]


@pytest.mark.slow
def test_default_encoder_separates_the_embedded_test_intents(corpus):
    """The packaged all-MiniLM-L6-v2, untouched, already tells apart intents it was never shown."""
    from metanlp.data.episodes import EpisodeSampler
    from metanlp.evaluation import run_episode

    test_classes = [c for c, d in corpus.domain_of_class().items() if d in {"real_estate", "events"}]
    test_set = corpus.with_classes(test_classes)
    frozen = build_learner("frozen", EncoderConfig())
    tokens = frozen.encoder.tokenize(test_set.texts)
    episodes = EpisodeSampler(test_set, 5, 1, 5, seed=0).take(40)
    accuracy = np.mean([run_episode(frozen, e, tokens, tokens, i).accuracy for i, e in enumerate(episodes)])
    assert accuracy > 0.7  # chance is 0.2


@pytest.mark.slow
def test_default_encoder_prediction_is_invariant_to_support_order():
    frozen = build_learner("frozen", EncoderConfig())
    support = ["is my rent paid", "the sink is leaking", "did the rent go through", "fix the broken heater"]
    labels = ["rent", "repair", "rent", "repair"]
    queries = ["when is rent due", "please fix the leaking sink"]
    forward = frozen.adapt(support, labels).predict(queries)
    backward = frozen.adapt(support[::-1], labels[::-1]).predict(queries)
    assert forward.labels == backward.labels == ["rent", "repair"]
    np.testing.assert_allclose(forward.scores, backward.scores, atol=1e-5)


@pytest.mark.parametrize("name", ["protonet", "metasgd"])
def test_interrupted_run_resumes_to_the_same_result(corpus, tiny_encoder_config, tmp_path, name):
    from metanlp.config import learner_config
    from metanlp.train import TrainingInterrupted

    split = split_classes(corpus, SplitConfig(by="random", sizes=(30, 6, 6), seed=0))
    train_set, val_set = corpus.with_classes(split.train), corpus.with_classes(split.val)
    config = TrainConfig(episodes=6, val_every=2, val_episodes=5, lr=1e-3, patience=10, tasks_per_step=2,
                         episode=EpisodeConfig(ways=3, shots=2, queries=2))
    spec = learner_config(name, **({} if name == "protonet" else {"inner_steps": 2}))

    def fresh():
        return build_learner(spec, tiny_encoder_config)

    whole = fresh()
    expected = meta_train(whole, train_set, val_set, config, show_progress=False)
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted):
        meta_train(fresh(), train_set, val_set, config, show_progress=False, checkpoint_dir=checkpoint,
                   stop_after=4)
    assert (checkpoint / "state.json").is_file()
    resumed_learner = fresh()
    resumed = meta_train(resumed_learner, train_set, val_set, config, show_progress=False, checkpoint_dir=checkpoint)
    assert resumed.history == expected.history
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed_learner.state_dict()[key], value)
    assert not checkpoint.exists(), "a finished run removes its checkpoint"


def test_checkpoint_from_other_settings_is_refused(corpus, tiny_encoder_config, tmp_path):
    from metanlp.data.load import DataError
    from metanlp.train import TrainingInterrupted

    split = split_classes(corpus, SplitConfig(by="random", sizes=(30, 6, 6), seed=0))
    train_set, val_set = corpus.with_classes(split.train), corpus.with_classes(split.val)
    config = TrainConfig(episodes=4, val_every=2, val_episodes=3, episode=EpisodeConfig(ways=3, shots=1, queries=1))
    with pytest.raises(TrainingInterrupted):
        meta_train(build_learner("protonet", tiny_encoder_config), train_set, val_set, config, show_progress=False,
                   checkpoint_dir=tmp_path / "c", stop_after=2)
    with pytest.raises(DataError, match=r"written with other settings \(train\)"):
        meta_train(build_learner("protonet", tiny_encoder_config), train_set, val_set,
                   config.model_copy(update={"lr": 1e-3}), show_progress=False, checkpoint_dir=tmp_path / "c")


def test_starting_weights_are_kept_when_no_validation_beats_them(corpus, tiny_encoder_config, monkeypatch):
    """Best-checkpoint selection includes episode 0: a run whose validation only falls returns its start."""
    import metanlp.train

    scores = iter([0.9, 0.8, 0.7, 0.6, 0.5])
    monkeypatch.setattr(metanlp.train, "validate", lambda *args, **kwargs: (next(scores), 0.01))
    split = split_classes(corpus, SplitConfig(by="random", sizes=(30, 6, 6), seed=0))
    learner = build_learner("protonet", tiny_encoder_config)
    start = {k: v.clone() for k, v in learner.state_dict().items()}
    result = meta_train(learner, corpus.with_classes(split.train), corpus.with_classes(split.val),
                        TrainConfig(episodes=4, val_every=1, val_episodes=2, lr=1e-2, patience=10, warmup_episodes=0),
                        show_progress=False)
    assert result.best_episode == 0 and result.episodes_run == 4
    assert all(torch.equal(v, start[k]) for k, v in learner.state_dict().items())


def test_leopards_generator_learns_at_the_encoders_rate_not_the_temperatures(corpus, tiny_encoder_config, tmp_path):
    """A network (LEOPARD's head generator) takes the encoder's learning rate; the temperature the fast one."""
    from safetensors.torch import load_file

    from metanlp.train import TrainingInterrupted

    split = split_classes(corpus, SplitConfig(by="random", sizes=(30, 6, 6), seed=0))
    learner = build_learner("leopard", tiny_encoder_config)
    start = {k: v.clone() for k, v in learner.state_dict().items()}
    config = TrainConfig(episodes=3, val_every=1, val_episodes=2, lr=1e-9, scale_lr=0.1, warmup_episodes=0,
                         episode=EpisodeConfig(ways=3, shots=2, queries=2), val_episode=EpisodeConfig(ways=3, shots=1,
                                                                                                       queries=2))
    with pytest.raises(TrainingInterrupted):
        meta_train(learner, corpus.with_classes(split.train), corpus.with_classes(split.val), config,
                   show_progress=False, checkpoint_dir=tmp_path / "checkpoint", stop_after=1)
    after = load_file(tmp_path / "checkpoint" / "weights.safetensors")
    moved = {k: (after[k] - start[k]).abs().max().item() for k in after}
    assert max(v for k, v in moved.items() if k.startswith("generator.")) < 1e-8
    assert moved["log_scale"] > 1e-2
