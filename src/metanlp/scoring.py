"""Batch scoring: a file of texts of any size, labelled by a model adapted once to a support set.

The input is streamed in batches (never whole in memory) and checked whole before the model sees it, so a bad
row stops the run at once with its line, not after hours of encoding. The output (CSV or JSONL, by its
suffix) is written under a temporary name and renamed when complete: an interrupted run leaves the previous
file, never half of one. `metanlp predict --out` and the Prefect scoring flow both call `score_file`.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from metanlp.atomic import file_in_the_way, write_file_atomic
from metanlp.data.load import DataError, iter_text_batches, load_labelled
from metanlp.learners import Classifier
from metanlp.progress import progress_bar
from metanlp.tasks import DEFAULT_STRATEGY, strategy_learner

if TYPE_CHECKING:  # annotation only: adaptation is imported when a task tunes the encoder
    from metanlp.adaptation import AdaptBudget

OUTPUT_FORMATS = (".csv", ".jsonl")


@dataclass(frozen=True)
class ScoringSummary:
    texts: int
    classes: list[str]
    out: str
    model_version: str
    adapt_seconds: float
    score_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def check_output(out: Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise DataError(f"--out {out}: unknown output type {out.suffix!r}; use .csv or .jsonl")
    if out.is_dir():
        raise DataError(f"--out {out}: is a directory; name a file")
    if (blocking := file_in_the_way(out)) is not None:
        raise DataError(f"--out {out}: {blocking} is not a directory")
    return out


def write_scores(classifier: Classifier, texts: Path, out: Path, top: int = 3, text_column: str = "text",
                 batch_size: int = 256, show_progress: bool = True) -> int:
    """Label every text of `texts` into `out` (one row per input row, with its line); returns the count."""
    if top < 1 or batch_size < 1:
        raise DataError(f"top and batch size must be at least 1, got {top} and {batch_size}")
    top = min(top, len(classifier.classes))
    total = sum(len(batch) for batch in iter_text_batches(texts, text_column, batch_size))  # checks every row
    if total == 0:
        raise DataError(f"{texts}: no texts")
    as_csv = out.suffix.lower() == ".csv"

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as handle, \
                progress_bar(f"scoring {total} texts", -(-total // batch_size), show_progress) as advance:
            writer = csv.writer(handle) if as_csv else None
            if writer:
                ranks = [f"{field}_{rank}" for rank in range(2, top + 1) for field in ("label", "score")]
                writer.writerow(["line", "text", "label", "score", *ranks])
            for batch in iter_text_batches(texts, text_column, batch_size):
                lines, batch_texts = zip(*batch, strict=True)
                predictions = classifier.predict(list(batch_texts))
                for line, text, ranked in zip(lines, batch_texts, predictions.top(top), strict=True):
                    if writer:
                        writer.writerow([line, text, *(v for pair in ranked for v in (pair[0], f"{pair[1]:.6f}"))])
                    else:
                        handle.write(json.dumps({"line": line, "text": text, "label": ranked[0][0],
                                                 "score": round(ranked[0][1], 6),
                                                 "top": {c: round(p, 6) for c, p in ranked}},
                                                ensure_ascii=False) + "\n")
                advance()

    write_file_atomic(out, write)
    return total


def score_file(model: str, support: str, texts: str, out: str, *, top: int = 3, text_column: str = "text",
               label_column: str = "label", batch_size: int = 256, device: str = "auto",
               tracking_uri: str | None = None, show_progress: bool = True,
               strategy: str = DEFAULT_STRATEGY, budget: AdaptBudget | None = None) -> ScoringSummary:
    """Adapt `model` (a folder or `models:/NAME@alias`) to `support` once (by `strategy`, one of
    `metanlp.tasks.STRATEGIES`; `budget`: an `AdaptBudget` for `contrastive`) and label every text of `texts`."""
    from metanlp.encoder import resolve_device
    from metanlp.service import open_model

    out_path = check_output(Path(out))
    support_set = load_labelled(support, text_column=text_column, label_column=label_column)
    source = open_model(model, tracking_uri)
    learner = strategy_learner(source.learner.to(resolve_device(device)), strategy, budget)
    started = time.perf_counter()
    classifier = learner.adapt(support_set.texts, support_set.labels)
    adapted = time.perf_counter()
    count = write_scores(classifier, Path(texts), out_path, top, text_column, batch_size, show_progress)
    return ScoringSummary(count, classifier.classes, str(out_path), source.current, round(adapted - started, 3),
                          round(time.perf_counter() - adapted, 3))
