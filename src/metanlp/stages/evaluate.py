"""Meta-trained model -> evaluation on the unseen test classes and on the datasets `evaluate.datasets` names (a
held-out task kind, a held-out set): the model and the frozen encoder on the same seeded episodes
(artifacts/evaluation/results.{json,md,png}), and metrics.json for DVC.

`episodes_id` hashes the test file and the evaluation params: two evaluations with the same id saw the
same episodes, so their per-episode accuracies can be paired (the promotion guard relies on it).

Adaptation and prediction times go to the stage's run record (artifacts/runs/evaluate.json), not to the
results: accuracies are equal for equal inputs, timings are not, and DVC compares the outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from metanlp.atomic import file_digest
from metanlp.config import EvaluateParams, PipelineParams, uses_label_names
from metanlp.data.load import LabelledTexts
from metanlp.evaluation import BASELINE, Setting, build_settings, evaluate_model
from metanlp.reporting import write_report
from metanlp.stages.build_corpus import CORPUS, MANIFEST, load_split, split_spaces
from metanlp.stages.common import Stage, dataset_files, eval_dataset_files, read_json, run_record, write_json
from metanlp.stages.meta_train import MODEL

EVALUATION = "artifacts/evaluation"
RESULTS, METRICS = f"{EVALUATION}/results.json", f"{EVALUATION}/metrics.json"
TEST = f"{CORPUS}/test.jsonl"


def episodes_id(test_file: Path, params: EvaluateParams, label_spaces: str = "split",
                eval_files: list[Path] = ()) -> str:
    payload = {"test": file_digest(test_file), "evaluate": params.model_dump(mode="json")}
    if label_spaces != "split" or eval_files:  # keeps the ids of earlier single-corpus evaluations
        payload |= {"label_spaces": label_spaces, "datasets": [file_digest(f) for f in eval_files]}
    return hashlib.md5(json.dumps(payload, sort_keys=True).encode()).hexdigest()


NAMES_BASELINE = "frozen_with_names"  # the frozen encoder with the model's label-name weight: what names alone give


def frozen_with_label_names(spec):
    """The frozen encoder counting label names as the model does, so a table tells what meta-training adds
    beyond the names."""
    from metanlp.config import FrozenConfig
    from metanlp.learners import build_learner

    base = spec.encoder.model_copy(update={"attn_implementation": "sdpa"})
    return build_learner(FrozenConfig(label_names=spec.learner.label_names), base)


def dataset_settings(params: EvaluateParams, root: Path, trained_classes: set[str], corpus: Path | None
                     ) -> list[tuple[LabelledTexts, list[Setting]]]:
    """Each named dataset with its settings: episodes from one label space at a time, ways = min(N, its
    classes), the same shots, queries and episode count as the test classes."""
    from metanlp.data.pool import domain_weights, load_held_out

    out = []
    for entry in params.datasets:
        data = load_held_out(entry, root, trained_classes, corpus)
        out.append((data, build_settings(data, params.ways, params.shots, params.queries, params.episodes, 1, None,
                                         params.seed, spaces=domain_weights(data), dataset=entry.name)))
    return out


def evaluate_on_test(model_dir: Path, root: Path, params: EvaluateParams, methods: list[str] | None = None,
                     show_progress: bool = True, label_spaces: str = "split", corpus: Path | None = None) -> dict:
    """Score the model (and the baselines in `methods`) on the evaluation episodes of the test classes and of
    evaluate.datasets. `label_spaces="domain"`: a test episode's classes come from one domain."""
    from metanlp.learners import read_spec

    spec = read_spec(model_dir)
    names = [spec.learner.kind, *(methods if methods is not None else [BASELINE])]
    extra = {}
    if methods is None and uses_label_names(spec.learner):
        extra[NAMES_BASELINE] = frozen_with_label_names(spec)
    test = load_split(root, "test")
    spaces = split_spaces(root, "test", test, label_spaces)
    settings = build_settings(test, params.ways, params.shots, params.queries, params.episodes, 1, None,
                              params.seed, spaces=spaces)
    if params.full_label_space_shots:
        settings += build_settings(test, "all", params.full_label_space_shots, params.queries, params.episodes,
                                   params.repeats, None, params.seed)
    manifest = read_json(root / MANIFEST, "build_corpus")
    more = pool_dataset_settings(params, test, manifest, spaces)
    if params.datasets:
        classes = manifest["classes"]
        more += dataset_settings(params, root, set(classes["train"]) | set(classes["val"]), corpus)
    results = evaluate_model(model_dir, test, settings, names, seed=params.seed, show_progress=show_progress,
                             extra=extra, also=more)
    results["settings"] += mean_over_datasets(results["settings"])
    if manifest.get("space_weights"):
        results["test_data"] = POOLED  # the test file holds a task pool's eval datasets
    results["episodes_id"] = episodes_id(root / TEST, params, label_spaces, dataset_files(params, root))
    return results


def pool_dataset_settings(params: EvaluateParams, test: LabelledTexts, manifest: dict, spaces: dict[str, float]
                          ) -> list[tuple[LabelledTexts, list[Setting]]]:
    """With a task pool, each eval dataset on its own rows of the tables (its label spaces of the test file)."""
    out = []
    for name, dataset in manifest.get("datasets", {}).items():
        if dataset["role"] != "eval":
            continue
        own = set(dataset["label_spaces"])
        data = test.select([i for i, domain in enumerate(test.domains) if domain in own])
        out.append((data, build_settings(data, params.ways, params.shots, params.queries, params.episodes, 1, None,
                                         params.seed, spaces={s: w for s, w in spaces.items() if s in own},
                                         dataset=name)))
    return out


