"""The SMLMT cloze-task generator: deterministic, the masked word really gone, labels naming the right word."""

from __future__ import annotations

import re

from metanlp.data.episodes import EpisodeSampler
from metanlp.data.smlmt import CLASS_PREFIX, SMLMTConfig, build_smlmt, mask_word, split_sentences

MASK = "[MASK]"
CONFIG = SMLMTConfig(min_sentences=4, max_fraction=0.5, max_words=6, sentences_per_word=4, seed=3)


def sentences(corpus) -> list[str]:
    return list(corpus.texts)


def test_same_seed_same_tasks_other_seed_other_words(corpus):
    first = build_smlmt(sentences(corpus), MASK, CONFIG)
    again = build_smlmt(list(reversed(sentences(corpus))), MASK, CONFIG)  # input order does not matter
    assert (first.texts, first.labels) == (again.texts, again.labels)
    other = build_smlmt(sentences(corpus), MASK, SMLMTConfig(**{**CONFIG.__dict__, "seed": 4}))
    assert set(other.classes) != set(first.classes)


def test_masked_word_is_absent_and_label_names_it(corpus):
    tasks = build_smlmt(sentences(corpus), MASK, CONFIG)
    assert len(tasks.classes) == 6 and len(tasks) == 24
    originals = {s.lower() for s in corpus.texts}
    for text, label in zip(tasks.texts, tasks.labels, strict=True):
        word = label.removeprefix(CLASS_PREFIX)
        assert label.startswith(CLASS_PREFIX) and MASK in text
        assert not re.search(rf"(?<![a-z']){re.escape(word)}(?![a-z'])", text.lower())
        # putting the word back gives a sentence of the corpus: the label is the word that was masked
        assert text.replace(MASK, word).lower() in originals


def test_masking_is_whole_word_and_case_blind():
    masked = mask_word("Book a book, not a bookshelf. BOOK!", "book", MASK)
    assert masked == f"{MASK} a {MASK}, not a bookshelf. {MASK}!"


def test_smlmt_classes_make_episodes(corpus):
    tasks = build_smlmt(sentences(corpus), MASK, CONFIG)
    episode = EpisodeSampler(tasks, 3, 2, 2, seed=0).sample()
    assert len(episode.classes) == 3 and all(c.startswith(CLASS_PREFIX) for c in episode.classes)


def test_sentences_from_running_text():
    text = ["= Heading =", "The first sentence is here now. Short one. And a second sentence follows it."]
    assert split_sentences(text) == ["The first sentence is here now.", "And a second sentence follows it."]


def test_hybrid_sampler_keeps_pools_apart_and_follows_the_fraction(corpus):
    from metanlp.data.load import LabelledTexts

    tasks = build_smlmt(sentences(corpus), MASK, CONFIG)
    mixed = LabelledTexts(tasks.texts + corpus.texts, tasks.labels + corpus.labels)
    sampler = EpisodeSampler(mixed, 3, 2, 2, seed=0, mix=(CLASS_PREFIX, 0.25))
    kinds = [{c.startswith(CLASS_PREFIX) for c in sampler.sample().classes} for _ in range(400)]
    assert all(len(k) == 1 for k in kinds)  # an episode is all cloze or all supervised
    share = sum(k == {True} for k in kinds) / len(kinds)
    assert 0.18 < share < 0.32
