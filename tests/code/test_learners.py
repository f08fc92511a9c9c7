"""Code tests: the learner interface, save/load round trip, and that adaptation leaves the learner as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metanlp.config import Provenance
from metanlp.data.load import DataError
from metanlp.learners import build_learner, load_learner, save_learner

SUPPORT = ["water the tomatoes", "my dog is sick", "water the roses daily", "book the vet for my cat"]
LABELS = ["garden", "pets", "garden", "pets"]
QUERIES = ["how often to water basil", "vet visit for my puppy", "something else entirely"]


@pytest.mark.parametrize("name", ["protonet", "frozen", "finetune"])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, tiny_encoder_config, name):
    provenance = Provenance(classes={"train": ["a"], "val": ["b"], "test": ["c"]})
    learner = build_learner(name, tiny_encoder_config, provenance).eval()
    with torch.no_grad():
        for p in learner.parameters():  # move away from the freshly built weights, so loading must restore them
            p.add_(0.01 * torch.randn_like(p))
    torch.manual_seed(0)
    before = learner.adapt(SUPPORT, LABELS).predict(QUERIES)
    save_learner(learner, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["encoder", "learner.json", "model.safetensors"]
    spec = json.loads((tmp_path / "model" / "learner.json").read_text())
    assert spec["learner"]["kind"] == name and spec["provenance"]["classes"]["test"] == ["c"]
    loaded = load_learner(tmp_path / "model")
    torch.manual_seed(0)
    after = loaded.adapt(SUPPORT, LABELS).predict(QUERIES)
    assert after.labels == before.labels
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-5)


def test_save_replaces_an_existing_model_whole(tmp_path, tiny_encoder_config):
    target = tmp_path / "model"
    save_learner(build_learner("protonet", tiny_encoder_config), target)
    save_learner(build_learner("frozen", tiny_encoder_config), target)
    assert json.loads((target / "learner.json").read_text())["learner"]["kind"] == "frozen"
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "staging or retired folders were left behind"


def test_loading_something_that_is_not_a_model_fails_clearly(tmp_path):
    with pytest.raises(DataError, match="not a metanlp model"):
        load_learner(tmp_path)
    (tmp_path / "learner.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid learner spec"):
        load_learner(tmp_path)


def test_finetune_adapt_leaves_the_base_encoder_untouched(tiny_encoder_config):
    learner = build_learner("finetune", tiny_encoder_config)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    torch.manual_seed(0)
    first = learner.adapt(SUPPORT, LABELS)
    first_scores = first.predict(QUERIES).scores
    learner.adapt(["a b c", "d e f"], ["x", "y"])  # a second adaptation must not change the first classifier
    for key, value in learner.state_dict().items():
        torch.testing.assert_close(value, before[key])
    np.testing.assert_allclose(first.predict(QUERIES).scores, first_scores, atol=1e-6)


def test_adapt_rejects_a_single_class_support(tiny_encoder_config):
    with pytest.raises(DataError, match="one class"):
        build_learner("protonet", tiny_encoder_config).adapt(["a", "b"], ["x", "x"])


def test_unknown_learner_name(tiny_encoder_config):
    with pytest.raises(ValueError, match="unknown learner 'mystery'"):
        build_learner("mystery", tiny_encoder_config)


def test_tokenisation_trims_padding_per_batch(tiny_encoder_config):
    from metanlp.encoder import TextEncoder

    encoder = TextEncoder.from_config(tiny_encoder_config)
    tokens = encoder.tokenize(["short", "a much longer text with many more words in it than the other"])
    assert tokens.batch([0]).input_ids.shape[1] < tokens.batch([0, 1]).input_ids.shape[1]
    full = encoder.embed(tokens)
    torch.testing.assert_close(encoder.embed(tokens, rows=[1]), full[1:], atol=1e-5, rtol=1e-4)


def test_head_and_tail_truncation_keeps_a_long_texts_start_and_end(tmp_path, tiny_encoder_config):
    """`keep_tail` cuts a long text's middle out: its first tokens and the last share of max_length stay, with the
    tokenizer's start and end tokens; short texts, and keep_tail 0, tokenise as the tokenizer truncates."""
    from pydantic import ValidationError

    from metanlp.encoder import TextEncoder

    texts = ["short text", "opening words " + " ".join(["filler"] * 40) + " closing verdict"]
    head_only = TextEncoder.from_config(tiny_encoder_config.model_copy(update={"max_length": 16}))
    both = TextEncoder.from_config(tiny_encoder_config.model_copy(update={"max_length": 16, "keep_tail": 0.5}))
    decode = head_only.tokenizer.decode
    cut, whole = head_only.tokenize(texts), both.tokenize(texts)
    assert whole.input_ids.shape == cut.input_ids.shape == (2, 16)
    assert torch.equal(whole.input_ids[0], cut.input_ids[0]) and torch.equal(whole.lengths, cut.lengths)
    start, end = decode(whole.input_ids[1][:8]), decode(whole.input_ids[1][8:])
    assert start.startswith("[CLS] opening words") and end.endswith("closing verdict [SEP]")
    assert "closing" not in decode(cut.input_ids[1]) and decode(cut.input_ids[1]).endswith("[SEP]")
    most = TextEncoder.from_config(tiny_encoder_config.model_copy(update={"max_length": 8, "keep_tail": 0.99}))
    assert decode(most.tokenize(texts).input_ids[1]).startswith("[CLS] filler")  # never the start token cut
    # saved with the model, and not written when unset (older models keep their bytes)
    learner = build_learner("protonet", both.config)
    save_learner(learner, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "learner.json").read_text())["encoder"]["keep_tail"] == 0.5
    assert load_learner(tmp_path / "model").encoder.config.keep_tail == 0.5
    assert "keep_tail" not in head_only.config.model_dump()
    with pytest.raises(ValidationError, match="keep_tail"):
        type(tiny_encoder_config).model_validate({**tiny_encoder_config.model_dump(), "keep_tail": 1.0})


