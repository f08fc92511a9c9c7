"""Meta-trained model -> evaluation on the unseen test classes: the model and the frozen encoder on the
same seeded episodes (artifacts/evaluation/results.{json,md,png}), and metrics.json for DVC.

`episodes_id` hashes the test file and the evaluation params: two evaluations with the same id saw the
same episodes, so their per-episode accuracies can be paired (the promotion guard relies on it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from metanlp.config import EvaluateParams, PipelineParams
from metanlp.evaluate import BASELINE, build_methods, build_settings, evaluate_methods, write_report
from metanlp.stages import Workspace, file_digest, write_json
from metanlp.stages.build_corpus import load_split


def episodes_id(test_file: Path, params: EvaluateParams) -> str:
    payload = {"test": file_digest(test_file), "evaluate": params.model_dump(mode="json")}
    return hashlib.md5(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def evaluate_model(model_dir: Path, root: Path, params: EvaluateParams, methods: list[str] | None = None,
                   show_progress: bool = True) -> dict:
    """Score the model (and the baselines in `methods`) on the evaluation episodes of the test classes."""
    from metanlp.learners import read_spec

    learner_name = read_spec(model_dir).learner
    names = [learner_name, *(methods if methods is not None else [BASELINE])]
    test = load_split(root, "test")
    learners = build_methods(model_dir, "default", names)
    settings = build_settings(test, params.ways, params.shots, params.queries, params.episodes, 1, None,
                              params.seed)
    if params.full_label_space_shots:
        settings += build_settings(test, "all", params.full_label_space_shots, params.queries, params.episodes,
                                   params.repeats, None, params.seed)
    results = evaluate_methods(learners, test, settings, None, params.seed, show_progress)
    results["learner"] = learner_name
    results["episodes_id"] = episodes_id(Workspace(root).corpus / "test.jsonl", params)
    return results


def primary_metrics(results: dict, primary: str) -> dict[str, float]:
    """Flat metrics for DVC and MLflow: accuracy, CI and paired gain of every method in every setting."""
    metrics = {}
    for entry in results["settings"]:
        key = entry["setting"].replace(" ", "_")
        for name, m in entry["methods"].items():
            metrics[f"{key}.{name}.accuracy"] = m["accuracy"]
            metrics[f"{key}.{name}.ci95"] = m["ci95"]
            if name != BASELINE and "diff_vs_frozen" in m:
                metrics[f"{key}.{name}.gain_vs_frozen"] = m["diff_vs_frozen"]
            metrics[f"{key}.{name}.adapt_ms"] = m["adapt_ms"]
        if entry["setting"] == primary:
            metrics["primary_accuracy"] = entry["methods"][results["learner"]]["accuracy"]
    return metrics


def run(params: PipelineParams, root: Path, show_progress: bool = True) -> dict:
    workspace = Workspace(root)
    results = evaluate_model(workspace.model, root, params.evaluate, show_progress=show_progress)
    results["primary"] = params.evaluate.primary
    write_report(results, workspace.evaluation / "results.json", title="test classes")
    metrics = primary_metrics(results, params.evaluate.primary)
    write_json(workspace.evaluation / "metrics.json", metrics)
    return {"results": str(workspace.evaluation / "results.json"), "primary_accuracy": metrics["primary_accuracy"],
            "episodes_id": results["episodes_id"]}
