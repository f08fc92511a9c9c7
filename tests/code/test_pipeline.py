"""The Prefect flow with the real libraries: Prefect's test harness, GE, Optuna, MLflow on the project's
temporary sqlite database. The tiny random BERT keeps each run to seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import write_params
from metanlp.data.load import DataError
from metanlp.data.validation import CorpusInvalid


@pytest.fixture(scope="module")
def train_flow():
    from prefect.testing.utilities import prefect_test_harness

    from metanlp.pipeline import build_flow

    with prefect_test_harness(server_startup_timeout=60):
        yield build_flow()


def registry(root: Path) -> tuple[MlflowClient, str]:
    # an explicit client: setting MLflow's global URI would leak into the next test through the environment
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"), "metanlp-classifier"


def versions(root: Path) -> list[str]:
    client, name = registry(root)
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))


def alias(root: Path, which: str) -> str:
    client, name = registry(root)
    return str(client.get_model_version_by_alias(name, which).version)


def run(flow, root: Path) -> dict:
    return flow(params_file=str(root / "params.yaml"), root=str(root))


def test_flow_registers_caches_and_reruns_only_what_a_param_feeds(train_flow, tiny_project, caplog):
    first = run(train_flow, tiny_project)
    assert first["register"]["promoted"] and alias(tiny_project, "champion") == "1"
    assert alias(tiny_project, "challenger") == "1"
    client, name = registry(tiny_project)
    run_data = client.get_run(first["register"]["run_id"]).data
    assert run_data.tags["optuna_study"] == first["tune"]["study"] and "git_commit" in run_data.tags
    assert "primary_accuracy" in run_data.metrics
    artifacts = {a.path for a in client.list_artifacts(first["register"]["run_id"], "evaluation")}
    assert "evaluation/results.png" in artifacts
    summary = (tiny_project / "artifacts" / "summary.md").read_text()
    assert summary == first["summary"]["text"] and "v1 is champion" in summary
    # the held-out task kind params.yaml names (evaluate.datasets) has its own rows, episodes within its domain
    assert "| emotion | 5-way 1-shot |" in summary and "| test classes | 5-way 5-shot |" in summary
    assert "emotion.5-way_1-shot.protonet.gain_vs_frozen" in run_data.metrics
    assert "summary.md" in {a.path for a in client.list_artifacts(first["register"]["run_id"])}

    outputs = {stage: tiny_project / "artifacts" / path for stage, path in
               {"validate": "validation/report.json", "meta_train": "model/training.json",
                "register": "registry.json"}.items()}
    stamps = {stage: path.stat().st_mtime_ns for stage, path in outputs.items()}
    caplog.clear()
    run(train_flow, tiny_project)  # nothing changed: every stage from the cache, and the log says so
    assert {stage: path.stat().st_mtime_ns for stage, path in outputs.items()} == stamps
    assert "stage 1 of 8: validate" in caplog.text and "stage tune: cached" in caplog.text
    assert versions(tiny_project) == ["1"]

    # a param of tuning: other trials, another temperature, so another model (an identical one would be
    # recognised and not registered again; see below)
    write_params(tiny_project, tune={"seed": 1})
    third = run(train_flow, tiny_project)
    assert outputs["validate"].stat().st_mtime_ns == stamps["validate"]  # upstream of the change: cached
    assert outputs["meta_train"].stat().st_mtime_ns != stamps["meta_train"]
    assert versions(tiny_project) == ["1", "2"] and alias(tiny_project, "challenger") == "2"
    assert alias(tiny_project, "champion") == ("2" if third["register"]["promoted"] else "1")
    assert "champion" in third["register"]["reason"]


def test_an_identical_model_is_not_registered_again(train_flow, tiny_project):
    """What `dvc repro` after `metanlp run` does: the register stage runs again on the same model."""
    from metanlp.pipeline import run_stage

    first = run(train_flow, tiny_project)
    again = run_stage("register", str(tiny_project / "params.yaml"), str(tiny_project))
    assert versions(tiny_project) == ["1"] and again["version"] == "1" and not again["promoted"]
    assert "identical to v1" in again["reason"] and again["champion_version"] == "1"
    assert again["git_commit"] == first["register"]["git_commit"]


def test_a_second_run_in_the_same_project_refuses_and_names_the_first(train_flow, tiny_project):
    from metanlp.runtime import ProjectBusy, project_lock

    with project_lock(tiny_project, "a `metanlp run` (the first)"):
        with pytest.raises(ProjectBusy, match=r"the first\) \(pid \d+.*is using this project; nothing was started"):
            run(train_flow, tiny_project)
    assert not (tiny_project / "artifacts").exists()


def test_corrupt_corpus_stops_before_training_and_keeps_the_champion(train_flow, tiny_project):
    run(train_flow, tiny_project)
    model_stamp = (tiny_project / "artifacts" / "model" / "training.json").stat().st_mtime_ns
    corpus = tiny_project / "data" / "corpus.jsonl"
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    rows[3]["text"] = ""
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CorpusInvalid, match="expect_column_values_to_match_regex"):
        run(train_flow, tiny_project)
    assert (tiny_project / "artifacts" / "model" / "training.json").stat().st_mtime_ns == model_stamp
    assert versions(tiny_project) == ["1"] and alias(tiny_project, "champion") == "1"


def test_transient_error_in_a_stage_is_retried(train_flow, tiny_project, monkeypatch):
    import dataclasses

    from metanlp.stages import evaluate

    calls = []
    real_run = evaluate.STAGE.run

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("injected: the artifact store did not answer")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(evaluate, "STAGE", dataclasses.replace(evaluate.STAGE, run=flaky))
    result = run(train_flow, tiny_project)
    assert len(calls) == 2 and result["register"]["version"] == "1"


def test_wrong_parameter_fails_before_any_stage(train_flow, tiny_project):
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["meta_train"]["train"]["lr"] = -1
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(DataError, match=r"meta_train\.train\.lr"):
        run(train_flow, tiny_project)
    assert not (tiny_project / "artifacts").exists()


def test_pretrained_encoder_is_where_meta_training_starts(train_flow, tiny_project):
    write_params(tiny_project, pretrain={"modes": ["mlm", "smlmt"], "hybrid": True, "mlm_steps": 2,
                                         "smlmt_episodes": 2, "smlmt_words": 20}, tune={"enabled": False})
    result = run(train_flow, tiny_project)
    pretrained = tiny_project / "artifacts" / "pretrained"
    assert result["pretrain"]["modes"] == ["mlm", "smlmt"] and result["pretrain"]["smlmt_classes"] == 20
    assert (pretrained / "model.safetensors").exists()
    spec = json.loads((tiny_project / "artifacts" / "model" / "learner.json").read_text())
    assert spec["encoder"]["name_or_path"] == str(pretrained)


def test_the_summary_is_made_from_the_runs_own_results(tmp_path):
    from metanlp.stages.evaluate import split_timings
    from metanlp.stages.summary import summary_text

    timed = {"learner": "protonet", "settings": [{"setting": "5-way 1-shot", "methods": {
        "protonet": {"accuracy": 0.81, "ci95": 0.02, "diff_vs_frozen": 0.05, "diff_ci95": 0.01, "adapt_ms": 12.0},
        "frozen": {"accuracy": 0.76, "ci95": 0.02, "adapt_ms": 11.0}}}, {
        "setting": "emotion: 5-way 1-shot", "dataset": "emotion", "methods": {
            "protonet": {"accuracy": 0.48, "ci95": 0.03, "diff_vs_frozen": 0.05, "diff_ci95": 0.012, "adapt_ms": 9.0},
            "frozen": {"accuracy": 0.43, "ci95": 0.03, "adapt_ms": 8.0}}}]}
    results, timings = split_timings(timed)  # as the evaluate stage keeps them: timings in its run record
    assert "adapt_ms" not in json.dumps(results) and timings["emotion: 5-way 1-shot"]["frozen"] == {"adapt_ms": 8.0}
    record = {"model_name": "m", "version": "2", "promoted": False, "champion_version": "1", "reason": "no gain",
              "run_id": "abc", "tracking_uri": "sqlite:///x.db"}
    text = summary_text(results, record, tmp_path, timings)
    assert "| test classes | 5-way 1-shot | 81.0 ± 2.0 | 76.0 ± 2.0 | +5.0 ± 1.0 | 12 |" in text
    assert "| emotion | 5-way 1-shot | 48.0 ± 3.0 | 43.0 ± 3.0 | +5.0 ± 1.2 | 9 |" in text
    assert "v2 is challenger (champion stays v1): no gain" in text and "metanlp predict --model" in text
    assert "| +5.0 ± 1.0 | n/a |" in summary_text(results, record, tmp_path)  # no run record of timings
    results["settings"][0]["methods"]["protonet"]["accuracy"] = 0.9
    assert "| 5-way 1-shot | 90.0 ± 2.0 |" in summary_text(results, record, tmp_path, timings)
    # a model that counts label names is shown beside the frozen encoder counting them too
    results["settings"][0]["methods"]["frozen_with_names"] = {"accuracy": 0.85, "ci95": 0.02, "diff_vs_frozen": 0.09,
                                                              "diff_ci95": 0.015}
    text = summary_text(results, record, tmp_path, timings)
    assert "| frozen_with_names % (95% CI) | its gain over frozen, pp |" in text
    assert "| 12 | 85.0 ± 2.0 | +9.0 ± 1.5 |" in text and "| 9 | n/a ± n/a | n/a |" in text


def test_the_scoring_flow_labels_a_file_with_the_registered_champion(train_flow, tiny_project):
    """Scheduled batch scoring: the flow adapts `models:/NAME@champion` to a support set and writes a file."""
    from metanlp.pipeline import build_scoring_flow

    run(train_flow, tiny_project)
    rows = [json.loads(line) for line in (tiny_project / "data" / "corpus.jsonl").read_text().splitlines()]
    labels = sorted({r["label"] for r in rows})[:3]
    support = [r for r in rows if r["label"] in labels][:30]
    (tiny_project / "support.jsonl").write_text("".join(json.dumps(r) + "\n" for r in support))
    (tiny_project / "texts.txt").write_text("\n".join(r["text"] for r in rows[:40]))
    summary = build_scoring_flow()(model="models:/metanlp-classifier@champion",
                                   support=str(tiny_project / "support.jsonl"),
                                   texts=str(tiny_project / "texts.txt"), out=str(tiny_project / "scores.csv"),
                                   tracking_uri=f"sqlite:///{tiny_project / 'mlflow' / 'mlflow.db'}")
    assert summary["texts"] == 40 and summary["model_version"] == alias(tiny_project, "champion")
    # the champion adapts as params.yaml's meta_train.adaptation says (the scores above came through it)
    saved = json.loads((tiny_project / "artifacts" / "model" / "learner.json").read_text())["adaptation"]
    assert saved == yaml.safe_load((tiny_project / "params.yaml").read_text())["meta_train"]["adaptation"]
    import pandas as pd

    scored = pd.read_csv(tiny_project / "scores.csv")
    assert len(scored) == 40 and set(scored["label"]) <= set(labels)


def test_progress_lines_reach_the_console_while_prefects_own_chatter_stays_quiet(tmp_path):
    """`metanlp run` sets Prefect's log level to WARNING, yet the stage and trial lines (printed inside the flow
    and its tasks, log_prints) must show on the console: a fresh interpreter with the project's defaults."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        from pathlib import Path
        from metanlp.runtime import apply_environment_defaults
        apply_environment_defaults(Path({str(tmp_path)!r}))
        from prefect import flow, task
        import logging

        @task
        def trial():
            print("tune: trial 1 of 4")

        @flow(log_prints=True)
        def run():
            print("stage 1 of 8: validate")
            trial()
            logging.getLogger("prefect.engine").info("engine chatter")

        run()
    """)
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    console = shown.stdout + shown.stderr
    assert "stage 1 of 8: validate" in console and "tune: trial 1 of 4" in console
    assert "engine chatter" not in console
