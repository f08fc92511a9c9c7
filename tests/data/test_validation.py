"""Great Expectations rules on real files: the embedded corpus passes, each kind of corruption fails with
the rule named and the offending rows shown, and nothing downstream of validation is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metanlp.data.validation import CorpusInvalid
from metanlp.stages import StageError, load_params
from metanlp.stages import build_corpus as build_corpus_stage
from metanlp.stages import validate as validate_stage


def rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "data" / "corpus.jsonl").read_text().splitlines()]


def write_rows(root: Path, data: list[dict]) -> None:
    (root / "data" / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))


def failed_rules(root: Path) -> tuple[str, dict]:
    with pytest.raises(CorpusInvalid) as caught:
        validate_stage.run(load_params(root / "params.yaml"), root)
    report = json.loads((root / "artifacts" / "validation" / "report.json").read_text())
    assert report["success"] is False
    return str(caught.value), {(r["suite"], r["expectation"], r["column"]): r for r in report["results"]
                               if not r["success"]}


def test_embedded_corpus_passes(tiny_project):
    result = validate_stage.run(load_params(tiny_project / "params.yaml"), tiny_project)
    report = json.loads(Path(result["report"]).read_text())
    assert report["success"] and report["failed"] == 0 and report["expectations"] >= 10
    markdown = (tiny_project / "artifacts" / "validation" / "report.md").read_text()
    assert markdown.startswith("# Corpus validation: passed")


def test_empty_text_is_named_with_its_line(tiny_project):
    data = rows(tiny_project)
    data[4]["text"] = "   "
    write_rows(tiny_project, data)
    message, failed = failed_rules(tiny_project)
    rule = failed[("rows", "expect_column_values_to_match_regex", "text")]
    assert rule["unexpected_count"] == 1 and rule["examples"][0]["line"] == 5
    assert "expect_column_values_to_match_regex on 'text'" in message


def test_class_with_one_example(tiny_project):
    data = rows(tiny_project)
    lonely = data[0]["label"]
    kept = [r for r in data if r["label"] != lonely] + [data[0]]
    write_rows(tiny_project, kept)
    message, failed = failed_rules(tiny_project)
    rule = failed[("classes", "expect_column_values_to_be_between", "examples")]
    assert rule["examples"] == [{"examples": 1, "label": lonely}]
    assert lonely in message


def test_duplicate_text_across_splits(tiny_project):
    data = rows(tiny_project)
    train_row = next(i for i, r in enumerate(data) if r["domain"] == "garden")
    test_row = next(i for i, r in enumerate(data) if r["domain"] == "events")
    data[test_row]["text"] = "  " + data[train_row]["text"].upper() + " "  # case and spaces do not hide it
    write_rows(tiny_project, data)
    _, failed = failed_rules(tiny_project)
    rule = failed[("texts_across_splits", "expect_column_values_to_be_between", "splits")]
    assert rule["examples"][0]["lines"] == f"{train_row + 1},{test_row + 1}"


def test_missing_label_column(tiny_project):
    write_rows(tiny_project, [{"text": r["text"], "domain": r["domain"]} for r in rows(tiny_project)])
    message, failed = failed_rules(tiny_project)
    assert ("rows", "expect_column_to_exist", "label") in failed
    assert "expect_column_to_exist on 'label'" in message


def test_invalid_utf8_and_broken_json(tiny_project):
    path = tiny_project / "data" / "corpus.jsonl"
    lines = path.read_bytes().splitlines()
    lines[2] = lines[2].replace(b"e", b"\xff", 1)
    lines[7] = b"{not json"
    path.write_bytes(b"\n".join(lines) + b"\n")
    _, failed = failed_rules(tiny_project)
    assert failed[("rows", "expect_column_values_to_be_in_set", "utf8_valid")]["examples"][0]["line"] == 3
    assert failed[("rows", "expect_column_values_to_be_in_set", "json_valid")]["examples"][0]["line"] == 8


def test_corpus_is_not_built_without_a_passing_report(tiny_project):
    data = rows(tiny_project)
    data[0]["text"] = ""
    write_rows(tiny_project, data)
    params = load_params(tiny_project / "params.yaml")
    with pytest.raises(CorpusInvalid):
        validate_stage.run(params, tiny_project)
    with pytest.raises(StageError, match="no passing validation report"):
        build_corpus_stage.run(params, tiny_project)
    assert not (tiny_project / "artifacts" / "corpus").exists()


def test_unlabeled_text_rules(tmp_path):
    from metanlp.data.validation import validate_unlabeled

    good = tmp_path / "good.txt"
    good.write_text("\n".join(f"This is sentence number {i} of the unlabeled text." for i in range(40)) + "\n\n")
    assert validate_unlabeled(good)["success"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"one short line with a bad byte \xff here.\n" + b"\n" * 5 + b"too few sentences here.\n")
    report = validate_unlabeled(bad)
    failed = {(r["suite"], r["expectation"]) for r in report["results"] if not r["success"]}
    assert failed == {("lines", "expect_column_values_to_be_in_set"), ("lines", "expect_column_values_to_match_regex"),
                      ("sentences", "expect_table_row_count_to_be_between")}
