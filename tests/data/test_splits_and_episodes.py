"""Data tests: class-disjoint splits and the episode sampler."""

from __future__ import annotations

import numpy as np
import pytest

from metanlp.config import SplitConfig
from metanlp.data.episodes import EpisodeSampler, full_label_space_episode
from metanlp.data.load import DataError, LabelledTexts
from metanlp.data.splits import split_classes

DOMAIN_SPLIT = SplitConfig(train_domains=["garden", "fitness", "library", "pets"], val_domains=["it_helpdesk"],
                           test_domains=["real_estate", "events"])


def test_domain_split_is_class_disjoint_and_follows_domains(corpus):
    split = split_classes(corpus, DOMAIN_SPLIT)
    train, val, test = map(set, (split.train, split.val, split.test))
    assert not (train & val or train & test or val & test)
    domain_of = corpus.domain_of_class()
    assert {domain_of[c] for c in test} == {"real_estate", "events"}
    assert len(train) == 24 and len(val) == 6 and len(test) == 12


def test_random_split_is_seeded_and_disjoint(corpus):
    config = SplitConfig(by="random", sizes=(20, 10, 12), seed=3)
    first, again = split_classes(corpus, config), split_classes(corpus, config)
    assert first == again
    other = split_classes(corpus, config.model_copy(update={"seed": 4}))
    assert other != first
    assert not set(first.train) & set(first.test)


def test_split_errors_name_the_problem(corpus):
    with pytest.raises(DataError, match=r"test domains \['space'\] are not in the data"):
        split_classes(corpus, DOMAIN_SPLIT.model_copy(update={"test_domains": ["space"]}))
    with pytest.raises(DataError, match="need 150 classes, the data has 126"):
        split_classes(corpus, SplitConfig(by="random", sizes=(50, 50, 50)))
    with pytest.raises(ValueError, match="named in two splits"):
        SplitConfig(train_domains=["a"], val_domains=["a"], test_domains=["b"])
    no_domains = LabelledTexts(["a", "b"], ["x", "y"])
    with pytest.raises(DataError, match="no 'domain' column"):
        split_classes(no_domains, DOMAIN_SPLIT)


def test_excluded_labels_are_in_no_split(corpus):
    config = SplitConfig(by="random", sizes=(20, 10, 11), exclude_labels=["late_fee"], seed=0)
    split = split_classes(corpus, config)
    assert "late_fee" not in split.train + split.val + split.test


def test_sampler_is_deterministic_for_a_seed(corpus):
    first = EpisodeSampler(corpus, 5, 2, 3, seed=11).take(20)
    again = EpisodeSampler(corpus, 5, 2, 3, seed=11).take(20)
    other = EpisodeSampler(corpus, 5, 2, 3, seed=12).take(20)
    for a, b in zip(first, again, strict=True):
        assert a.classes == b.classes
        np.testing.assert_array_equal(a.support, b.support)
        np.testing.assert_array_equal(a.query, b.query)
    assert any(a.classes != c.classes for a, c in zip(first, other, strict=True))


def test_episode_shapes_labels_and_disjoint_support_query(corpus):
    for episode in EpisodeSampler(corpus, 4, 3, 2, seed=0).take(30):
        assert len(episode.classes) == 4
        assert len(episode.support) == 12 and len(episode.query) == 8
        assert not set(episode.support) & set(episode.query)
        for rows, labels in ((episode.support, episode.support_labels), (episode.query, episode.query_labels)):
            assert [corpus.labels[r] for r in rows] == [episode.classes[i] for i in labels]


def test_episodes_of_a_split_only_use_its_classes(corpus):
    split = split_classes(corpus, DOMAIN_SPLIT)
    test_set = corpus.with_classes(split.test)
    for episode in EpisodeSampler(test_set, 5, 1, 5, seed=0).take(50):
        assert set(episode.classes) <= set(split.test)
        assert {test_set.labels[r] for r in episode.query} <= set(split.test)


def test_class_with_too_few_examples_is_named(corpus):
    few = LabelledTexts(["a", "b", "c", "d", "e"], ["x", "x", "x", "y", "y"], source="tiny.jsonl")
    with pytest.raises(DataError, match=r"tiny.jsonl: 2-shot 1-query episodes need 3 examples per class; "
                                        r"1 classes have fewer \('y' has 2\)"):
        EpisodeSampler(few, 2, 2, 1)
    with pytest.raises(DataError, match="3-way episodes need 3 classes"):
        EpisodeSampler(few, 3, 1, 1)


def test_sampler_state_resumes_the_same_sequence(corpus):
    sampler = EpisodeSampler(corpus, 5, 1, 1, seed=5)
    sampler.take(3)
    state = sampler.state()
    expected = sampler.take(4)
    resumed = EpisodeSampler(corpus, 5, 1, 1, seed=99)
    resumed.set_state(state)
    assert [e.classes for e in resumed.take(4)] == [e.classes for e in expected]


def test_full_label_space_from_one_set_and_from_a_support_set(corpus):
    episode = full_label_space_episode(corpus, None, shots=5, seed=0)
    assert len(episode.classes) == len(corpus.classes)
    assert len(episode.support) == 5 * len(corpus.classes)
    assert len(episode.query) == len(corpus) - len(episode.support)
    assert not set(episode.support) & set(episode.query)
    queries = corpus.select(range(0, len(corpus), 7))
    separate = full_label_space_episode(corpus, queries, shots=3, seed=1)
    assert len(separate.query) == len(queries)
    assert [separate.classes[i] for i in separate.query_labels] == queries.labels
    other_draw = full_label_space_episode(corpus, queries, shots=3, seed=2)
    assert not np.array_equal(separate.support, other_draw.support)


def test_full_label_space_rejects_query_labels_without_support(corpus):
    queries = LabelledTexts(["what is this"], ["unknown_intent"], source="q.jsonl")
    with pytest.raises(DataError, match=r"q.jsonl: labels \['unknown_intent'\] have no examples"):
        full_label_space_episode(corpus, queries, shots=1, seed=0)
