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
    rows_where_filtered,
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


def _suites(gx, v: ValidateParams, min_examples: int, rows: pd.DataFrame, by_space: bool = False,
            conflicting_labels: str = "refuse") -> list[tuple[str, pd.DataFrame, list, str]]:
    """(name, frame, expectations, id column) for each table the rules look at.

    `by_space` (a task pool's dataset): each value of the `domain` column is a label space of its own (ARSC's
    tasks): a text is checked for two labels within its space, and instead of every class having
    `min_examples`, some space must have 2 such classes (episodes leave shorter classes, and spaces without 2
    full classes, out: real sets have some)."""
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
    space = labelled["domain"].fillna("") if by_space and "domain" in labelled.columns else pd.Series(
        "", index=labelled.index)
    if by_space:
        counts = labelled.assign(space=space).groupby(["space", "label"]).size().rename("examples").reset_index()
        full = counts.assign(full=counts["examples"] >= min_examples).groupby("space")["full"].sum()
        unusable = sorted(full.index[full < 2])  # episodes leave these out (ARSC has a few one-class tasks)
        spaces = pd.DataFrame([{"label_spaces": len(full), "usable_spaces": len(full) - len(unusable),
                                "unusable": ",".join(unusable[:EXAMPLES_SHOWN]) or "none"}])
        suites.append(("label_spaces", spaces, [E.ExpectColumnValuesToBeBetween(
            column="usable_spaces", min_value=1)], "unusable"))
    else:
        counts = labelled.groupby("label").size().rename("examples").reset_index()
        suites.append(("classes", counts, [E.ExpectColumnValuesToBeBetween(
            column="examples", min_value=min_examples)], "label"))
    if conflicting_labels == "refuse":  # else the loader drops every row of such a text
        keyed = labelled.assign(normalised=space + "\x00" + labelled["text"].map(normalised))
        same_text = keyed.groupby("normalised").agg(
            labels=("label", "nunique"), lines=("line", lambda ls: ",".join(map(str, ls)))).reset_index()
        suites.append(("texts", same_text, [E.ExpectColumnValuesToBeBetween(column="labels", max_value=1)],
                       "lines"))
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
    outcomes = _run_suites(gx, context.data_sources.add_pandas("corpus"), suites) + problems
    failed = [o for o in outcomes if not o["success"]]
    return {"source": shown, "rows": len(rows), "classes": int(rows["label"].nunique())
            if "label" in rows.columns else 0, "min_examples_per_class": min_examples,
            "success": not failed, "expectations": len(outcomes), "failed": len(failed), "results": outcomes}


def _run_suites(gx, datasource, suites: list[tuple[str, pd.DataFrame, list, str]]) -> list[dict]:
    outcomes = []
    for suite_name, frame, expectations, id_column in suites:
        batch = datasource.add_dataframe_asset(suite_name).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame.reset_index(drop=True)})
        suite = gx.ExpectationSuite(name=suite_name, expectations=expectations)
        result = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                      "unexpected_index_column_names": [id_column],
                                                      "partial_unexpected_count": EXAMPLES_SHOWN})
        outcomes += [_outcome(suite_name, r, id_column) for r in result.results]
    return outcomes


POOL_SOURCE = "data.tasks"  # how a validation report names a task pool (params.yaml's key)


def _pool_rows(entry, path: Path | str) -> pd.DataFrame:
    """The rows a pool entry reads from its file, in the suite's columns (`domain`: its task column)."""
    raw = rows_where_filtered(read_raw_rows(path), entry.where, f"{path} (data.tasks {entry.name!r})")
    renamed = {entry.text_column: "text", entry.label_column: "label"}
    if entry.task_column:
        renamed[entry.task_column] = "domain"
    shadowed = [c for c in ("text", "label", "domain") if c in raw.columns and c not in renamed]
    rows = _rows_frame(raw.drop(columns=shadowed).rename(columns=renamed))
    if entry.classes and "label" in rows.columns:
        rows = rows[rows["label"].isin(entry.classes)]
    return rows


def same_dataset(a, b) -> bool:
    """Two pool entries read the same dataset: their paths name the same file at one of the splits (an eval
    entry's `clinc150/{split}.jsonl` and a training entry's `clinc150/train.jsonl`)."""
    return any(a.path.format(split=split) == b.path.format(split=split) for split in ("train", "test"))


def validate_pool(pool, root: Path, rules: ValidateParams, min_examples: int) -> dict:
    """Every rule on every dataset of a task pool (`config.TaskPool`), each at the split its role reads, in one
    report whose suites are named `dataset/suite`, so a failure names its dataset. A missing or unreadable file
    fails that dataset's `file` rule; an eval dataset that shares a file and a class with a dataset the model
    trains or validates on fails `held_out` (it would not be held out)."""
    from metanlp.data.pool import ROLE_SPLITS, entry_path

    gx, context = _context()
    datasource = context.data_sources.add_pandas("pool")
    outcomes, datasets, classes_of = [], {}, {}
    for entry in pool.tasks:
        path = entry_path(entry, root)
        try:
            rows = _pool_rows(entry, path)
        except (DataError, OSError) as err:
            outcomes.append({"suite": f"{entry.name}/file", "expectation": "readable_rows", "column": None,
                             "success": False, "unexpected_count": 1, "examples": [str(err)]})
            continue
        suites = _suites(gx, rules, min_examples, rows, by_space=True, conflicting_labels=entry.conflicting_labels)
        outcomes += _run_suites(gx, datasource, [(f"{entry.name}/{name}", *rest) for name, *rest in suites])
        labels = rows["label"].dropna() if "label" in rows.columns else pd.Series(dtype=str)
        # with a task column a class is (task, label): ARSC's target tasks share labels, not classes, with its sources
        tasks = rows.loc[labels.index, "domain"].astype(str) + "::" if "domain" in rows.columns else ""
        classes_of[entry.name] = set(tasks + labels)
        spaces = next((frame for name, frame, *_ in suites if name == "label_spaces"), None)
        datasets[entry.name] = {  # the path as params.yaml gives it, so the report does not depend on the folder
            "role": entry.role, "path": entry.path.format(split=ROLE_SPLITS[entry.role]), "rows": len(rows),
            "classes": int(labels.nunique()),
            **(spaces.iloc[0][["label_spaces", "usable_spaces"]].astype(int).to_dict() if spaces is not None else {})}
    trained = [e for e in pool.tasks if e.role != "eval" and e.name in classes_of]
    pairs = [{"pair": f"{e.name} & {t.name}", "shared_classes": len(classes_of[e.name] & classes_of[t.name]),
              "examples": sorted(classes_of[e.name] & classes_of[t.name])[:EXAMPLES_SHOWN]}
             for e in pool.tasks if e.role == "eval" and e.name in classes_of
             for t in trained if same_dataset(e, t)]
    if pairs:
        outcomes += _run_suites(gx, datasource, [("held_out", pd.DataFrame(pairs), [
            gx.expectations.ExpectColumnValuesToBeBetween(column="shared_classes", max_value=0)], "pair")])
    failed = [o for o in outcomes if not o["success"]]
    return {"source": POOL_SOURCE, "rows": sum(d["rows"] for d in datasets.values()),
            "classes": sum(d["classes"] for d in datasets.values()), "min_examples_per_class": min_examples,
            "datasets": datasets, "success": not failed, "expectations": len(outcomes), "failed": len(failed),
            "results": outcomes}


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

