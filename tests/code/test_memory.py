"""Code tests: the episodic memory (retrieval, bound and eviction, persistence) and the memory learner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_jsonl
from metanlp.cli import app
from metanlp.config import MemoryConfig
from metanlp.data.load import DataError
from metanlp.learners import build_learner, load_learner, save_learner
from metanlp.learners.memory import (
    EpisodicMemory,
    eviction_keep,
    local_adaptation_helps,
    local_adaptation_logits,
    with_memory,
)
from metanlp.learners.protonet import prototype_logits
from metanlp.stages.register import model_digest

runner = CliRunner()
SUPPORT = ["water the tomatoes", "my dog is sick", "water the roses daily", "book the vet for my cat"]
LABELS = ["garden", "pets", "garden", "pets"]
QUERIES = ["how often to water basil", "vet visit for my puppy", "something else entirely"]
PAST = {"garden": ["prune the apple tree", "plant bulbs in autumn", "mow the lawn on sunday"],
        "pets": ["feed the hamster", "walk the dog twice", "brush the cat"],
        "cooking": ["boil the pasta", "bake bread at home", "slice the onions"]}


def test_retrieval_returns_the_true_nearest_rows_of_the_allowed_labels():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 16, generator=generator)
    labels = [f"c{i % 5}" for i in range(200)]
    memory = EpisodicMemory.empty(1000, 16)
    memory.add(keys, [f"t{i}" for i in range(200)], labels, ["task"] * 200)
    queries = torch.randn(7, 16, generator=generator)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    similarity = unit(queries.numpy()) @ unit(keys.numpy()).T
    indices, values = memory.nearest(queries, 5)
    np.testing.assert_array_equal(indices.numpy(), np.argsort(-similarity, axis=1)[:, :5])
    np.testing.assert_allclose(values.numpy(), -np.sort(-similarity, axis=1)[:, :5], atol=1e-5)
    allowed = np.array([label in ("c1", "c3") for label in labels])
    indices, _ = memory.nearest(queries, 5, ["c1", "c3"])
    expected = np.argsort(-np.where(allowed, similarity, -np.inf), axis=1)[:, :5]
    np.testing.assert_array_equal(indices.numpy(), expected)
    assert memory.nearest(queries, 5, ["never seen"])[0].shape == (7, 0)


def test_the_memory_keeps_its_bound_and_evicts_the_largest_groups_oldest_first():
    memory = EpisodicMemory.empty(10, 4)
    memory.add(torch.randn(12, 4), [f"old{i}" for i in range(12)], ["a"] * 12, ["big"] * 12)
    assert len(memory) == 10 and memory.texts == [f"old{i}" for i in range(2, 12)], "oldest of the group go"
    memory.add(torch.randn(4, 4), [f"new{i}" for i in range(4)], ["b"] * 4, ["small"] * 4)
    assert len(memory) == 10 and memory.keys.shape == (10, 4)
    assert memory.texts == [f"old{i}" for i in range(6, 12)] + [f"new{i}" for i in range(4)], (
        "the big group is cut, the small one keeps all its rows")
    # Equal groups over the bound: each is cut to the common cap; the leftover slot goes to the newest group.
    keep = eviction_keep(np.array(["x"] * 5 + ["y"] * 5), np.arange(10), 7)
    assert keep.tolist() == [2, 3, 4, 6, 7, 8, 9]


def test_a_memory_model_round_trips_and_a_memory_of_other_weights_is_refused(tmp_path, tiny_encoder_config):
    learner = with_memory(build_learner("protonet", tiny_encoder_config), MemoryConfig(capacity=50, neighbours=2))
    for label, texts in PAST.items():
        learner.remember(texts, [label] * len(texts), ["past"] * len(texts))
    before = learner.adapt(SUPPORT, LABELS).predict(QUERIES)
    save_learner(learner, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model" / "memory").iterdir()) == [
        "entries.parquet", "keys.safetensors", "memory.json"]
    loaded = load_learner(tmp_path / "model")
    assert loaded.memory.texts == learner.memory.texts and torch.equal(loaded.memory.keys, learner.memory.keys)
    np.testing.assert_allclose(loaded.adapt(SUPPORT, LABELS).predict(QUERIES).scores, before.scores, atol=1e-6)
    digest = model_digest(tmp_path / "model")  # the registry tells models apart by their memory too
    meta = tmp_path / "model" / "memory" / "memory.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "encoder_sha256": "0" * 64}))
    assert model_digest(tmp_path / "model") != digest
    with pytest.raises(DataError, match="other encoder weights"):
        load_learner(tmp_path / "model")


def test_a_memory_learner_with_nothing_remembered_saves_and_loads(tmp_path, tiny_encoder_config):
    save_learner(build_learner("memory", tiny_encoder_config), tmp_path / "empty")
    assert len(load_learner(tmp_path / "empty").memory) == 0


def test_borrowed_rows_move_only_the_prototypes_of_labels_the_memory_knows(tiny_encoder_config):
    base = build_learner("protonet", tiny_encoder_config)
    plain = base.adapt(SUPPORT, LABELS).state["prototypes"]
    empty = with_memory(base, MemoryConfig(min_similarity=-1.0))
    assert torch.allclose(empty.adapt(SUPPORT, LABELS).state["prototypes"], plain, atol=1e-6)
    learner = with_memory(base, MemoryConfig(neighbours=2, weight=0.5, min_similarity=-1.0))
    learner.remember(PAST["pets"] + PAST["cooking"], ["pets"] * 3 + ["cooking"] * 3, ["past"] * 6)
    state = learner.adapt(SUPPORT, LABELS).state
    assert torch.allclose(state["prototypes"][0], plain[0], atol=1e-6), "garden: nothing remembered"
    assert not torch.allclose(state["prototypes"][1], plain[1], atol=1e-4), "pets borrowed two rows"
    assert state["context_targets"].tolist() == [0, 1, 0, 1, 1, 1], "support rows, then the two borrowed pets"
    # The borrowed rows are the two nearest remembered pets to the support mean, at weight 0.5.
    pets = base.encoder.embed(base.encoder.tokenize(PAST["pets"]))
    mean = base.encoder.embed(base.encoder.tokenize([SUPPORT[1], SUPPORT[3]])).mean(dim=0)
    nearest = torch.nn.functional.cosine_similarity(pets, mean[None]).topk(2).indices
    support_pets = base.encoder.embed(base.encoder.tokenize([SUPPORT[1], SUPPORT[3]]))
    expected = (support_pets.sum(dim=0) + 0.5 * pets[nearest].sum(dim=0)) / 3.0
    assert torch.allclose(state["prototypes"][1], expected, atol=1e-5)


def test_local_adaptation_with_no_pull_fits_the_neighbours_and_with_zero_steps_is_the_cosine_rule():
    generator = torch.Generator().manual_seed(1)
    protos, context = torch.randn(3, 8, generator=generator), torch.randn(12, 8, generator=generator)
    targets, queries, scale = torch.arange(12) % 3, torch.randn(5, 8, generator=generator), torch.tensor(10.0)
    unit = torch.nn.functional.normalize
    still = local_adaptation_logits(queries, protos, context, targets, scale, MemoryConfig(local_steps=0))
    assert torch.allclose(still, scale * unit(queries, dim=-1) @ unit(protos, dim=-1).T, atol=1e-5)
    moved = local_adaptation_logits(queries, protos, context, targets, scale,
                                    MemoryConfig(local_steps=3, local_neighbours=4))
    assert not torch.allclose(moved, still, atol=1e-3)
    pinned = local_adaptation_logits(queries, protos, context, targets, scale,
                                     MemoryConfig(local_steps=3, local_l2=1e6, local_lr=1e-7))
    assert torch.allclose(pinned, still, atol=1e-3), "a strong pull keeps the prototypes"


def test_memory_command_builds_a_model_that_predicts_and_refuses_bad_input(tmp_path, tiny_encoder_config):
    save_learner(build_learner("protonet", tiny_encoder_config), tmp_path / "base")
    rows = [{"text": t, "label": label, "task": f"shop{i % 2}"} for label, texts in PAST.items()
            for i, t in enumerate(texts)]
    past = write_jsonl(tmp_path / "past.jsonl", rows)
    result = runner.invoke(app, ["memory", "--model", str(tmp_path / "base"), "--data", str(past),
                                 "--task-column", "task", "--capacity", "5", "--out", str(tmp_path / "mem")])
    assert result.exit_code == 0, result.output
    learner = load_learner(tmp_path / "mem")
    assert learner.config.kind == "memory" and len(learner.memory) == 5
    assert set(learner.memory.tasks) <= {"past/shop0", "past/shop1"}
    assert learner.adapt(SUPPORT, LABELS).predict(QUERIES).labels[0] in {"garden", "pets"}
    retuned = runner.invoke(app, ["memory", "--model", str(tmp_path / "mem"), "--local-steps", "3",
                                  "--no-local-check", "--out", str(tmp_path / "mbpa")])
    assert retuned.exit_code == 0, retuned.output
    mbpa = load_learner(tmp_path / "mbpa")
    assert mbpa.config.local_steps == 3 and mbpa.memory.texts == learner.memory.texts
    assert not mbpa.config.local_check and learner.config.local_check
    refused = runner.invoke(app, ["memory", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "none")])
    assert refused.exit_code != 0 and "--data" in refused.output and not (tmp_path / "none").exists()


def test_memory_command_remembers_the_tasks_a_service_kept(tmp_path, tiny_encoder_config):
    from metanlp.tasks import TaskStore

    base = build_learner("protonet", tiny_encoder_config)
    save_learner(base, tmp_path / "base")
    store = TaskStore(folder=tmp_path / "served")  # what `metanlp serve --tasks-dir` writes
    first = (PAST["garden"][:2] + PAST["cooking"][:2], ["garden", "garden", "cooking", "cooking"])
    second = (PAST["pets"][:2] + PAST["garden"][2:], ["pets", "pets", "garden"])
    one, _ = store.create(base, "v1", *first)
    two, _ = store.create(base, "v1", *second)
    store.create(base, "v1", *first, strategy="logreg")  # the same support set again: not remembered twice
    (tmp_path / "served" / "notes.json").write_text('{"not": "a task"}')
    result = runner.invoke(app, ["memory", "--model", str(tmp_path / "base"), "--served-tasks",
                                 str(tmp_path / "served"), "--out", str(tmp_path / "mem")])
    assert result.exit_code == 0, result.output
    memory = load_learner(tmp_path / "mem").memory
    remembered = sorted(zip(memory.tasks, memory.texts, memory.labels, strict=True))
    wanted = sorted([(f"served/{task.id}", text, label) for task, (texts, labels) in ((one, first), (two, second))
                     for text, label in zip(texts, labels, strict=True)])
    assert remembered == wanted
    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "empty", "no task records"), (tmp_path / "missing", "not a folder")):
        refused = runner.invoke(app, ["memory", "--model", str(tmp_path / "base"), "--served-tasks", str(folder),
                                      "--out", str(tmp_path / "none")])
        assert refused.exit_code != 0 and message in refused.output, refused.output
        assert not (tmp_path / "none").exists()


def _checked(rows: list[list[float]], targets: list[int], **options) -> bool:
    context, labels = torch.tensor(rows), torch.tensor(targets)
    members = torch.nn.functional.one_hot(labels, 2).T.float()
    config = MemoryConfig(local_steps=5, local_neighbours=1, **options)
    return local_adaptation_helps(members, context, labels, len(labels), torch.tensor(10.0), config)


def test_local_adaptation_is_used_only_where_it_classifies_more_left_out_support_rows_right():
    # Class 0 has two modes (near x and near y): its prototype sits between them, where class 1 is, so the
    # prototypes get its left-out rows wrong; each row's nearest other row is of its own mode, so MbPA gets them.
    bimodal = [[1, 0, 0.1], [0.98, 0.05, 0.1], [0, 1, 0.1], [0.05, 0.98, 0.1],
               [0.7, 0.7, -0.1], [0.72, 0.68, -0.12], [0.68, 0.72, -0.08], [0.71, 0.69, -0.11]]
    assert _checked(bimodal, [0, 0, 0, 0, 1, 1, 1, 1])
    # Two tight classes: the prototypes already get every row: a tie keeps the plain rule.
    apart = [[1, 0, 0.1], [0.98, 0.05, 0.1], [0.97, 0.02, 0.12], [0, 1, 0.1], [0.05, 0.98, 0.1], [0.02, 0.97, 0.1]]
    assert not _checked(apart, [0, 0, 0, 1, 1, 1])
    assert not _checked([[1, 0, 0.1], [0, 1, 0.1]], [0, 1]), "one shot: nothing to check on"


def test_a_memory_learner_follows_its_check_and_restores_what_it_decided(tiny_encoder_config):
    learner = with_memory(build_learner("protonet", tiny_encoder_config), MemoryConfig(local_steps=5))
    adapted = learner.adapt(SUPPORT, LABELS)
    assert set(adapted.state) >= {"local"}
    tokens = learner.encoder.tokenize(QUERIES)
    embedded, state = learner.encoder.embed(tokens), adapted.state
    plain = learner.restore(adapted.classes, {**state, "local": torch.tensor(0.0)})
    local = learner.restore(adapted.classes, {**state, "local": torch.tensor(1.0)})
    wanted_local = local_adaptation_logits(embedded, state["prototypes"], state["context"],
                                           state["context_targets"], state["scale"], learner.config)
    assert torch.allclose(local._logits(tokens), wanted_local, atol=1e-5)
    wanted_plain = prototype_logits(embedded, state["prototypes"], learner.config.distance, state["scale"])
    assert torch.allclose(plain._logits(tokens), wanted_plain, atol=1e-5)
    unchecked = with_memory(learner, MemoryConfig(local_steps=5, local_check=False)).adapt(SUPPORT, LABELS)
    assert float(unchecked.state["local"]) == 1.0
    off = with_memory(learner, MemoryConfig(local_steps=0)).adapt(SUPPORT, LABELS)
    assert float(off.state["local"]) == 0.0
