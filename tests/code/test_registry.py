"""Registration, the promotion guard, manual promotion and the served pyfunc, on a temporary sqlite MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from metanlp.cli import app
from metanlp.serving import example_request
from metanlp.stages import load_params, stages
from metanlp.stages.register import decide
from metanlp.tracking import tracking

runner = CliRunner()


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Path:
    """The six stages run one after another (no Prefect), leaving version 1 registered as champion."""
    from conftest import write_params
    from metanlp.data.load import default_corpus_path

    root = tmp_path_factory.mktemp("registered")
    (root / "data").mkdir()
    (root / "data" / "corpus.jsonl").write_bytes(default_corpus_path().read_bytes())
    write_params(root, tune={"enabled": False})
    params = load_params(root / "params.yaml")
    for stage in stages().values():
        stage.run(params, root)
    return root


def test_promotion_needs_a_paired_gain_above_the_threshold():
    champion = np.array([0.8, 0.6, 1.0, 0.4])
    assert decide(champion + 0.2, champion, 0.0)[0]
    assert not decide(champion, champion, 0.0)[0]  # a tie keeps the champion
    promoted, reason = decide(champion + 0.01, champion, 0.05)
    assert not promoted and "champion kept" in reason and "+1.00 pp" in reason


def test_pyfunc_classifies_queries_from_a_support_set(registered):
    import mlflow

    with tracking(None, registered, "metanlp"):
        model = mlflow.pyfunc.load_model("models:/metanlp-classifier@champion")
    request = example_request()
    answer = model.predict(request)
    queries = request[request["label"] == ""]["text"].tolist()
    assert answer["text"].tolist() == queries
    assert set(answer["label"]) <= set(request["label"]) - {""}
    assert ((answer["score"] > 0) & (answer["score"] <= 1)).all()
    # the budget of a contrastive task passes MLflow's params schema and reaches the task
    tuned = model.predict(request, params={"strategy": "contrastive", "adapt_seconds": 5.0, "adapt_top_layers": 1})
    assert tuned["text"].tolist() == queries and tuned["task_id"][0] != answer["task_id"][0]
    with pytest.raises(Exception, match="adapt_top_layers"):
        model.predict(request, params={"strategy": "contrastive", "adapt_top_layers": 0})
    with pytest.raises(Exception, match="label"):
        model.predict(pd.DataFrame({"text": ["only a text"]}))


def test_manual_promotion_and_unknown_version(registered):
    params = str(registered / "params.yaml")
    ok = runner.invoke(app, ["promote", "metanlp-classifier", "1", "--params", params])
    assert ok.exit_code == 0 and "v1 is now champion" in ok.output
    bad = runner.invoke(app, ["promote", "metanlp-classifier", "7", "--params", params])
    assert bad.exit_code == 2 and "no version '7'" in bad.output


def test_stage_command_rejects_an_unknown_stage(registered):
    result = runner.invoke(app, ["stage", "deploy", "--params", str(registered / "params.yaml")])
    assert result.exit_code == 2 and "unknown stage 'deploy'" in result.output


def test_schedule_without_a_server_says_what_is_missing(registered, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, ["schedule", "--no-serve", "--params", str(registered / "params.yaml")])
    assert result.exit_code == 2 and "prefect server start" in result.output


def test_champion_is_re_evaluated_when_the_episodes_changed(registered):
    """A challenger scored on other episodes is compared with the champion re-scored on those episodes."""
    from safetensors.torch import load_file, save_file

    from conftest import write_params
    from metanlp.stages import evaluate, register

    write_params(registered, tune={"enabled": False}, evaluate={"episodes": 8, "seed": 1})
    params = load_params(registered / "params.yaml")
    weights = registered / "artifacts" / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["log_scale"] = tensors["log_scale"] + 0.1  # another model: the same one is not registered again
    save_file(tensors, str(weights))
    evaluate.run(params, registered, show_progress=False)
    record = register.run(params, registered)
    assert record["version"] == "2" and "re-evaluated on these episodes" in record["reason"]
    assert "on 8 episodes" in record["reason"]


def test_concurrent_promotions_leave_one_champion_and_say_which(registered):
    """Two `metanlp promote` at once take turns (the project lock): the later one names the one it replaced."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    with tracking(None, registered, "metanlp"):
        client = MlflowClient()
        first = client.get_model_version("metanlp-classifier", "1")
        versions = client.search_model_versions("name='metanlp-classifier'")
        if len(versions) < 2:
            client.create_model_version("metanlp-classifier", first.source, first.run_id)
    command = [sys.executable, "-m", "metanlp.cli", "promote", "metanlp-classifier"]
    runs = [subprocess.Popen([*command, version, "--params", str(registered / "params.yaml")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for version in ("1", "2")]
    # both start at once; the project lock lets one promote (and read back) while the other waits
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    with tracking(None, registered, "metanlp"):
        champion = str(MlflowClient().get_model_version_by_alias("metanlp-classifier", "champion").version)
    other = "1" if champion == "2" else "2"
    assert f"v{champion} is now champion (was v{other})" in "".join(outputs)  # the second in turn says so