def _format_one(directory, learner: dict, section: str, options: dict):
    """A model folder as metanlp wrote it before learner specs were a union: name + family section."""
    spec = json.loads((directory / "learner.json").read_text())
    old = {"learner": learner, "encoder": spec["encoder"], section: options,
           "split": None, "classes": {"train": ["a"], "val": ["b"], "test": ["c"]}, "train_data": "x.jsonl"}
    (directory / "learner.json").write_text(json.dumps(old))


@pytest.mark.parametrize(("kind", "section", "options"), [
    ("frozen", "protonet", {"distance": "cosine", "init_scale": 10.0, "learn_scale": False}),
    ("fomaml", "gradient", {"inner_steps": 2, "first_order": True, "adapt": "top", "top_layers": 1}),
])
def test_models_saved_in_the_first_format_still_load(tmp_path, tiny_encoder_config, kind, section, options):
    from metanlp.config import learner_config

    config = learner_config(kind, **{k: v for k, v in options.items() if k != "learn_scale"})
    learner = build_learner(config, tiny_encoder_config).eval()
    save_learner(learner, tmp_path / "model")
    _format_one(tmp_path / "model", kind, section, options)
    loaded = load_learner(tmp_path / "model")
    assert loaded.config == learner.config and loaded.provenance.classes["test"] == ["c"]
    torch.manual_seed(0)
    np.testing.assert_allclose(loaded.adapt(SUPPORT, LABELS).predict(QUERIES).scores,
                               learner.adapt(SUPPORT, LABELS).predict(QUERIES).scores, atol=1e-6)


def test_a_spec_whose_options_contradict_its_kind_is_refused(tmp_path, tiny_encoder_config):
    """Before, `anil` with adapt 'top' silently ran MAML under ANIL's name; now the kind fixes what it means."""
    from metanlp.config import learner_config

    with pytest.raises(ValueError, match="adapt"):
        learner_config("anil", adapt="top")
    save_learner(build_learner(learner_config("maml", top_layers=1), tiny_encoder_config), tmp_path / "model")
    _format_one(tmp_path / "model", "anil", "gradient", {"adapt": "top", "top_layers": 1})
    with pytest.raises(DataError, match="written by an earlier metanlp.*'anil'"):
        load_learner(tmp_path / "model")


def test_the_same_spec_builds_the_same_learner(tiny_encoder_config):
    """Weights a learner creates itself (LEOPARD's generator) come from a seeded generator, not from whatever
    state torch's global one is in."""
    first = build_learner("leopard", tiny_encoder_config)
    torch.rand(5)  # the global stream moves on; the next build must not notice
    second = build_learner("leopard", tiny_encoder_config)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_an_episode_leaves_the_callers_random_stream_alone(corpus, tiny_encoder_config):
    """Fine-tuning draws a head and minibatches from a generator seeded per episode; meta-training's dropout
    stream around a validation is not moved by it."""
    from metanlp.data.episodes import EpisodeSampler
    from metanlp.evaluation import run_episode

    learner = build_learner("finetune", tiny_encoder_config)
    learner.config = learner.config.model_copy(update={"steps": 2, "min_epochs": 0})
    tokens = learner.encoder.tokenize(corpus.texts)
    episode = EpisodeSampler(corpus, 3, 2, 2, seed=0).sample()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = run_episode(learner, episode, tokens, tokens, seed=7).accuracy
    assert torch.equal(torch.get_rng_state(), before)
    assert run_episode(learner, episode, tokens, tokens, seed=7).accuracy == first


@pytest.mark.parametrize("kind", ["protonet", "frozen", "logreg", "maml", "anil", "metasgd", "leopard", "reptile",
                                  "lstm"])
def test_a_classifier_rebuilt_from_its_state_predicts_what_adapt_did(tiny_encoder_config, kind):
    """What a served task saves (safetensors) and restores after a restart: the same scores, no adapting."""
    from safetensors.torch import load, save

    learner = build_learner(kind, tiny_encoder_config).eval()
    support = ["rain today", "sunny and warm", "play a song", "turn the music up", "a cold wind", "next track"]
    labels = ["weather", "weather", "music", "music", "weather", "music"]
    adapted = learner.adapt(support, labels)
    assert adapted.state is not None
    restored = learner.restore(adapted.classes, load(save(adapted.state)))
    queries = ["is it raining", "skip this song"]
    np.testing.assert_allclose(restored.predict(queries).scores, adapted.predict(queries).scores, atol=1e-6)
    with pytest.raises(DataError, match="adapted state"):  # a state for another label space is refused
        learner.restore(adapted.classes + ["extra"], adapted.state)


def test_a_fine_tuned_classifier_keeps_no_state(tiny_encoder_config):
    """Its state would be a whole encoder per task: a served fine-tune task is adapted again instead."""
    learner = build_learner("finetune", tiny_encoder_config)
    classifier = learner.adapt(["a b", "c d", "e f", "g h"], ["x", "x", "y", "y"])
    assert classifier.state is None
    with pytest.raises(NotImplementedError):
        learner.restore(classifier.classes, {})
