"""Code tests: the benchmark suite scores every method on the same supports and queries, counts short
classes, draws a fixed support once, reuses rows of an earlier run when told, and writes its reports; the
logistic-regression head solves scikit-learn's objective."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import write_jsonl
from metanlp.cli import app

WORDS = {"a": "apple", "b": "banana", "c": "cherry", "x": "yes", "y": "no"}


def split_files(root: Path, name: str, counts: dict[str, int], extra: dict | None = None) -> None:
    for split in ("train", "test"):
        rows = [{"text": f"{WORDS[label]} {split} {i}", "label": label, **(extra or {})}
                for label, n in counts.items() for i in range(n if split == "train" else 4)]
        write_jsonl(root / f"{name}_{split}.jsonl", rows)


@pytest.fixture
def suite_pool(tmp_path: Path) -> Path:
    split_files(tmp_path, "fruit", {"a": 12, "b": 12, "c": 3})  # c is short at K = 5
    split_files(tmp_path, "fixed", {"x": 2, "y": 2})  # every class has <= K: one fixed support
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"{WORDS[k]} {i}", "label": k} for k in "abc" for i in range(6)])
    pool = {"tasks": [{"name": "seen", "path": "train.jsonl", "role": "meta_train"},
                      {"name": "fruit", "path": "fruit_{split}.jsonl", "role": "eval"},
                      {"name": "fixed", "path": "fixed_{split}.jsonl", "role": "eval", "shots": [5]}]}
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(pool))
    return tmp_path / "pool.yaml"


def test_every_method_sees_the_same_supports_and_the_report_says_so(suite_pool, tmp_path):
    out = tmp_path / "suite.json"
    args = ["benchmark", "--pool", str(suite_pool), "--methods", "frozen,logreg", "--encoder", "tiny-random-bert",
            "--shots", "5", "--draws", "2", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    keys = {m: sorted(r["key"] for r in rows if r["method"] == m) for m in ("frozen", "logreg")}
    assert keys["frozen"] == keys["logreg"]
    # fruit: 3 classes -> K 5 (2 draws) and 16 (every class has <= 16: one fixed support); fixed: shots [5], once
    assert sorted(keys["frozen"]) == sorted(["fixed|5|0", "fruit|5|0", "fruit|5|1", "fruit|16|0"])
    fruit = [r for r in rows if r["dataset"] == "fruit" and r["shots"] == 5]
    assert all(r["short_classes"] == 1 and r["support"] == 5 + 5 + 3 and r["queries"] == 12 for r in fruit)
    summary = json.loads(out.read_text())["summary"]
    assert {e["dataset"] for e in summary["datasets"]} == {"fruit", "fixed"}
    assert "vs_frozen" in summary["mean"][0]["methods"]["logreg"]
    assert out.with_suffix(".md").read_text().count("| fruit |") == 4 and out.with_suffix(".png").is_file()

    reused = tmp_path / "again.json"
    result = CliRunner().invoke(app, [*args[:-3], "--reuse", str(out), "--reuse-methods", "logreg", "--out",
                                      str(reused), "--quiet"])
    assert result.exit_code == 0, result.output
    again = json.loads(reused.read_text())["rows"]
    assert all(r.get("reused") for r in again if r["method"] == "logreg")
    assert [r["accuracy"] for r in again if r["method"] == "frozen"] == [r["accuracy"] for r in rows
                                                                        if r["method"] == "frozen"]


def test_transductive_rows_say_how_class_proportions_were_treated(suite_pool, tmp_path):
    args = ["benchmark", "--pool", str(suite_pool), "--methods", "frozen", "--encoder", "tiny-random-bert",
            "--shots", "5", "--draws", "1", "--datasets", "fruit", "--adapt", "transductive", "--quiet"]
    for rows, name in ((None, "default.json"), (0, "equal.json")):
        given = [] if rows is None else ["--proportion-rows", str(rows)]
        result = CliRunner().invoke(app, [*args, *given, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    default, equal = (json.loads((tmp_path / n).read_text()) for n in ("default.json", "equal.json"))
    assert default["config"]["transductive_proportion_rows"] == 50
    assert equal["config"]["transductive_proportion_rows"] == 0
    assert {r["method"] for r in equal["rows"]} == {"frozen", "frozen+transductive"}
    refused = CliRunner().invoke(app, [*args, "--proportion-rows", "-1", "--out", str(tmp_path / "x.json")])
    assert refused.exit_code != 0 and not (tmp_path / "x.json").exists()


def test_the_encoder_strategies_budget_is_a_benchmark_option_and_recorded(suite_pool, tmp_path):
    args = ["benchmark", "--pool", str(suite_pool), "--methods", "frozen", "--encoder", "tiny-random-bert",
            "--shots", "5", "--draws", "1", "--datasets", "fruit", "--adapt", "contrastive", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--adapt-seconds", "0.5", "--adapt-top-layers", "1", "--adapt-refit",
                                      "--out", str(tmp_path / "capped.json")])
    assert result.exit_code == 0, result.output
    capped = json.loads((tmp_path / "capped.json").read_text())
    assert capped["config"]["adapt_seconds"] == 0.5 and capped["config"]["adapt_top_layers"] == 1
    assert capped["config"]["adapt_refit"] is True
    assert {r["method"] for r in capped["rows"]} == {"frozen", "frozen+contrastive"}
    for wrong in (["--adapt-seconds", "0"], ["--adapt-top-layers", "0"]):
        refused = CliRunner().invoke(app, [*args, *wrong, "--out", str(tmp_path / "x.json")])
        assert refused.exit_code != 0 and not (tmp_path / "x.json").exists()


def test_a_model_trained_on_an_eval_dataset_is_flagged(suite_pool, tmp_path):
    model = tmp_path / "model"
    pool = yaml.safe_load(suite_pool.read_text())
    pool["tasks"].append({"name": "val", "path": "train.jsonl", "role": "meta_val"})
    pool["tasks"].append({"name": "leak", "path": "fruit_train.jsonl", "role": "meta_train"})
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text(yaml.safe_dump(pool))
    trained = CliRunner().invoke(app, ["train", "--pool", str(leaky), "--encoder", "tiny-random-bert", "--episodes",
                                       "1", "--ways", "2", "--shots", "1", "--queries", "1", "--val-episodes", "2",
                                       "--out", str(model), "--no-checkpoint", "--quiet"])
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(app, ["benchmark", "--pool", str(suite_pool), "--model", f"mine={model}",
                                      "--methods", "frozen", "--encoder", "tiny-random-bert", "--shots", "5",
                                      "--draws", "1", "--datasets", "fruit", "--out", str(tmp_path / "s.json"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert "meta-trained on eval datasets ['fruit']" in " ".join(result.output.split())
    methods = {r["method"] for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    assert methods == {"frozen", "mine", "mine+logreg"}


@pytest.mark.parametrize(("trained_split", "flagged"), [("source", False), ("target", True)])
def test_entries_of_one_file_are_apart_when_their_filters_keep_different_tasks(tmp_path, trained_split, flagged):
    # ARSC's shape: one file, a task column; training keeps tasks by `domain`, the suite by `split`
    for split in ("train", "test"):
        write_jsonl(tmp_path / f"reviews_{split}.jsonl", [
            {"text": f"{word} {task} {split} {i}", "label": label, "task": task, "domain": task.split(".")[0],
             "split": "target" if task.startswith("books") else "source"}
            for task in ("toys.t2", "toys.t4", "books.t2") for label, word in (("1", "good"), ("-1", "bad"))
            for i in range(6)])
    train_filter = {"domain": "toys"} if trained_split == "source" else {"domain": ["toys", "books"]}
    pool = {"tasks": [{"name": "src", "path": "reviews_train.jsonl", "role": "meta_train", "task_column": "task",
                       "where": train_filter},
                      {"name": "val", "path": "reviews_train.jsonl", "role": "meta_val", "task_column": "task",
                       "where": {"domain": "toys"}},
                      {"name": "target", "path": "reviews_{split}.jsonl", "role": "eval", "task_column": "task",
                       "where": {"split": "target"}, "shots": [5]}]}
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(pool))
    trained = CliRunner().invoke(app, ["train", "--pool", str(tmp_path / "pool.yaml"), "--encoder",
                                       "tiny-random-bert", "--episodes", "1", "--ways", "2", "--shots", "1",
                                       "--queries", "1", "--val-episodes", "2", "--out", str(tmp_path / "model"),
                                       "--no-checkpoint", "--quiet"])
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(app, ["benchmark", "--pool", str(tmp_path / "pool.yaml"), "--model",
                                      f"mine={tmp_path / 'model'}", "--methods", "frozen", "--encoder",
                                      "tiny-random-bert", "--no-model-logreg", "--out", str(tmp_path / "s.json"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert ("meta-trained on eval datasets ['target']" in " ".join(result.output.split())) == flagged


@pytest.mark.parametrize(("trained_classes", "flagged"), [(["a", "q"], True), (["q"], False)])
def test_a_model_of_a_class_split_is_flagged_only_when_it_trained_on_scored_classes(
        suite_pool, tmp_path, tiny_encoder_config, trained_classes, flagged):
    from metanlp.config import Provenance
    from metanlp.learners import build_learner, save_learner

    provenance = Provenance(train_data=str(tmp_path / "fruit_train.jsonl"),
                            classes={"train": trained_classes, "val": ["r"], "test": ["a", "b", "c"]})
    save_learner(build_learner("protonet", tiny_encoder_config), tmp_path / "split", provenance=provenance)
    result = CliRunner().invoke(app, ["benchmark", "--pool", str(suite_pool), "--model", f"split={tmp_path / 'split'}",
                                      "--methods", "frozen", "--encoder", "tiny-random-bert", "--shots", "5",
                                      "--draws", "1", "--datasets", "fruit", "--no-model-logreg",
                                      "--out", str(tmp_path / "s.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert ("meta-trained on eval datasets ['fruit']" in " ".join(result.output.split())) == flagged
    assert {r["method"] for r in json.loads((tmp_path / "s.json").read_text())["rows"]} == {"frozen", "split"}


def test_logistic_regression_head_solves_scikit_learns_objective():
    sklearn = pytest.importorskip("sklearn.linear_model")
    from metanlp.learners.logreg import fit_logistic_regression

    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    y = torch.randint(0, 3, (40,), generator=generator)
    weight, bias = fit_logistic_regression(x, y, 3, C=2.0, max_iter=200)
    reference = sklearn.LogisticRegression(C=2.0, max_iter=1000, tol=1e-8).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=2e-3)
    np.testing.assert_allclose(bias.numpy(), reference.intercept_, atol=2e-3)


def test_an_ablation_pairs_a_component_on_and_off_over_the_same_draws():
    from metanlp.suite import compare

    def row(method, dataset, draw, accuracy, seconds):
        return {"method": method, "dataset": dataset, "shots": 5, "draw": draw, "accuracy": accuracy,
                "adapt_s": seconds}

    rows = [row("on", "d1", 0, 0.80, 10.0), row("on", "d1", 1, 0.70, 12.0), row("off", "d1", 0, 0.75, 1.0),
            row("off", "d1", 1, 0.60, 1.0), row("on", "d2", 0, 0.50, 20.0), row("on", "d2", 1, 0.40, 20.0),
            row("off", "d2", 0, 0.50, 2.0), row("off", "d2", 1, 0.50, 2.0), row("off", "d3", 0, 0.9, 1.0)]
    result = compare(rows, "on", "off")
    d1 = result["datasets"][0]
    assert (d1["dataset"], d1["diff"], d1["adapt_s"]) == ("d1", pytest.approx(0.075), 11.0)
    # t(0.975, 1 dof) = 12.706 times the standard error of the two paired differences, 0.05 and 0.10
    assert d1["ci95"] == pytest.approx(12.706 * np.std([0.05, 0.10], ddof=1) / np.sqrt(2), rel=1e-3)
    mean = result["mean"][0]  # d3 has no "on" rows: not in the mean
    assert mean["datasets"] == ["d1", "d2"] and mean["diff"] == pytest.approx((0.075 - 0.05) / 2)
    assert mean["adapt_s"] == pytest.approx(15.5) and mean["baseline_adapt_s"] == pytest.approx(1.5)
