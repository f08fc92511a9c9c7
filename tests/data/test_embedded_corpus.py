"""Data tests: the embedded default corpus is what params.yaml and the README say it is: several task kinds,
100+ training classes over 10+ domains, held-out intent domains and a held-out task kind, no text in two places,
and it passes the pipeline's validation with the evaluate stage's held-out dataset."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import REPO
from metanlp.data.load import DataError, default_corpus_path
from metanlp.data.pool import domain_weights, load_held_out
from metanlp.data.splits import split_classes
from metanlp.stages import load_params
from metanlp.stages import validate as validate_stage


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in default_corpus_path().read_text().splitlines()]


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


def kinds_of(rows: list[dict], domains: list[str]) -> set[str]:
    return {r["kind"] for r in rows if r["domain"] in domains}


def test_the_shipped_copy_is_the_dvc_versioned_file():
    versioned = REPO / "data" / "corpus.jsonl"
    if not versioned.exists():
        pytest.skip("data/ is not checked out (dvc pull data.dvc)")
    assert versioned.read_bytes() == default_corpus_path().read_bytes()


def test_every_domain_has_one_kind_and_every_class_one_domain(rows):
    kind_of: dict[str, set[str]] = {}
    domain_of: dict[str, set[str]] = {}
    for r in rows:
        kind_of.setdefault(r["domain"], set()).add(r["kind"])
        domain_of.setdefault(r["label"], set()).add(r["domain"])
    assert all(len(k) == 1 for k in kind_of.values())
    assert all(len(d) == 1 for d in domain_of.values())


def test_the_declared_split_trains_on_many_kinds_and_holds_out_domains_and_a_kind(rows, corpus, params):
    split = params.data.split
    classes = split_classes(corpus, split)
    assert len(classes.train) >= 100 and len(split.train_domains) >= 10
    assert min(Counter(r["label"] for r in rows if r["domain"] in split.train_domains).values()) >= 20
    train_kinds = kinds_of(rows, split.train_domains)
    assert len(train_kinds) >= 5 and {"intent", "sentiment", "topic"} <= train_kinds
    # Held-out domains of a kind that is trained on, and a held-out kind that is in no split at all.
    assert kinds_of(rows, split.test_domains) == {"intent"}
    (held_out,) = params.evaluate.datasets
    held_out_domains = held_out.where["domain"]
    held_out_domains = [held_out_domains] if isinstance(held_out_domains, str) else held_out_domains
    held_out_kinds = kinds_of(rows, held_out_domains)
    assert held_out_kinds and not held_out_kinds & (train_kinds | kinds_of(rows, split.val_domains))
    named = split.train_domains + split.val_domains + split.test_domains
    assert not set(held_out_domains) & set(named)


def test_no_text_is_repeated_across_splits_or_the_held_out_kind(rows, params):
    split = params.data.split
    part = {**{d: "train" for d in split.train_domains}, **{d: "val" for d in split.val_domains},
            **{d: "test" for d in split.test_domains}}
    where: dict[str, set[str]] = {}
    for r in rows:
        where.setdefault(r["text"].strip().lower(), set()).add(part.get(r["domain"], "held-out " + r["domain"]))
    assert not [t for t, places in where.items() if len(places) > 1]


def test_domain_label_spaces_weigh_rows_to_the_half(corpus):
    weights = domain_weights(corpus)
    rows_of = Counter(corpus.domains)
    assert set(weights) == set(rows_of)
    assert weights["news_topics"] == pytest.approx(rows_of["news_topics"] ** 0.5)


def test_validation_passes_and_reports_the_held_out_dataset(tiny_project):
    params = load_params(tiny_project / "params.yaml")
    result = validate_stage.run(params, tiny_project)
    report = json.loads((tiny_project / "artifacts" / "validation" / "report.json").read_text())
    assert result["classes"] == 126 and report["success"]
    assert report["datasets"] == {"emotion": {"rows": 132, "classes": 6, "label_spaces": 1}}


def test_an_eval_dataset_that_is_not_held_out_is_refused_by_name(tiny_project, corpus):
    params = load_params(tiny_project / "params.yaml")
    leaky = params.evaluate.datasets[0].model_copy(update={"name": "leaky", "where": {"domain": ["emotion", "pets"]}})
    seen = set(split_classes(corpus, params.data.split).train)
    with pytest.raises(DataError, match=r"evaluate.datasets 'leaky': classes \['dog_walker'.*not held out"):
        load_held_out(leaky, tiny_project, seen, tiny_project / "data" / "corpus.jsonl")
