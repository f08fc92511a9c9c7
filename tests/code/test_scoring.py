"""Code tests: batch scoring (`metanlp predict --texts FILE --out FILE`) streams a file of any size in batches,
writes CSV or JSONL whole or not at all, and names the line of a bad row before any work is done."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from metanlp.cli import app
from metanlp.learners import build_learner, save_learner

runner = CliRunner()
WORDS = {"weather": ["rain", "snow", "wind"], "music": ["song", "album", "guitar"], "food": ["pizza", "soup", "bread"]}


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_encoder_config):
    folder = tmp_path_factory.mktemp("scoring") / "model"
    save_learner(build_learner("protonet", tiny_encoder_config), folder)
    return folder


@pytest.fixture
def support(tmp_path):
    rows = [{"utterance": f"a {word} question {i}", "intent": label}
            for label, words in WORDS.items() for i, word in enumerate(words)]
    return write_jsonl(tmp_path / "support.jsonl", rows)


def texts_of(n: int) -> list[str]:
    words = [w for ws in WORDS.values() for w in ws]
    return [f"row {i} about {words[i % len(words)]}" for i in range(n)]


def test_a_file_is_scored_in_batches_as_one_classifier_would(model, support, tmp_path):
    from metanlp.learners import load_learner

    texts = texts_of(530)
    source = write_jsonl(tmp_path / "texts.jsonl", [{"utterance": t, "id": i} for i, t in enumerate(texts)])
    out = tmp_path / "scores.jsonl"
    result = runner.invoke(app, ["predict", "--model", str(model), "--support", str(support), "--texts",
                                 str(source), "--out", str(out), "--text-column", "utterance", "--label-column",
                                 "intent", "--batch-size", "64", "--top", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "scored 530 texts" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 531)) and [r["text"] for r in rows] == texts
    assert all(len(r["top"]) == 2 and r["label"] == next(iter(r["top"])) for r in rows)
    learner = load_learner(model)
    supports = [json.loads(line) for line in support.read_text().splitlines()]
    expected = learner.adapt([s["utterance"] for s in supports], [s["intent"] for s in supports]).predict(texts)
    assert [r["label"] for r in rows] == expected.labels  # batching changes nothing


def test_csv_in_and_out_with_a_bom_and_the_top_scores_as_columns(model, support, tmp_path):
    source = tmp_path / "texts.csv"
    pd.DataFrame({"utterance": texts_of(20)}).to_csv(source, index=False, encoding="utf-8-sig")
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["predict", "--model", str(model), "--support", str(support), "--texts",
                                 str(source), "--out", str(out), "--text-column", "utterance", "--label-column",
                                 "intent", "--top", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["line", "text", "label", "score", "label_2", "score_2", "label_3", "score_3"]
    assert frame["line"].tolist() == list(range(2, 22))  # the header is line 1
    assert (frame["score"] >= frame["score_2"]).all() and set(frame["label"]) <= set(WORDS)


def test_parquet_and_txt_inputs(model, support, tmp_path):
    for name, write in (("texts.parquet", lambda p: pd.DataFrame({"utterance": texts_of(7)}).to_parquet(p)),
                        ("texts.txt", lambda p: p.write_text("\n".join(texts_of(7)) + "\n\n"))):
        write(tmp_path / name)
        out = tmp_path / f"{name}.jsonl"
        result = runner.invoke(app, ["predict", "--model", str(model), "--support", str(support), "--texts",
                                     str(tmp_path / name), "--out", str(out), "--text-column", "utterance",
                                     "--label-column", "intent", "--quiet"])
        assert result.exit_code == 0, result.output
        assert len(out.read_text().splitlines()) == 7


@pytest.mark.parametrize(("rows", "message"), [
    ([{"utterance": "fine"}] * 300 + [{"utterance": "  "}], "texts.jsonl:301: empty text"),
    ([{"utterance": "fine"}] * 3 + [{"other": "x"}], "texts.jsonl:4: expected a JSON object with 'utterance'"),
    ([{"utterance": "fine"}, {"utterance": 7}], "texts.jsonl:2: 'utterance' must be a string"),
])
def test_a_bad_row_is_named_and_the_previous_output_is_kept(model, support, tmp_path, rows, message):
    source = write_jsonl(tmp_path / "texts.jsonl", rows)
    out = tmp_path / "scores.jsonl"
    out.write_text("yesterday's scores\n")
    result = runner.invoke(app, ["predict", "--model", str(model), "--support", str(support), "--texts",
                                 str(source), "--out", str(out), "--text-column", "utterance", "--label-column",
                                 "intent", "--quiet"])
    assert result.exit_code != 0 and message in result.output
    assert out.read_text() == "yesterday's scores\n" and list(tmp_path.glob("*.tmp")) == []


@pytest.mark.parametrize(("extra", "message"), [
    (["--out", "scores.txt"], "unknown output type '.txt'"),
    (["--out", "."], "use .csv or .jsonl"),
    (["--text", "one text", "--out", "x.jsonl"], "--out scores a file"),
    (["--out", "x.jsonl", "--batch-size", "0"], "--batch-size"),
])
def test_wrong_scoring_options_are_refused(model, support, tmp_path, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = write_jsonl(tmp_path / "texts.jsonl", [{"utterance": "hello"}])
    result = runner.invoke(app, ["predict", "--model", str(model), "--support", str(support), "--texts",
                                 str(source), "--text-column", "utterance", "--label-column", "intent", *extra])
    assert result.exit_code != 0 and message in result.output
