"""Validation rules for the data metanlp reads, as Great Expectations 1.x suites, and their error type.

Labelled corpus: the text and label columns exist; every row is valid UTF-8 (and valid JSON for JSONL);
texts are non-empty after stripping and within the length bounds; every row has a label; every class has
at least K + Q examples for the configured episodes; every split has enough classes; and no text (after
normalising case and spaces) appears in two of the meta-train/val/test splits, which would leak test
examples into training. Unlabeled text: valid UTF-8, mostly non-empty lines, enough sentences.

Each check returns a report (JSON-ready: every expectation with its outcome, counts and a few offending
rows); `CorpusInvalid` carries a failed one. The pipeline's validate stage writes the report; pretraining
checks its text files with the same rules.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from metanlp.config import SplitConfig, ValidateParams
from metanlp.data.load import (
    MOST_TEXTS_ARE_LABELS,
    QUOTE_CHARS,
    DataError,
    LabelledTexts,
    is_utf8,
    normalised,
    quote,
    read_raw_rows,
    row_problem,
)
from metanlp.data.splits import split_classes


class CorpusInvalid(DataError):
    """A corpus or text file that fails its validation rules; `report` says which and where."""

    def __init__(self, report: dict) -> None:
        super().__init__(failure_summary(report))
        self.report = report


EXAMPLES_SHOWN = 5


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return gx, context


def _rows_frame(raw: pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame({"line": raw["_line"].astype(int), "utf8_valid": raw["_utf8_valid"].astype(bool),
                          "json_valid": raw["_json_valid"].astype(bool)})
    if {"text", "label"} <= set(raw.columns):  # the loader's own row rule, on every row
        frame["row_problem"] = [row_problem(t, lab) if ok else "not a JSON object" for t, lab, ok in
                                zip(raw["text"].tolist(), raw["label"].tolist(), raw["_json_valid"], strict=True)]
    for column in ("text", "label", "domain"):
        if column in raw.columns:
            # None stays None (a missing value); everything else is compared as stripped text
            frame[column] = [None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v).strip()
                             for v in raw[column].tolist()]
    return frame


def _suites(gx, v: ValidateParams, min_examples: int, rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame, list, str]]:
    """(name, frame, expectations, id column) for each table the rules look at."""
    E = gx.expectations
    row_rules = [E.ExpectColumnToExist(column="text"), E.ExpectColumnToExist(column="label"),
                 E.ExpectColumnValuesToBeInSet(column="utf8_valid", value_set=[True]),
                 E.ExpectColumnValuesToBeInSet(column="json_valid", value_set=[True])]
    suites = [("rows", rows, row_rules, "line")]
    if "text" in rows.columns:
        row_rules += [E.ExpectColumnValuesToNotBeNull(column="text"),
                      E.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S"),  # non-empty once stripped
                      E.ExpectColumnValueLengthsToBeBetween(column="text", min_value=v.min_chars,
                                                            max_value=v.max_chars)]
    if "label" in rows.columns:
        row_rules += [E.ExpectColumnValuesToNotBeNull(column="label"),
                      E.ExpectColumnValueLengthsToBeBetween(column="label", min_value=1)]
    if "text" not in rows.columns or "label" not in rows.columns:
        return suites
    row_rules.append(E.ExpectColumnValuesToBeNull(column="row_problem"))
    labelled = rows[rows["row_problem"].isna()]
    text_is_label = labelled["text"].map(normalised) == labelled["label"].astype(str).map(normalised)
    suites.append(("labels", labelled.assign(text_is_label=text_is_label)[["line", "text_is_label"]],
                   [E.ExpectColumnValuesToBeInSet(column="text_is_label", value_set=[False],
                                                  mostly=1 - MOST_TEXTS_ARE_LABELS)], "line"))
    counts = labelled.groupby("label").size().rename("examples").reset_index()
    suites.append(("classes", counts, [E.ExpectColumnValuesToBeBetween(
        column="examples", min_value=min_examples)], "label"))
    same_text = labelled.assign(normalised=labelled["text"].map(normalised)).groupby("normalised").agg(
        labels=("label", "nunique"), lines=("line", lambda ls: ",".join(map(str, ls)))).reset_index()
    suites.append(("texts", same_text, [E.ExpectColumnValuesToBeBetween(column="labels", max_value=1)], "lines"))
    return suites


def _split_frames(gx, v: ValidateParams, split_config: SplitConfig, rows: pd.DataFrame, source: str,
                  problems: list[dict]):
    """Per-split class counts and cross-split duplicate texts; a split that cannot be made is a problem."""
    E = gx.expectations
    good = rows[rows["row_problem"].isna()]
    try:
        data = LabelledTexts(good["text"].tolist(), good["label"].tolist(),
                             good["domain"].fillna("").tolist() if "domain" in good.columns else None,
                             source=source)
        split = split_classes(data, split_config)
    except DataError as err:
        problems.append({"suite": "splits", "expectation": "class_split_possible", "column": None,
                         "success": False, "unexpected_count": 1, "examples": [str(err)]})
        return []
    split_of = {c: name for name, classes in split.to_dict().items() for c in classes}
    per_split = pd.DataFrame({"split": list(split.to_dict()),
                              "classes": [len(c) for c in split.to_dict().values()]})
    tagged = good.assign(split=good["label"].map(split_of)).dropna(subset=["split"])
    tagged = tagged.assign(normalised=tagged["text"].map(normalised))
    spread = tagged.groupby("normalised").agg(splits=("split", "nunique"), lines=("line", list)).reset_index()
    spread["lines"] = spread["lines"].map(lambda ls: ",".join(map(str, ls)))
    return [("splits", per_split, [E.ExpectColumnValuesToBeBetween(
                column="classes", min_value=v.min_classes_per_split)], "split"),
            ("texts_across_splits", spread, [E.ExpectColumnValuesToBeBetween(column="splits", max_value=1)],
             "lines")]


def _plain(value):
    """numpy scalars and NaN -> JSON-ready Python values; a long string cut as messages cut it."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, str) and len(value) > QUOTE_CHARS:
        return quote(value)
    return None if isinstance(value, float) and pd.isna(value) else value


