"""The pipeline on a task pool (data.tasks in params.yaml) with the real libraries: Prefect's test harness, GE,
Optuna, MLflow on the project's sqlite database, the tiny random BERT. Validation names the dataset that fails;
build_corpus keeps each dataset's label spaces apart with their weights; evaluate reports each eval dataset and
their mean; the Prefect cache key and dvc.yaml follow the pool's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, TINY_PIPELINE, merge, write_jsonl
from metanlp.config import EvalDataset
from metanlp.data.load import DataError, default_corpus_path
from metanlp.data.validation import CorpusInvalid
from metanlp.stages import dvc_yaml, load_params
from metanlp.stages import validate as validate_stage

# datasets cut from the embedded corpus by domain, written outside the project as a user's files would be
DATASETS = {"intents": ["garden", "fitness", "library", "pets"], "reviews": ["reviews_restaurants", "reviews_hotels"],
            "helpdesk": ["it_helpdesk"], "estate": ["real_estate"], "events": ["events"]}
POOL = [{"name": "intents", "path": "../datasets/intents/{split}.jsonl", "role": "meta_train"},
        {"name": "reviews", "path": "../datasets/reviews/{split}.jsonl", "role": "meta_train", "task_column": "task",
         "weight": 3.0},
        {"name": "helpdesk", "path": "../datasets/helpdesk/{split}.jsonl", "role": "meta_val"},
        {"name": "estate", "path": "../datasets/estate/{split}.jsonl", "role": "eval"},
        {"name": "events", "path": "../datasets/events/{split}.jsonl", "role": "eval"}]


def write_pool_params(root: Path, tasks: list[dict], **overrides) -> Path:
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), merge(TINY_PIPELINE, overrides))
    params["data"] = {"tasks": tasks}
    params["evaluate"]["datasets"] = []
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


@pytest.fixture
def pool_project(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in default_corpus_path().read_text().splitlines()]
    for name, domains in DATASETS.items():
        mine = [{"text": r["text"], "label": r["label"], "task": r["domain"]} for r in rows if r["domain"] in domains]
        if name == "reviews":  # one text in two tasks with two labels, as in ARSC: allowed, one task each
            mine.append({**mine[-1], "task": mine[0]["task"], "label": mine[0]["label"]})
        for split in ("train", "test"):
            (tmp_path / "datasets" / name).mkdir(parents=True, exist_ok=True)
            write_jsonl(tmp_path / "datasets" / name / f"{split}.jsonl", mine)
    root = tmp_path / "project"
    root.mkdir()
    write_pool_params(root, POOL)
    return root


def test_params_with_a_pool_refuse_a_corpus_beside_it_and_need_every_role(pool_project):
    params = yaml.safe_load((pool_project / "params.yaml").read_text())
    for data, message in [({"tasks": POOL, "corpus": "data/corpus.jsonl"}, r"data\.tasks .* replaces data\.corpus"),
                          ({"tasks": POOL[:3]}, "at least one dataset with role 'eval'"),
                          ({"tasks": POOL, "label_spaces": "split"}, "label_spaces must be 'domain'"),
                          ({"tasks": [*POOL, POOL[0]]}, r"repeated: \['intents'\]"),
                          ({"tasks": [{**POOL[0], "role": "train"}, *POOL[1:]]}, r"data\.tasks\.0\.role")]:
        (pool_project / "params.yaml").write_text(yaml.safe_dump({**params, "data": data}))
        with pytest.raises(DataError, match=message):
            load_params(pool_project / "params.yaml")
    evaluate = {**params["evaluate"], "datasets": [{"name": "events", "path": "../datasets/events/{split}.jsonl"}]}
    (pool_project / "params.yaml").write_text(yaml.safe_dump({**params, "evaluate": evaluate}))
    with pytest.raises(DataError, match=r"evaluate\.datasets \['events'\] have the names of data\.tasks"):
        load_params(pool_project / "params.yaml")


def test_validation_names_each_failing_dataset_and_nothing_is_built(pool_project, tmp_path):
    one_class = write_jsonl(tmp_path / "datasets" / "one.jsonl",
                            [{"text": f"only one label here {i}", "label": "alone"} for i in range(20)])
    tasks = [*POOL, {"name": "missing", "path": "../datasets/nowhere.jsonl", "role": "meta_train"},
             {"name": "single", "path": str(one_class), "role": "meta_train"},
             # the eval file of a training dataset: its classes were trained on, so it is not held out
             {"name": "seen", "path": POOL[0]["path"], "role": "eval"}]
    write_pool_params(pool_project, tasks)
    params = load_params(pool_project / "params.yaml")
    # an extra eval set beside the pool (evaluate.datasets) gets the same rules: this one was trained on too
    params.evaluate.datasets = [EvalDataset(name="also_seen", path=POOL[1]["path"], task_column="task")]
    with pytest.raises(CorpusInvalid) as raised:
        validate_stage.run(params, pool_project)
    message = str(raised.value)
    assert message.startswith("data.tasks: 3 of ")
    assert "missing/file" in message and "nowhere.jsonl" in message
    assert "single/label_spaces" in message
    assert "held_out" in message and "seen & intents" in message and "also_seen & reviews" in message
    report = json.loads((pool_project / "artifacts" / "validation" / "report.json").read_text())
    assert not report["success"] and set(report["datasets"]) == {"intents", "reviews", "helpdesk", "estate",
                                                                   "events", "single", "seen", "also_seen"}
    assert not (pool_project / "artifacts" / "corpus").exists()


def test_the_flow_on_a_pool_keeps_datasets_apart_and_reports_each_and_their_mean(pool_project):
    from prefect.testing.utilities import prefect_test_harness

    from metanlp.pipeline import build_flow

    with prefect_test_harness(server_startup_timeout=60):
        flow = build_flow()
        result = flow(params_file=str(pool_project / "params.yaml"), root=str(pool_project))
        assert result["register"]["promoted"]
        artifacts = pool_project / "artifacts"
        manifest = json.loads((artifacts / "corpus" / "manifest.json").read_text())
        assert manifest["source"] == "data.tasks" and manifest["rows"]["val"] == 120
        assert manifest["datasets"]["reviews"]["label_spaces"] == ["reviews/reviews_hotels",
                                                                  "reviews/reviews_restaurants"]
        # a dataset's weight is shared by its label spaces; the default weight is rows ** 0.5
        assert manifest["space_weights"]["train"] == {"intents": pytest.approx(480 ** 0.5),
                                                      "reviews/reviews_hotels": 1.5, "reviews/reviews_restaurants": 1.5}
        train_labels = {json.loads(line)["label"] for line in (artifacts / "corpus" / "train.jsonl").open()}
        assert "intents::water_schedule" in train_labels and not any("estate" in label for label in train_labels)
        spec = json.loads((artifacts / "model" / "learner.json").read_text())
        assert [t["name"] for t in spec["provenance"]["pool"]["tasks"]] == [t["name"] for t in POOL]

        results = json.loads((artifacts / "evaluation" / "results.json").read_text())
        by_name = {entry["setting"]: entry for entry in results["settings"]}
        assert {"5-way 1-shot", "estate: 5-way 1-shot", "events: 5-way 5-shot", "datasets mean: 5-way 1-shot",
                "datasets mean: 5-way 5-shot"} <= set(by_name)
        mean = by_name["datasets mean: 5-way 1-shot"]["methods"]["protonet"]
        parts = [by_name[f"{d}: 5-way 1-shot"]["methods"]["protonet"]["accuracy"] for d in ("estate", "events")]
        assert mean["accuracy"] == pytest.approx(np.mean(parts))
        metrics = json.loads((artifacts / "evaluation" / "metrics.json").read_text())
        assert "datasets_mean.5-way_1-shot.protonet.gain_vs_frozen" in metrics
        summary = (artifacts / "summary.md").read_text()
        assert "| eval datasets, pooled | 5-way 1-shot |" in summary and "| datasets mean | 5-way 5-shot |" in summary

        # the Prefect cache key follows the pool's files: a changed eval file reruns validation
        report = artifacts / "validation" / "report.json"
        stamp = report.stat().st_mtime_ns
        flow(params_file=str(pool_project / "params.yaml"), root=str(pool_project))
        assert report.stat().st_mtime_ns == stamp
        events = pool_project.parent / "datasets" / "events" / "test.jsonl"
        events.write_text(events.read_text() + json.dumps({"text": "a late addition to the events set",
                                                            "label": "ticket_refund"}) + "\n")
        flow(params_file=str(pool_project / "params.yaml"), root=str(pool_project))
        assert report.stat().st_mtime_ns != stamp


def test_dvc_yaml_lists_the_pools_files_outside_the_project(pool_project):
    declared = yaml.safe_load(dvc_yaml(load_params(pool_project / "params.yaml"), pool_project))["stages"]
    files = ["../datasets/estate/test.jsonl", "../datasets/events/test.jsonl", "../datasets/helpdesk/train.jsonl",
             "../datasets/intents/train.jsonl", "../datasets/reviews/train.jsonl"]
    assert [d for d in declared["validate"]["deps"] if d.startswith("..")] == files
    assert [d for d in declared["build_corpus"]["deps"] if d.startswith("..")] == files
    assert not any(d.startswith("..") for d in declared["meta_train"]["deps"])
    # the committed params name no file outside data/: the committed dvc.yaml has none
    assert not any(d.startswith("..") for s in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
                   for d in s["deps"])
