"""Data tests: a task pool of several datasets. Each episode comes from one label space; ways follow it;
spaces are drawn by weight; the same seed gives the same episodes, and a sampler resumes where it stopped. A
pool entry that cannot be used is refused with its name before anything is trained."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import write_jsonl
from metanlp.cli import app
from metanlp.config import TaskPool
from metanlp.data.episodes import EpisodeSampler
from metanlp.data.load import DataError
from metanlp.data.pool import SEPARATOR, read_pool, role_set

WORDS = {"pos": "great", "neg": "awful", "sport": "match", "tech": "chip", "arts": "paint", "food": "soup",
         "yes": "agree", "no": "refuse", "up": "rise", "down": "fall"}


def labelled(path: Path, labels: list[str], per_class: int = 8, task: str | None = None) -> Path:
    extra = {"task": task} if task else {}
    rows = [{"text": f"{WORDS[label]} number {i} {task or ''}".strip(), "label": label, **extra}
            for label in labels for i in range(per_class)]
    return write_jsonl(path, rows)


@pytest.fixture
def pool_file(tmp_path: Path) -> Path:
    labelled(tmp_path / "sentiment.jsonl", ["pos", "neg"], per_class=40)
    labelled(tmp_path / "topics.jsonl", ["sport", "tech", "arts", "food"], per_class=10)
    rows = [json.loads(line) for task in ("a", "b", "c")
            for line in labelled(tmp_path / f"t{task}.jsonl", ["yes", "no"], task=task).read_text().splitlines()]
    write_jsonl(tmp_path / "tasks.jsonl", rows)
    labelled(tmp_path / "val.jsonl", ["up", "down", "pos", "neg"])
    pool = {"tasks": [
        {"name": "sentiment", "path": "sentiment.jsonl", "role": "meta_train"},
        {"name": "topics", "path": "topics.jsonl", "role": "meta_train", "weight": 3.0},
        {"name": "tasks", "path": "tasks.jsonl", "role": "meta_train", "task_column": "task"},
        {"name": "held", "path": "val.jsonl", "role": "meta_val"},
    ]}
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(pool))
    return path


def test_each_episode_comes_from_one_label_space_and_its_ways_follow_it(pool_file):
    pool, root = read_pool(pool_file)
    data, weights = role_set(pool, root, "meta_train")
    assert sorted(weights) == ["sentiment", "tasks/a", "tasks/b", "tasks/c", "topics"]
    sampler = EpisodeSampler(data, 5, 2, 2, seed=0, spaces=weights)
    for episode in sampler.take(200):
        spaces = {c.split(SEPARATOR)[0] for c in episode.classes}
        assert len(spaces) == 1
        expected_ways = {"sentiment": 2, "topics": 4}.get(next(iter(spaces)), 2)
        assert len(episode.classes) == expected_ways
        assert len(episode.support) == 2 * expected_ways and len(episode.query) == 2 * expected_ways


def test_spaces_are_drawn_by_weight(pool_file):
    pool, root = read_pool(pool_file)
    data, weights = role_set(pool, root, "meta_train")
    # default weight: rows ** 0.5, a dataset with a task column shares its weight among its tasks
    assert weights["sentiment"] == pytest.approx(80 ** 0.5)
    assert weights["topics"] == 3.0
    assert weights["tasks/a"] == pytest.approx(48 ** 0.5 / 3)
    draws = Counter(e.classes[0].split(SEPARATOR)[0] for e in EpisodeSampler(data, 5, 2, 2, seed=1,
                                                                            spaces=weights).take(4000))
    total = sum(weights.values())
    for space, weight in weights.items():
        assert draws[space] / 4000 == pytest.approx(weight / total, abs=0.03), space


def test_same_seed_same_episodes_and_resume(pool_file):
    pool, root = read_pool(pool_file)
    data, weights = role_set(pool, root, "meta_train")
    first = EpisodeSampler(data, 5, 2, 2, seed=3, spaces=weights).take(30)
    again = EpisodeSampler(data, 5, 2, 2, seed=3, spaces=weights).take(30)
    assert [e.classes for e in first] == [e.classes for e in again]
    assert all(np.array_equal(a.support, b.support) for a, b in zip(first, again, strict=True))
    sampler = EpisodeSampler(data, 5, 2, 2, seed=3, spaces=weights)
    sampler.take(10)
    resumed = EpisodeSampler(data, 5, 2, 2, seed=99, spaces=weights)
    resumed.set_state(sampler.state())
    assert [e.classes for e in resumed.take(20)] == [e.classes for e in first[10:]]


def test_short_classes_are_left_out_and_counted(tmp_path):
    rows = [{"text": f"{label} {i}", "label": label} for label, n in (("a", 6), ("b", 6), ("c", 2)) for i in range(n)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    pool = TaskPool.model_validate({"tasks": [{"name": "d", "path": "d.jsonl", "role": "meta_train"}]})
    data, weights = role_set(pool, tmp_path, "meta_train")
    sampler = EpisodeSampler(data, 5, 2, 2, seed=0, spaces=weights)
    assert sampler.short == 1 and all(len(e.classes) == 2 for e in sampler.take(10))


@pytest.mark.parametrize(("change", "message"), [
    ({"path": "missing.jsonl"}, "missing.jsonl: no such file"),
    ({"classes": ["pos"]}, "label space 'sentiment' has 1 class"),
    ({"role": "teacher"}, "tasks.0.role"),
    ({"classes": ["pos", "nope"]}, "classes ['nope'] are not in"),
    ({"where": {"split": "x"}}, "no column 'split' to filter on"),
    ({"name": "topics"}, "dataset names must be unique"),
])
def test_a_bad_pool_entry_is_refused_by_name_and_nothing_is_trained(pool_file, tmp_path, change, message):
    pool = yaml.safe_load(pool_file.read_text())
    pool["tasks"][0].update(change)
    pool_file.write_text(yaml.safe_dump(pool))
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["train", "--pool", str(pool_file), "--encoder", "tiny-random-bert",
                                      "--episodes", "2", "--out", str(out), "--no-checkpoint", "--quiet"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_a_pool_without_meta_train_data_is_refused():
    with pytest.raises(ValueError, match="at least one dataset with role 'meta_train'"):
        TaskPool.model_validate({"tasks": [{"name": "x", "path": "x.jsonl", "role": "eval"}]})


def test_a_missing_role_is_named(pool_file):
    pool, root = read_pool(pool_file)
    with pytest.raises(DataError, match="no dataset with role 'eval'"):
        role_set(pool, root, "eval")


@pytest.mark.parametrize("learner", ["protonet", "maml", "anil", "reptile", "leopard"])
def test_every_learner_meta_trains_on_episodes_of_varying_ways(pool_file, tmp_path, learner):
    """Meta-batches mix 2- and 4-way tasks: the vmapped and stacked executions fall back to the task loop."""
    from metanlp.learners import load_learner

    out = tmp_path / learner
    extra = [] if learner == "protonet" else ["--inner-steps", "1", "--tasks-per-step", "3"]
    result = CliRunner().invoke(app, ["train", "--pool", str(pool_file), "--encoder", "tiny-random-bert",
                                      "--learner", learner, "--episodes", "3", "--val-every", "3", "--val-episodes",
                                      "4", "--shots", "2", "--queries", "2", "--out", str(out), "--no-checkpoint",
                                      "--quiet", *extra])
    assert result.exit_code == 0, result.output
    model = load_learner(out)
    assert [t.name for t in model.provenance.pool.tasks] == ["sentiment", "topics", "tasks", "held"]
    assert model.adapt(["great one", "awful one"], ["pos", "neg"]).predict(["great two"]).scores.shape == (1, 2)


def test_a_text_may_have_another_label_in_another_task_but_not_in_the_same_one(tmp_path):
    # ARSC: a 4-star review is positive at threshold 2 and negative at threshold 5.
    rows = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg", "task": "t2"} for i in range(6)]
    rows += [{"text": f"review {i}", "label": "neg" if i % 2 else "pos", "task": "t5"} for i in range(6)]
    write_jsonl(tmp_path / "reviews.jsonl", rows)
    pool = {"tasks": [{"name": "reviews", "path": "reviews.jsonl", "role": "meta_train", "task_column": "task"}]}
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(pool))
    data, _ = role_set(*read_pool(tmp_path / "pool.yaml"), "meta_train")
    assert len(data) == 12
    write_jsonl(tmp_path / "reviews.jsonl", rows + [{"text": "review 1", "label": "neg", "task": "t2"}])
    with pytest.raises(DataError, match="the same text as line 2 with another label"):
        role_set(*read_pool(tmp_path / "pool.yaml"), "meta_train")


def test_conflicting_labels_drop_removes_every_row_of_a_text_given_two_labels(tmp_path, caplog):
    rows = [{"text": f"noisy {i}", "label": "pos" if i % 2 else "neg"} for i in range(8)]
    rows.append({"text": "noisy 1", "label": "neg"})  # line 2 said pos
    write_jsonl(tmp_path / "noisy.jsonl", rows)
    entry = {"name": "noisy", "path": "noisy.jsonl", "role": "meta_train"}
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump({"tasks": [entry]}))
    with pytest.raises(DataError, match="noisy.jsonl:9: the same text as line 2"):
        role_set(*read_pool(tmp_path / "pool.yaml"), "meta_train")
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump({"tasks": [{**entry, "conflicting_labels": "drop"}]}))
    data, _ = role_set(*read_pool(tmp_path / "pool.yaml"), "meta_train")
    assert len(data) == 7 and "noisy 1" not in data.texts
    assert "1 texts have two labels; their 2 rows are dropped" in caplog.text