def _outcome(suite: str, result, id_column: str) -> dict:
    config = result.expectation_config
    detail = result.result or {}
    ids = detail.get("unexpected_index_list") or []
    values = detail.get("partial_unexpected_list") or []
    if config.kwargs.get("column") == "row_problem":  # where, and what is wrong there
        ids = [{**where, "problem": problem} for where, problem in zip(ids, detail.get("unexpected_list") or [],
                                                                      strict=False)]
    examples = [_plain(entry) for entry in (ids or values)[:EXAMPLES_SHOWN]]
    kwargs = {k: v for k, v in config.kwargs.items() if k not in {"column", "batch_id"}}
    return {"suite": suite, "expectation": config.type, "column": config.kwargs.get("column"), "rule": kwargs,
            "success": bool(result.success), "unexpected_count": detail.get("unexpected_count"),
            "examples": examples,
            "error": (result.exception_info or {}).get("exception_message") if not result.success else None}


def validate_corpus(source: Path, rules: ValidateParams, split: SplitConfig, min_examples: int,
                    name: str | None = None, text_column: str = "text", label_column: str = "label") -> dict:
    """Run every rule on the corpus at `source` (split as `split` says, `min_examples` per class); the report
    lists each expectation and its outcome. `name`: how the report and its messages call the corpus (default:
    its path); the pipeline passes the path as params.yaml gives it, so the report does not depend on where the
    project lies."""
    shown = name or str(source)
    gx, context = _context()
    raw = read_raw_rows(source)
    renamed = {text_column: "text", label_column: "label"}
    shadowed = [c for c in ("text", "label") if c in raw.columns and c not in renamed]  # other columns' names
    rows = _rows_frame(raw.drop(columns=shadowed).rename(columns=renamed))
    problems: list[dict] = []
    suites = _suites(gx, rules, min_examples, rows)
    if {"text", "label"} <= set(rows.columns):
        suites += _split_frames(gx, rules, split, rows, shown, problems)
    datasource = context.data_sources.add_pandas("corpus")
    outcomes = []
    for suite_name, frame, expectations, id_column in suites:
        batch = datasource.add_dataframe_asset(suite_name).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame.reset_index(drop=True)})
        suite = gx.ExpectationSuite(name=suite_name, expectations=expectations)
        result = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                      "unexpected_index_column_names": [id_column],
                                                      "partial_unexpected_count": EXAMPLES_SHOWN})
        outcomes += [_outcome(suite_name, r, id_column) for r in result.results]
    outcomes += problems
    failed = [o for o in outcomes if not o["success"]]
    return {"source": shown, "rows": len(rows), "classes": int(rows["label"].nunique())
            if "label" in rows.columns else 0, "min_examples_per_class": min_examples,
            "success": not failed, "expectations": len(outcomes), "failed": len(failed), "results": outcomes}


