"""The benchmark suite: every method on the same supports and queries of datasets held out of meta-training.

For each `eval` dataset of a task pool (each label space of it: ARSC's tasks are spaces), each K and each
draw: K support examples per class from the dataset's train file (a class with fewer gives all it has, and is
counted as short) and, as queries, every row of its test file (a seeded sample of at most `max_queries`). Every
method adapts on that support and labels those queries; accuracy per draw, its mean with a 95% CI, paired
differences to the frozen encoder and to SetFit over the same (space, draw) units, and seconds of adaptation
per support set. Methods are learners (`metanlp.learners`), built fresh for each dataset by a factory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metanlp.config import TaskPool
from metanlp.data.load import LabelledTexts
from metanlp.data.pool import load_spaces
from metanlp.evaluation import mean_ci
from metanlp.learners import Learner
from metanlp.progress import progress_bar
from metanlp.runtime import seeded

FROZEN, SETFIT = "frozen", "setfit"


@dataclass(frozen=True)
class SupportSet:
    """One support draw of one label space, with the queries every method is scored on."""

    dataset: str
    space: str
    shots: int
    draw: int
    support: LabelledTexts
    queries: LabelledTexts
    short_classes: int  # classes with fewer than `shots` training examples (all of theirs are used)


def support_draw(data: LabelledTexts, shots: int, seed: int) -> tuple[LabelledTexts, int]:
    rng = np.random.default_rng(seed)
    rows, short = [], 0
    for rows_of_class in data.indices_by_class().values():
        short += len(rows_of_class) < shots
        rows.extend(rng.permutation(rows_of_class)[:shots].tolist())
    return data.select(sorted(rows)), short


def suite_support_sets(pool: TaskPool, root: Path, shots: list[int], draws: int, max_queries: int,
                       seed: int = 0, datasets: list[str] | None = None) -> list[SupportSet]:
    """The support sets and queries of the pool's eval datasets; the same arguments give the same sets."""
    sets = []
    for entry in pool.tasks:
        if entry.role != "eval" or (datasets and entry.name not in datasets):
            continue
        test_spaces = {s.name: s.data for s in load_spaces(entry, root, "test")}
        for space in load_spaces(entry, root, "train"):
            queries = test_spaces.get(space.name)
            if queries is None:
                continue
            queries = queries.with_classes(space.data.classes)
            if len(queries) > max_queries:
                keep = np.random.default_rng(seed).choice(len(queries), size=max_queries, replace=False)
                queries = queries.select(sorted(keep.tolist()))
            space_shots = entry.shots or (sorted({*shots, 16}) if len(space.data.classes) <= 3 else shots)
            for k in space_shots:
                fixed = all(len(r) <= k for r in space.data.indices_by_class().values())
                for draw in range(1 if fixed else draws):  # a fixed support (ARSC) is drawn once
                    support, short = support_draw(space.data, k, seed + 1000 * draw + k)
                    sets.append(SupportSet(entry.name, space.name, k, draw, support, queries, short))
    return sets


def run_suite(methods: dict[str, Callable[[], Learner]], sets: list[SupportSet], seed: int = 0,
              show_progress: bool = True, reuse: dict | None = None) -> dict:
    """Every method on every support set. `reuse`: rows of an earlier run of the same supports ({method:
    {unit key: row}}), taken instead of running that method again (SetFit is minutes a task on a CPU)."""
    rows = []
    for name, build in methods.items():
        learner = None
        with progress_bar(f"suite {name}", len(sets), show_progress) as advance:
            for index, item in enumerate(sets):
                key = f"{item.space}|{item.shots}|{item.draw}"
                previous = (reuse or {}).get(name, {}).get(key)
                if previous is not None:
                    rows.append({**previous, "reused": True})
                    advance()
                    continue
                learner = learner or build()
                with seeded(seed + index):
                    started = time.perf_counter()
                    classifier = learner.adapt(item.support.texts, item.support.labels)
                    adapted = time.perf_counter()
                    predicted = classifier.predict(item.queries.texts).labels
                accuracy = float(np.mean([p == t for p, t in zip(predicted, item.queries.labels, strict=True)]))
                rows.append({"method": name, "dataset": item.dataset, "space": item.space, "shots": item.shots,
                             "draw": item.draw, "key": key, "accuracy": accuracy, "adapt_s": adapted - started,
                             "support": len(item.support), "queries": len(item.queries),
                             "classes": len(item.support.classes), "short_classes": item.short_classes})
                advance()
    return {"rows": rows, "summary": summarise(rows)}


def _per_draw(rows: list[dict], method: str, dataset: str, shots: int) -> dict[int, float]:
    """Accuracy of each draw; the label spaces of one dataset (ARSC's tasks) are averaged within a draw."""
    mine = [r for r in rows if r["method"] == method and r["dataset"] == dataset and r["shots"] == shots]
    draws = sorted({r["draw"] for r in mine})
    return {d: float(np.mean([r["accuracy"] for r in mine if r["draw"] == d])) for d in draws}


