"""Code tests: the evaluation harness pairs methods on the same episodes and reports honest statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from metanlp.data.load import DataError
from metanlp.evaluation import build_settings, evaluate_methods, mean_ci
from metanlp.learners import build_learner
from metanlp.reporting import markdown_table, write_report


def test_mean_ci_is_196_sd_over_sqrt_n():
    values = np.array([0.2, 0.4, 0.6, 0.8])
    mean, ci = mean_ci(values)
    assert mean == pytest.approx(0.5)
    assert ci == pytest.approx(1.96 * values.std(ddof=1) / 2)
    assert math.isnan(mean_ci(np.array([1.0]))[1])


def test_methods_see_the_same_episodes_and_pairs_are_differences(corpus, tiny_encoder_config, tmp_path):
    from metanlp.encoder import TextEncoder

    encoder = TextEncoder.from_config(tiny_encoder_config)
    methods = {"frozen": build_learner("frozen", encoder), "protonet": build_learner("protonet", encoder)}
    settings = build_settings(corpus, 5, [1, 2], queries=3, episodes=12, repeats=1, support_data=None, seed=0)
    again = build_settings(corpus, 5, [1, 2], queries=3, episodes=12, repeats=1, support_data=None, seed=0)
    assert [e.classes for e in settings[0].episodes] == [e.classes for e in again[0].episodes]
    results = evaluate_methods(methods, corpus, settings, show_progress=False)
    for entry in results["settings"]:
        frozen, proto = entry["methods"]["frozen"], entry["methods"]["protonet"]
        # Same encoder and the same rule: identical per-episode accuracies, so the paired difference is 0.
        assert proto["per_episode"] == frozen["per_episode"]
        assert proto["diff_vs_frozen"] == 0.0
        assert 0.0 <= frozen["accuracy"] <= 1.0 and frozen["episodes"] == 12
    paths = write_report(results, tmp_path / "eval.json")
    assert json.loads(paths["json"].read_text())["settings"][0]["setting"] == "5-way 1-shot"
    assert "| 5-way 2-shot | protonet |" in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 1000


def test_episode_limits_use_a_common_prefix(corpus, tiny_encoder_config):
    from metanlp.encoder import TextEncoder

    encoder = TextEncoder.from_config(tiny_encoder_config)
    methods = {"frozen": build_learner("frozen", encoder), "finetune": build_learner("finetune", encoder)}
    settings = build_settings(corpus, 3, [1], queries=2, episodes=6, repeats=1, support_data=None, seed=1)
    results = evaluate_methods(methods, corpus, settings, show_progress=False, episode_limits={"finetune": 2})
    entry = results["settings"][0]["methods"]
    assert entry["finetune"]["episodes"] == 2 and entry["frozen"]["episodes"] == 6
    expected = np.mean(np.array(entry["finetune"]["per_episode"]) - np.array(entry["frozen"]["per_episode"][:2]))
    assert entry["finetune"]["diff_vs_frozen"] == pytest.approx(expected)
    assert "| 5-way" not in markdown_table(results) and "| 3-way 1-shot | finetune |" in markdown_table(results)


def test_full_label_space_settings(corpus):
    queries = corpus.select(range(0, len(corpus), 5))
    settings = build_settings(queries, "all", [5], queries=0, episodes=0, repeats=3, support_data=corpus, seed=0)
    assert settings[0].name == "all-way 5-shot" and len(settings[0].episodes) == 3
    assert all(len(e.query) == len(queries) for e in settings[0].episodes)
    with pytest.raises(DataError, match="--support-data is for the full label space"):
        build_settings(corpus, 5, [1], queries=1, episodes=1, repeats=1, support_data=corpus, seed=0)


def test_domain_label_spaces_keep_each_episode_in_one_domain(corpus):
    from metanlp.data.pool import domain_weights

    data = corpus.with_classes([c for c, d in corpus.domain_of_class().items()
                                if d in {"real_estate", "reviews_movies", "ticket_urgency"}])
    (setting,) = build_settings(data, 5, [2], queries=3, episodes=60, repeats=1, support_data=None, seed=0,
                                spaces=domain_weights(data), dataset="mixed")
    domain_of = data.domain_of_class()
    domains = [{domain_of[c] for c in e.classes} for e in setting.episodes]
    assert all(len(d) == 1 for d in domains)
    ways = {next(iter(d)): len(e.classes) for d, e in zip(domains, setting.episodes, strict=True)}
    assert ways == {"real_estate": 5, "reviews_movies": 2, "ticket_urgency": 3}  # ways = min(N, its classes)
    assert setting.name == "mixed: 5-way 2-shot"
    mixed = build_settings(data, 5, [2], queries=3, episodes=60, repeats=1, support_data=None, seed=0)[0]
    assert any(len({domain_of[c] for c in e.classes}) > 1 for e in mixed.episodes)  # without spaces they mix