def failure_summary(report: dict) -> str:
    """One line: the file, then each failed rule with its count and a few offending rows."""
    parts = []
    for o in report["results"]:
        if not o["success"]:
            column = f" on {o['column']!r}" if o["column"] else ""
            rule = f" {o['rule']}" if o.get("rule") else ""
            count = f", {o['unexpected_count']} offending" if o["unexpected_count"] is not None else ""
            parts.append(f"{o['suite']}: {o['expectation']}{column}{rule}{count}, e.g. {o['examples'][:3]}"
                         + (f" ({quote(o['error'], 120)})" if o.get("error") else ""))
    return (f"{report['source']}: {report['failed']} of {report['expectations']} expectations failed: "
            + "; ".join(parts))


def markdown_report(report: dict) -> str:
    status = "passed" if report["success"] else "FAILED"
    lines = [f"# Corpus validation: {status}", "", f"`{report['source']}`: {report['rows']} rows, "
             f"{report['classes']} classes, at least {report['min_examples_per_class']} examples per class needed.",
             "", "| suite | expectation | column | ok | offending | examples |", "|---|---|---|---|---|---|"]
    for o in report["results"]:
        examples = str(o["examples"][:3]).replace("|", "\\|") if not o["success"] else ""
        lines.append(f"| {o['suite']} | {o['expectation']} | {o['column'] or ''} | {'yes' if o['success'] else 'NO'} "
                     f"| {o['unexpected_count'] if o['unexpected_count'] is not None else ''} | {examples} |")
    return "\n".join(lines) + "\n"


def validate_unlabeled(source: Path, min_sentences: int = 32, min_nonempty: float = 0.5) -> dict:
    """GE rules for unlabeled text (one text per line): valid UTF-8, mostly non-empty lines, and enough
    sentences to pretrain on. Same report shape as `validate_corpus`."""
    from metanlp.data.smlmt import split_sentences

    gx, context = _context()
    raw = source.read_bytes().splitlines()
    lines = pd.DataFrame({"line": range(1, len(raw) + 1),
                          "text": [r.decode("utf-8", errors="replace").strip() for r in raw],
                          "utf8_valid": [is_utf8(r) for r in raw]})
    sentences = pd.DataFrame({"sentence": split_sentences(lines["text"].tolist(), min_words=3)})
    E = gx.expectations
    suites = [("lines", lines, [E.ExpectColumnValuesToBeInSet(column="utf8_valid", value_set=[True]),
                                E.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S", mostly=min_nonempty)],
               "line"),
              ("sentences", sentences, [E.ExpectTableRowCountToBeBetween(min_value=min_sentences)], "sentence")]
    datasource = context.data_sources.add_pandas("unlabeled")
    outcomes = []
    for suite_name, frame, expectations, id_column in suites:
        batch = datasource.add_dataframe_asset(suite_name).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame})
        result = batch.validate(gx.ExpectationSuite(name=suite_name, expectations=expectations),
                                result_format={"result_format": "COMPLETE",
                                               "unexpected_index_column_names": [id_column],
                                               "partial_unexpected_count": EXAMPLES_SHOWN})
        outcomes += [_outcome(suite_name, r, id_column) for r in result.results]
    failed = [o for o in outcomes if not o["success"]]
    return {"source": str(source), "rows": len(lines), "sentences": len(sentences), "success": not failed,
            "expectations": len(outcomes), "failed": len(failed), "results": outcomes}