def _at(values: dict[int, float], draw: int) -> float | None:
    """A draw's value; a fixed support, drawn once, stands for every draw."""
    if draw in values:
        return values[draw]
    return next(iter(values.values())) if len(values) == 1 else None


def _difference(mine: dict[int, float], theirs: dict[int, float]) -> dict | None:
    """Paired over the draws both have."""
    pairs = [(_at(mine, d), _at(theirs, d)) for d in sorted(set(mine) | set(theirs))]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    diff, ci = mean_ci(np.array([a - b for a, b in pairs]), student=True)
    return {"diff": diff, "ci95": ci}


def _mean_over(per_dataset: list[dict[int, float]]) -> dict[int, float]:
    """Each draw's mean accuracy over datasets (each weighted equally; a fixed support stands for every draw)."""
    all_draws = sorted({d for values in per_dataset for d in values})
    return {d: float(np.mean([_at(v, d) for v in per_dataset])) for d in all_draws}


def compare(rows: list[dict], method: str, baseline: str) -> dict:
    """`method` against `baseline` on the supports both ran (an ablation: a component on and off): the difference
    per (dataset, shots) and per shots over those datasets, paired over draws, with both adaptation times."""
    def cells_of(name):
        return {(r["dataset"], r["shots"]) for r in rows if r["method"] == name}

    def seconds(name, shots, datasets):
        return float(np.mean([r["adapt_s"] for r in rows if r["method"] == name and r["shots"] == shots
                              and r["dataset"] in datasets]))

    cells = sorted(cells_of(method) & cells_of(baseline))
    result = {"method": method, "baseline": baseline, "datasets": [], "mean": []}
    for dataset, shots in cells:
        result["datasets"].append({"dataset": dataset, "shots": shots, **_difference(
            _per_draw(rows, method, dataset, shots), _per_draw(rows, baseline, dataset, shots)),
            "adapt_s": seconds(method, shots, {dataset}), "baseline_adapt_s": seconds(baseline, shots, {dataset})})
    for shots in sorted({k for _, k in cells}):
        datasets = [d for d, k in cells if k == shots]
        means = [_mean_over([_per_draw(rows, name, d, shots) for d in datasets]) for name in (method, baseline)]
        result["mean"].append({"shots": shots, "datasets": datasets, **_difference(*means),
                               "adapt_s": seconds(method, shots, set(datasets)),
                               "baseline_adapt_s": seconds(baseline, shots, set(datasets))})
    return result


def summarise(rows: list[dict]) -> dict:
    """Per (dataset, shots), and per shots over all datasets (each weighted equally): mean accuracy with a
    95% CI over support draws, differences to frozen and SetFit paired over draws, adaptation seconds."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {"datasets": [], "mean": []}
    cells = sorted({(r["dataset"], r["shots"]) for r in rows})
    draws = {(m, d, k): _per_draw(rows, m, d, k) for m in methods for d, k in cells}
    for dataset, shots in cells:
        entry = {"dataset": dataset, "shots": shots, "methods": {}}
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["dataset"] == dataset and r["shots"] == shots]
            if not mine:
                continue
            mean, ci = mean_ci(np.array(list(draws[method, dataset, shots].values())), student=True)
            entry["methods"][method] = {
                "accuracy": mean, "ci95": ci, "draws": len(draws[method, dataset, shots]),
                "adapt_s": float(np.mean([r["adapt_s"] for r in mine])), "classes": max(r["classes"] for r in mine),
                "short_classes": max(r["short_classes"] for r in mine), "reused": any(r.get("reused") for r in mine)}
            for baseline in (FROZEN, SETFIT):
                if method != baseline and draws.get((baseline, dataset, shots)):
                    entry["methods"][method][f"vs_{baseline}"] = _difference(draws[method, dataset, shots],
                                                                             draws[baseline, dataset, shots])
        summary["datasets"].append(entry)
    for shots in sorted({k for _, k in cells}):
        datasets = [d for d, k in cells if k == shots]
        entry = {"shots": shots, "datasets": datasets, "methods": {}}
        means = {}
        for method in methods:
            per_dataset = [draws[method, d, shots] for d in datasets]
            if not all(per_dataset):
                continue  # a method that did not run on every dataset has no mean
            means[method] = _mean_over(per_dataset)
            mean, ci = mean_ci(np.array(list(means[method].values())), student=True)
            entry["methods"][method] = {"accuracy": mean, "ci95": ci, "adapt_s": float(np.mean(
                [r["adapt_s"] for r in rows if r["method"] == method and r["shots"] == shots]))}
        for method in means:
            for baseline in (FROZEN, SETFIT):
                if method != baseline and baseline in means:
                    entry["methods"][method][f"vs_{baseline}"] = _difference(means[method], means[baseline])
        summary["mean"].append(entry)
    return summary