MEAN = "datasets mean"
POOLED = "eval datasets, pooled"


def mean_over_datasets(settings: list[dict]) -> list[dict]:
    """For each protocol scored on two or more named datasets, their unweighted mean: per method, the mean of
    the datasets' accuracies; its CI and the paired difference to frozen over episode indices (episode i of
    every dataset averaged), since each dataset ran the same number of seeded episodes."""
    from metanlp.evaluation import mean_ci

    by_protocol: dict[str, list[dict]] = {}
    for entry in settings:
        if entry.get("dataset") not in (None, MEAN):
            by_protocol.setdefault(entry["setting"].split(": ", 1)[1], []).append(entry)
    means = []
    for protocol, entries in by_protocol.items():
        if len(entries) < 2:
            continue
        methods = [m for m in entries[0]["methods"] if all(m in e["methods"] for e in entries)]
        n = min(len(e["methods"][m]["per_episode"]) for e in entries for m in methods)
        per_episode = {m: np.mean([e["methods"][m]["per_episode"][:n] for e in entries], axis=0) for m in methods}
        out = {}
        for m in methods:
            accuracy, ci = mean_ci(per_episode[m])
            out[m] = {"accuracy": accuracy, "ci95": ci, "episodes": n, "per_episode": per_episode[m].round(6).tolist()}
            if BASELINE in per_episode:
                out[m]["diff_vs_frozen"], out[m]["diff_ci95"] = mean_ci(per_episode[m] - per_episode[BASELINE])
        means.append({"setting": f"{MEAN}: {protocol}", "ways": entries[0]["ways"], "shots": entries[0]["shots"],
                      "episodes": n, "dataset": MEAN, "datasets": [e["dataset"] for e in entries], "methods": out})
    return means


def corpus_of(params: PipelineParams, root: Path) -> Path | None:
    """The raw corpus evaluate.datasets must be held out of (a task pool checks its own: None)."""
    return None if params.data.pool is not None else root / params.data.corpus


def metric_key(setting: str) -> str:
    return setting.replace(": ", ".").replace(" ", "_")  # emotion: 5-way 1-shot -> emotion.5-way_1-shot


def primary_metrics(results: dict, primary: str) -> dict[str, float]:
    """Flat metrics for DVC and MLflow: accuracy, CI and paired gain of every method in every setting."""
    metrics = {}
    for entry in results["settings"]:
        key = metric_key(entry["setting"])
        for name, m in entry["methods"].items():
            metrics[f"{key}.{name}.accuracy"] = m["accuracy"]
            metrics[f"{key}.{name}.ci95"] = m["ci95"]
            if name != BASELINE and "diff_vs_frozen" in m:
                metrics[f"{key}.{name}.gain_vs_frozen"] = m["diff_vs_frozen"]
        if entry["setting"] == primary:
            metrics["primary_accuracy"] = entry["methods"][results["learner"]]["accuracy"]
    return metrics


TIMED = ("adapt_ms", "predict_ms")
TIMINGS = run_record("evaluate")


def split_timings(results: dict) -> tuple[dict, dict[str, dict[str, dict[str, float]]]]:
    """(results without timings, {setting: {method: {adapt_ms, predict_ms}}})."""
    timings: dict[str, dict[str, dict[str, float]]] = {}
    settings = []
    for entry in results["settings"]:
        methods = {}
        for name, m in entry["methods"].items():
            methods[name] = {k: v for k, v in m.items() if k not in TIMED}
            timings.setdefault(entry["setting"], {})[name] = {k: m[k] for k in TIMED if k in m}
        settings.append({**entry, "methods": methods})
    return {**results, "settings": settings}, timings


def read_timings(root: Path) -> dict[str, dict[str, dict[str, float]]]:
    """The last evaluation's run record of timings; empty when there is none (outputs restored without a run)."""
    path = root / TIMINGS
    return json.loads(path.read_text()) if path.exists() else {}


def timing_metrics(timings: dict) -> dict[str, float]:
    """The run record's timings as flat MLflow metrics (`5-way_1-shot.protonet.adapt_ms`)."""
    return {f"{metric_key(setting)}.{name}.{k}": v for setting, methods in timings.items()
            for name, m in methods.items() for k, v in m.items()}


def run(params: PipelineParams, root: Path, show_progress: bool = True) -> dict:
    timed = evaluate_on_test(root / MODEL, root, params.evaluate, show_progress=show_progress,
                             label_spaces=params.data.label_spaces, corpus=corpus_of(params, root))
    results, timings = split_timings(timed)
    results["primary"] = params.evaluate.primary
    write_json(root / TIMINGS, timings)
    write_report(results, root / RESULTS, title=results.get("test_data", "test classes"))
    metrics = primary_metrics(results, params.evaluate.primary)
    write_json(root / METRICS, metrics)
    return {"results": str(root / RESULTS), "primary_accuracy": metrics["primary_accuracy"],
            "episodes_id": results["episodes_id"]}


STAGE = Stage(name="evaluate", run=run, params=("evaluate", "data.label_spaces"), deps=("data", TEST, MODEL),
              outs=(RESULTS, f"{EVALUATION}/results.md", f"{EVALUATION}/results.png"), done=(RESULTS, METRICS),
              metrics=(METRICS,), plots=(f"{EVALUATION}/results.png",), inputs=eval_dataset_files,
              records=(TIMINGS,))
