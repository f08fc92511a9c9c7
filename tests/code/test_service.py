"""Code tests: `metanlp serve`. Tasks are adapted once and cached (bounded), kept across a restart, and a
malformed request gets a 4xx naming the problem while the service keeps serving; the pyfunc shares the cache."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from metanlp.learners import build_learner, load_learner, save_learner
from metanlp.service import Limits, ModelSource, create_app
from metanlp.tasks import TaskStore

SUPPORT = [{"text": "water the roses", "label": "garden"}, {"text": "prune the hedge", "label": "garden"},
           {"text": "walk the dog", "label": "pets"}, {"text": "feed the cat", "label": "pets"},
           {"text": "book a flight", "label": "travel"}, {"text": "pack the suitcase", "label": "travel"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_encoder_config):
    folder = tmp_path_factory.mktemp("served") / "model"
    save_learner(build_learner("protonet", tiny_encoder_config), folder)
    return folder


LIMITS = Limits(max_rows=50, max_chars=300, max_body_bytes=20_000, max_adapt_seconds=300)


def client_for(model_dir, tasks_dir=None, capacity=8):
    app = create_app(ModelSource(str(model_dir)), TaskStore(capacity, tasks_dir), LIMITS, poll_seconds=0)
    return TestClient(app)


def test_a_task_is_adapted_once_and_answers_many_queries(model_dir):
    client = client_for(model_dir)
    created = client.post("/tasks", json={"support": SUPPORT})
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["classes"] == ["garden", "pets", "travel"] and task["cached"] is False
    again = client.post("/tasks", json={"support": SUPPORT}).json()
    assert again["task_id"] == task["task_id"] and again["cached"] is True
    answer = client.post(f"/tasks/{task['task_id']}/predict", json={"texts": ["water the lawn", "x"], "top_k": 5})
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert len(predictions) == 2 and len(predictions[0]["top"]) == 3  # top_k capped at the classes
    assert predictions[0]["label"] in task["classes"] and 0 <= predictions[0]["score"] <= 1
    assert client.get(f"/tasks/{task['task_id']}").json()["support_size"] == 6
    assert client.get("/health").json()["tasks"] == 1
    assert client.delete(f"/tasks/{task['task_id']}").status_code == 204
    assert client.get(f"/tasks/{task['task_id']}").status_code == 404
    assert "/tasks/{identifier}/predict" in client.get("/openapi.json").json()["paths"]


BAD_TASKS = [
    ({}, 400, "support: Field required"),
    ({"support": []}, 400, "support: empty"),
    ({"support": SUPPORT[:2]}, 400, "one class"),
    ({"support": "garden"}, 400, "support: Input should be a valid list"),
    ({"support": [{"text": "a"}]}, 400, "label: Field required"),
    ({"support": [{"label": "a"}]}, 400, "text: Field required"),
    ({"support": [{"text": 5, "label": "a"}, {"text": "b", "label": "c"}]}, 400, "text: Input should be a valid str"),
    ({"support": [{"text": None, "label": "a"}]}, 400, "text: Input should be a valid string"),
    ({"support": [{"text": ["x"], "label": "a"}]}, 400, "valid string"),
    ({"support": [{"text": "a", "label": 3}]}, 400, "label: Input should be a valid string"),
    ({"support": [{"text": "  ", "label": "a"}, {"text": "b", "label": "c"}]}, 400, "support.text[0]: empty text"),
    ({"support": [{"text": "a", "label": "\x00"}, {"text": "b", "label": "c"}]}, 400, "support.label[0]: empty text"),
    ({"support": [{"text": "a", "label": ""}, {"text": "b", "label": "c"}]}, 400, "support.label[0]: empty text"),
    ({"support": [{"text": "x" * 301, "label": "a"}, {"text": "b", "label": "c"}]}, 413, "301 characters"),
    ({"support": [{"text": f"t{i}", "label": str(i % 2)} for i in range(51)]}, 413, "51 rows"),
    ({"support": SUPPORT, "strategy": "magic"}, 400, "strategy: unknown"),
    ({"support": SUPPORT, "adapt_seconds": 5}, 400, "only strategy 'contrastive' takes them"),
    ({"support": SUPPORT, "strategy": "logreg", "adapt_top_layers": 1}, 400, "this one is 'logreg'"),
    ({"support": SUPPORT, "strategy": "contrastive", "adapt_seconds": 0}, 400, "adapt_seconds: Input should be gr"),
    ({"support": SUPPORT, "strategy": "contrastive", "adapt_seconds": 301}, 400, "adapt_seconds: 301, over the limit"),
    ({"support": SUPPORT, "strategy": "contrastive", "adapt_seconds": "soon"}, 400, "adapt_seconds: Input should be"),
    ({"support": SUPPORT, "strategy": "contrastive", "adapt_top_layers": 0}, 400, "adapt_top_layers: Input should be"),
    ({"support": SUPPORT, "strategy": "contrastive", "adapt_top_layers": 1.5}, 400, "adapt_top_layers: Input should"),
    ({"support": SUPPORT, "strategy": "contrastive", "adapt_batches": "hardest"}, 400, "adapt_batches: Input should"),
    ({"support": SUPPORT, "extra": 1}, 400, "extra: Extra inputs are not permitted"),
    ({"support": [{"text": "a", "label": "b", "domain": "c"}]}, 400, "Extra inputs are not permitted"),
    ([1, 2, 3], 400, "Input should be a valid dictionary"),
    ("just a string", 400, "valid dictionary"),
]

BAD_PREDICTIONS = [
    ({}, 400, "texts: Field required"),
    ({"texts": []}, 400, "texts: empty"),
    ({"texts": "one text"}, 400, "texts: Input should be a valid list"),
    ({"texts": [1]}, 400, "Input should be a valid string"),
    ({"texts": [None]}, 400, "Input should be a valid string"),
    ({"texts": [""]}, 400, "texts[0]: empty text"),
    ({"texts": ["ok", "   "]}, 400, "texts[1]: empty text"),
    ({"texts": ["ok", "\u200b\u200b"]}, 400, "texts[1]: empty text (no visible character)"),
    ({"texts": ["x" * 301]}, 413, "301 characters"),
    ({"texts": ["t"] * 51}, 413, "51 rows"),
    ({"texts": ["ok"], "top_k": 0}, 400, "top_k: Input should be greater than or equal to 1"),
    ({"texts": ["ok"], "top_k": "many"}, 400, "top_k: Input should be a valid integer"),
    ({"texts": ["ok"], "task": "x"}, 400, "Extra inputs are not permitted"),
]


def test_malformed_requests_get_a_4xx_naming_the_problem_and_the_service_keeps_serving(model_dir):
    client = client_for(model_dir)
    task = client.post("/tasks", json={"support": SUPPORT}).json()["task_id"]
    predict = f"/tasks/{task}/predict"

    def still_serving():
        answer = client.post(predict, json={"texts": ["walk the puppy"]})
        assert answer.status_code == 200, answer.text

    cases = [("/tasks", body, status, message) for body, status, message in BAD_TASKS]
    cases += [(predict, body, status, message) for body, status, message in BAD_PREDICTIONS]
    for path, body, status, message in cases:
        answer = client.post(path, json=body)
        assert answer.status_code == status, (body, answer.text)
        error = answer.json()["error"]
        assert message in error, (body, error)
        assert "Traceback" not in error and len(error) < 1200
        still_serving()
    raw = [("/tasks", b"{not json", 400, "body: not valid JSON"),
           ("/tasks", b'{"support": ' * 1500, 400, "body: not valid JSON"),  # deeply nested, unterminated
           ("/tasks", b"[" * 5000 + b"]" * 5000, 400, "body: not valid JSON"),  # 5,000 levels of valid nesting
           ("/tasks", b"\xff\xfe", 400, "body: not valid JSON"),
           ("/tasks", b"x" * 20_001, 413, "request body over 20000 bytes"),
           ("/tasks/unknown-task/predict", b'{"texts": ["a"]}', 404, "unknown task 'unknown-task'"),
           (f"/tasks/{'z' * 5000}/predict", b'{"texts": ["a"]}', 404, "unknown task")]
    for path, body, status, message in raw:
        answer = client.post(path, content=body, headers={"content-type": "application/json"})
        assert answer.status_code == status, (path, body[:30], answer.text[:300])
        assert message in answer.json()["error"] and len(answer.json()["error"]) < 1200
        still_serving()
    assert client.delete("/tasks/nope").status_code == 404
    assert client.get("/nowhere").status_code == 404
    assert len(cases) + len(raw) >= 30
    still_serving()


def test_the_cache_is_bounded_and_tasks_survive_a_restart(model_dir, tmp_path):
    client = client_for(model_dir, tasks_dir=tmp_path / "tasks", capacity=2)
    ids = []
    for label in ("a", "b", "c"):
        support = [{**row, "label": f"{row['label']}-{label}"} for row in SUPPORT]
        ids.append(client.post("/tasks", json={"support": support}).json()["task_id"])
    health = client.get("/health").json()
    assert health["tasks"] == 3 and health["tasks_adapted"] == 2  # memory holds 2; the third lives on disk
    first = client.post(f"/tasks/{ids[0]}/predict", json={"texts": ["feed the dog"]}).json()
    restarted = client_for(model_dir, tasks_dir=tmp_path / "tasks", capacity=2)
    again = restarted.post(f"/tasks/{ids[0]}/predict", json={"texts": ["feed the dog"]}).json()
    assert again["predictions"] == first["predictions"]
    assert restarted.get(f"/tasks/{ids[0]}").json()["restored"]  # from its safetensors state, not adapted again
    for kind in ("json", "safetensors"):
        assert sorted(p.stem for p in (tmp_path / "tasks").glob(f"*.{kind}")) == sorted(ids)

    # a damaged state file is not trusted: the task is adapted again from its recorded support set
    (tmp_path / "tasks" / f"{ids[1]}.safetensors").write_bytes(b"not safetensors")
    third = client_for(model_dir, tasks_dir=tmp_path / "tasks", capacity=2)
    answer = third.post(f"/tasks/{ids[1]}/predict", json={"texts": ["feed the dog"]})
    assert answer.status_code == 200 and not third.get(f"/tasks/{ids[1]}").json()["restored"]

    # another model in the same folder never restores these tasks: its version (its weights' digest) differs
    other, learner = tmp_path / "other", load_learner(model_dir)
    with torch.no_grad():
        learner.log_scale.add_(1.0)
    save_learner(learner, other)
    assert ModelSource(str(other)).current != ModelSource(str(model_dir)).current
    assert client_for(other, tasks_dir=tmp_path / "tasks").post("/tasks", json={"support": SUPPORT}).json()[
        "task_id"] not in ids


def test_the_pyfunc_keeps_tasks_and_answers_by_task_id(model_dir):
    from metanlp.serving import FewShotClassifierModel

    class Context:
        artifacts = {"model": str(model_dir)}

    pyfunc = FewShotClassifierModel()
    pyfunc.load_context(Context())
    frame = pd.DataFrame({"text": [r["text"] for r in SUPPORT] + ["walk the puppy"],
                          "label": [r["label"] for r in SUPPORT] + [""]})
    first = pyfunc.predict(None, frame)
    task = first["task_id"][0]
    by_id = pyfunc.predict(None, pd.DataFrame({"text": ["walk the puppy"], "label": [""]}), {"task_id": task})
    assert by_id["label"].tolist() == first["label"].tolist() and pyfunc.store.cached == 1
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="unknown task"):
        pyfunc.predict(None, pd.DataFrame({"text": ["x"], "label": [""]}), {"task_id": "missing"})
    with pytest.raises(MlflowException, match="at least 2 classes"):
        pyfunc.predict(None, pd.DataFrame({"text": ["x", "y"], "label": ["a", ""]}))
    assert json.dumps(by_id.to_dict())
    logreg = pyfunc.predict(None, frame, {"strategy": "logreg"})
    assert logreg["task_id"][0] != task and pyfunc.store.cached == 2  # another strategy is another task
    with pytest.raises(MlflowException, match="strategy: unknown 'magic'"):
        pyfunc.predict(None, frame, {"strategy": "magic"})
    budgeted = pyfunc.predict(None, frame, {"strategy": "contrastive", "adapt_seconds": 5.0, "adapt_top_layers": 1})
    assert pyfunc.store.describe(budgeted["task_id"][0])["adapt_top_layers"] == 1
    with pytest.raises(MlflowException, match="only strategy 'contrastive'"):
        pyfunc.predict(None, frame, {"adapt_seconds": 5.0})
    with pytest.raises(MlflowException, match="adapt_top_layers: 0 is not a number of layers"):
        pyfunc.predict(None, frame, {"strategy": "contrastive", "adapt_top_layers": 0})
    with pytest.raises(MlflowException, match="adapt_batches: unknown 'hardest'"):
        pyfunc.predict(None, frame, {"strategy": "contrastive", "adapt_batches": "hardest"})


def test_a_promotion_while_serving_moves_new_tasks_to_the_new_version(tmp_path, tiny_encoder_config):
    """A real MLflow registry (sqlite): the service follows the champion alias; tasks keep their version."""
    import time

    import mlflow
    from mlflow import MlflowClient

    from metanlp.stages.register import log_model
    from metanlp.tracking import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking(uri, tmp_path, "serving") as experiment_id:
        for seed in (0, 1):
            folder = tmp_path / f"model{seed}"
            save_learner(build_learner("protonet", tiny_encoder_config, seed=seed), folder)
            with mlflow.start_run(experiment_id=experiment_id):  # its artifacts under tmp_path, not ./mlruns
                log_model(folder, "served")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias("served", "champion", "1")
    source = ModelSource("models:/served@champion", uri)
    app = create_app(source, TaskStore(8), LIMITS, poll_seconds=0.2)
    with TestClient(app) as client_v:
        first = client_v.post("/tasks", json={"support": SUPPORT}).json()
        assert first["model_version"] == "1"
        client.set_registered_model_alias("served", "champion", "2")
        deadline = time.time() + 30
        while client_v.get("/health").json()["model_version"] != "2" and time.time() < deadline:
            time.sleep(0.2)
        assert client_v.get("/health").json()["model_version"] == "2"
        second = client_v.post("/tasks", json={"support": SUPPORT[::-1]}).json()
        assert second["model_version"] == "2"
        answer = client_v.post(f"/tasks/{first['task_id']}/predict", json={"texts": ["walk the dog"]}).json()
        assert answer["model_version"] == "1"  # an existing task keeps the version it was adapted with


def test_a_task_may_choose_its_adaptation_strategy_and_keeps_it_across_a_restart(model_dir, tmp_path):
    client = client_for(model_dir, tasks_dir=tmp_path / "tasks")
    default = client.post("/tasks", json={"support": SUPPORT}).json()
    logreg = client.post("/tasks", json={"support": SUPPORT, "strategy": "logreg"}).json()
    assert logreg["strategy"] == "logreg" and logreg["task_id"] != default["task_id"]
    query = {"texts": ["walk the puppy", "plant tulips"], "top_k": 3}
    by_logreg = client.post(f"/tasks/{logreg['task_id']}/predict", json=query).json()["predictions"]
    by_default = client.post(f"/tasks/{default['task_id']}/predict", json=query).json()["predictions"]
    assert [p["top"] for p in by_logreg] != [p["top"] for p in by_default]  # another classifier, not a relabel

    restarted = client_for(model_dir, tasks_dir=tmp_path / "tasks")
    again = restarted.post(f"/tasks/{logreg['task_id']}/predict", json=query).json()["predictions"]
    assert restarted.get(f"/tasks/{logreg['task_id']}").json()["restored"]
    assert [p["top"] for p in again] == [p["top"] for p in by_logreg]


@pytest.fixture(scope="module")
def tuned_by_default(tmp_path_factory, tiny_encoder_config):
    """A model whose learner.json says its default adaptation tunes the encoder (as the pipeline's champion)."""
    from metanlp.config import DefaultAdaptation

    learner = build_learner("protonet", tiny_encoder_config)
    learner.adaptation = DefaultAdaptation(seconds=20, top_layers=1, batches="nearest")
    return save_learner(learner, tmp_path_factory.mktemp("tuned") / "model")


def test_a_default_task_tunes_as_the_models_learner_json_says_and_untuned_does_not(tuned_by_default, model_dir):
    from metanlp.adaptation import AdaptBudget, DomainAdaptedLearner
    from metanlp.tasks import TaskError, strategy_learner, tuning_budget

    saved = json.loads((tuned_by_default / "learner.json").read_text())["adaptation"]
    assert saved == {"strategy": "contrastive", "seconds": 20.0, "top_layers": 1, "batches": "nearest"}
    assert "adaptation" not in json.loads((model_dir / "learner.json").read_text())  # unset: not written
    learner = load_learner(tuned_by_default)
    default = strategy_learner(learner, "default")
    assert isinstance(default, DomainAdaptedLearner) and default.strategies == ["contrastive"]
    assert default.budget == AdaptBudget(seconds=20, top_layers=1, contrastive_batches="nearest")
    assert strategy_learner(learner, "untuned") is learner
    assert strategy_learner(load_learner(model_dir), "default").adaptation is None  # its own rule alone
    with pytest.raises(TaskError, match="only strategy 'contrastive'"):
        tuning_budget("default", 5.0, None)

    client = client_for(tuned_by_default)
    more = [{"text": "mow the lawn", "label": "garden"}, {"text": "brush the horse", "label": "pets"},
            {"text": "renew the passport", "label": "travel"}]
    query = {"texts": ["walk the puppy", "plant tulips", "pack a bag"], "top_k": 3}
    answers = {}
    for asked in ({}, {"strategy": "contrastive", "adapt_seconds": 20, "adapt_top_layers": 1,
                       "adapt_batches": "nearest"}, {"strategy": "untuned"}):
        task = client.post("/tasks", json={"support": SUPPORT + more, **asked})
        assert task.status_code == 201, task.text
        answers[asked.get("strategy", "default")] = [
            p["top"] for p in client.post(f"/tasks/{task.json()['task_id']}/predict", json=query).json()["predictions"]]
    assert answers["default"] == answers["contrastive"]  # the same seeded tuning, the same budget
    assert answers["default"] != answers["untuned"]  # and a tuned encoder: other scores


def test_a_contrastive_task_is_adapted_again_after_a_restart_with_the_same_answers(model_dir, tmp_path):
    """Its encoder is tuned to the support set, so no saved state rebuilds it: a restart adapts again, seeded."""
    client = client_for(model_dir, tasks_dir=tmp_path / "tasks")
    more = [{"text": "mow the lawn", "label": "garden"}, {"text": "brush the horse", "label": "pets"},
            {"text": "renew the passport", "label": "travel"}, {"text": "rake the leaves", "label": "garden"},
            {"text": "clean the fish tank", "label": "pets"}, {"text": "rent a car", "label": "travel"}]
    task = client.post("/tasks", json={"support": SUPPORT + more, "strategy": "contrastive"}).json()
    assert task["strategy"] == "contrastive"
    query = {"texts": ["walk the puppy", "plant tulips"], "top_k": 3}
    first = client.post(f"/tasks/{task['task_id']}/predict", json=query).json()["predictions"]
    restarted = client_for(model_dir, tasks_dir=tmp_path / "tasks")
    again = restarted.post(f"/tasks/{task['task_id']}/predict", json=query).json()["predictions"]
    assert not restarted.get(f"/tasks/{task['task_id']}").json()["restored"]
    assert [p["top"] for p in again] == [p["top"] for p in first]


def test_a_contrastive_task_keeps_the_tuning_budget_it_asked_for_across_a_restart(model_dir, tmp_path, monkeypatch):
    """The budget is part of the task (another budget, another task) and is what tunes it, now and when a
    restart adapts it again."""
    import metanlp.tasks

    budgets, original = [], metanlp.tasks.strategy_learner

    def recording(learner, strategy, budget=None):
        budgets.append(budget)
        return original(learner, strategy, budget)

    monkeypatch.setattr(metanlp.tasks, "strategy_learner", recording)
    client = client_for(model_dir, tasks_dir=tmp_path / "tasks")
    plain = client.post("/tasks", json={"support": SUPPORT, "strategy": "contrastive"}).json()
    asked = {"adapt_seconds": 20, "adapt_top_layers": 1, "adapt_batches": "nearest"}
    task = client.post("/tasks", json={"support": SUPPORT, "strategy": "contrastive", **asked})
    assert task.status_code == 201, task.text
    task = task.json()
    assert task["task_id"] != plain["task_id"] and task["adapt_top_layers"] == 1 and task["adapt_seconds"] == 20
    assert "adapt_seconds" not in plain
    assert budgets[0] is None and (budgets[1].seconds, budgets[1].top_layers) == (20, 1)
    assert budgets[1].contrastive_batches == "nearest" and task["adapt_batches"] == "nearest"
    query = {"texts": ["walk the puppy", "plant tulips"], "top_k": 3}
    first = client.post(f"/tasks/{task['task_id']}/predict", json=query).json()["predictions"]
    restarted = client_for(model_dir, tasks_dir=tmp_path / "tasks")
    again = restarted.post(f"/tasks/{task['task_id']}/predict", json=query).json()["predictions"]
    # adapted again with the budget it asked
    assert (budgets[-1].seconds, budgets[-1].top_layers, budgets[-1].contrastive_batches) == (20, 1, "nearest")
    assert [p["top"] for p in again] == [p["top"] for p in first]
    assert restarted.get(f"/tasks/{task['task_id']}").json()["adapt_top_layers"] == 1


@pytest.mark.parametrize("text", ["   ", "\u200b\u200b", "\x00", 3])
def test_the_pyfunc_request_names_a_row_without_visible_text(text):
    """The registered model's input rule is the loader's: a text of spaces, zero-width or control characters is
    empty."""
    import pandas as pd

    from metanlp.serving import split_request

    frame = pd.DataFrame({"text": ["water the ferns", "slugs ate the kale", text], "label": ["water", "pests", ""]})
    with pytest.raises(ValueError, match="request row 2: empty or non-text 'text'"):
        split_request(frame)
