"""Hostile input, as a careless or malicious user would give it: corrupt corpora, bad parameters and bad
command-line values. Every case exits 2 with a one-line message naming the file, line or field and the rule,
with no traceback, quoting at most ~200 characters of user text, and nothing is written outside a fresh
--out. (Malformed requests to the served model: tests/code/test_service.py.)"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from metanlp.cli import app

runner = CliRunner()
BIG = "x" * 1_000_000  # a 1 MB value: never echoed whole


def good_rows(classes: int = 8, per_class: int = 12) -> list[dict]:
    words = ["rain", "song", "pizza", "flight", "goal", "loan", "tent", "phone", "garden", "train", "movie", "shoe"]
    return [{"text": f"a question about {words[c]} number {i} please", "label": f"class_{c}",
             "domain": f"d{c % 4}"} for c in range(classes) for i in range(per_class)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def with_row(index: int, **changes) -> bytes:
    rows = good_rows()
    rows[index] = {**rows[index], **changes}
    return jsonl(rows)


# (file name, content, words the message must contain)
CORPORA = [
    ("empty.jsonl", b"", "no rows"),
    ("empty.csv", b"", "empty file"),
    ("header_only.csv", b"text,label\n", "no rows"),
    ("blank_lines.jsonl", b"\n\n   \n", "no rows"),
    ("unknown.xlsx", b"whatever", "unknown file type"),
    ("broken_json.jsonl", jsonl(good_rows())[:-40] + b"\n{not json\n", "not valid JSON"),
    ("array_line.jsonl", jsonl(good_rows()) + b"[1, 2]\n", "expected a JSON object"),
    ("no_text_column.jsonl", jsonl([{"body": r["text"], "label": r["label"]} for r in good_rows()]),
     "no text column 'text'"),
    ("no_label_column.jsonl", jsonl([{"text": r["text"]} for r in good_rows()]), "no label column 'label'"),
    ("object_text.jsonl", with_row(5, text={"a": 1}), ":6: the text must be a string, got dict"),
    ("number_text.jsonl", with_row(6, text=42), ":7: the text must be a string, got int"),
    ("null_text.jsonl", with_row(7, text=None), ":8: missing text"),
    ("null_label.jsonl", with_row(8, label=None), ":9: missing label"),
    ("empty_label.jsonl", with_row(9, label="  "), ":10: missing label"),
    ("list_label.jsonl", with_row(10, label=["a", "b"]), ":11: the label must be a string or an integer"),
    ("bool_label.jsonl", with_row(11, label=True), ":12: the label must be a string or an integer"),
    ("empty_text.jsonl", with_row(3, text=""), ":4: empty text"),
    ("space_text.jsonl", with_row(3, text="   \t "), ":4: empty text"),
    ("zero_width_text.jsonl", with_row(3, text="\u200b\u200b\ufeff"), ":4: empty text"),
    ("control_text.jsonl", with_row(3, text="\x01\x02\x7f"), ":4: empty text"),
    ("bad_utf8.jsonl", jsonl(good_rows()[:20]) + b'{"text": "caf\xe9 au lait", "label": "class_0"}\n',
     ":21: not valid UTF-8"),
    ("bad_utf8.csv", b"text,label\n" + b"".join(f"{r['text']},{r['label']}\n".encode() for r in good_rows()[:30])
     + b"caf\xe9 crema,class_0\n", ":32: not valid UTF-8"),
    ("same_text_two_labels.jsonl", with_row(13, text=good_rows()[0]["text"]), "with another label"),
    ("big_text_two_labels.jsonl", jsonl(good_rows() + [{"text": BIG, "label": "class_0", "domain": "d0"},
                                                        {"text": BIG, "label": "class_1", "domain": "d1"}]),
     "with another label"),
    ("big_object_text.jsonl", with_row(2, text={"blob": BIG}), ":3: the text must be a string"),
    ("big_label_list.jsonl", with_row(2, label=[BIG]), ":3: the label must be a string or an integer"),
    ("texts_are_labels.jsonl", jsonl([{**r, "text": r["label"]} for r in good_rows()]), "columns swapped"),
    ("one_class.jsonl", jsonl([{**r, "label": "only"} for r in good_rows()]), "class"),
    ("too_few_examples.jsonl", jsonl(good_rows(per_class=3)), "examples"),
    ("corrupt.parquet", b"PAR1 this is not parquet", "not a readable Parquet file"),
    ("pickle.parquet", pickle.dumps({"text": ["a"], "label": ["b"]}), "not a readable Parquet file"),
    ("wrong_delimiter.csv", b"text;label\n" + b"".join(f"{r['text']};{r['label']}\n".encode()
                                                        for r in good_rows()), "no text column 'text'"),
    ("unbalanced_quotes.csv", b'text,label\n"an open quote,class_0\n' + b"x,y\n" * 3, "cannot parse as CSV"),
    ("missing_columns.tsv", b"text\n" + b"".join(f"{r['text']}\n".encode() for r in good_rows()),
     "no label column 'label'"),
    ("trailing_garbage.jsonl", jsonl(good_rows())[:-1] + b" trailing\n", "not valid JSON"),
    ("nul_bytes.jsonl", with_row(4, text="\x00\x00"), ":5: empty text"),
    ("float_label.jsonl", with_row(1, label=1.5), ":2: the label must be a string or an integer, got float"),
    ("bom_and_bad_row.csv", "\ufefftext,label\n".encode() + b"".join(f"{r['text']},{r['label']}\n".encode()
                                                                       for r in good_rows()) + b" ,class_1\n",
     "empty text"),
    ("big_header.csv", (BIG + ",label\nhello,a\n").encode(), "no text column 'text'"),
    ("json_string_lines.jsonl", b'"just a string"\n' * 3, "expected a JSON object"),
]


def run_train(tmp_path: Path, data: Path, *extra: str):
    return runner.invoke(app, ["train", "--data", str(data), "--encoder", "tiny-random-bert", "--split-by", "random",
                               "--split-sizes", "2,2,2", "--episodes", "2", "--ways", "2", "--shots", "2",
                               "--queries", "2", "--val-every", "1", "--val-episodes", "2", "--quiet",
                               "--out", str(tmp_path / "out" / "model"), *extra])


def assert_refused(result, message: str, tmp_path: Path) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output[-2000:])
    output = result.output.strip()
    assert output.startswith("error:") and "\n" not in output, output[:3000]  # one line, no traceback
    assert "Traceback" not in output and message in output, output[:3000]
    assert len(output) < 2500  # a 1 MB value is never echoed whole
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "content", "message"), CORPORA, ids=[c[0] for c in CORPORA])
def test_a_bad_corpus_is_refused_by_train_with_its_file_and_line(tmp_path, name, content, message):
    data = tmp_path / name
    data.write_bytes(content)
    assert_refused(run_train(tmp_path, data), message, tmp_path)


def test_a_folder_or_a_missing_file_as_data(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    assert_refused(run_train(tmp_path, tmp_path / "folder.jsonl"), "is a folder", tmp_path)
    assert_refused(run_train(tmp_path, tmp_path / "absent.jsonl"), "no such file", tmp_path)


def test_the_same_file_passes_the_loader_and_the_pipelines_validation_or_fails_both(tmp_path, tiny_project):
    """One validator: a BOM CSV passes both; a JSON object as text fails both."""
    from metanlp.data.load import DataError, load_labelled
    from metanlp.data.validation import validate_corpus
    from metanlp.stages import load_params

    params = load_params(tiny_project / "params.yaml")
    rows = [json.loads(line) for line in (tiny_project / "data" / "corpus.jsonl").read_text().splitlines()]
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufefftext,label,domain\n".encode() + "".join(
        f'"{r["text"]}",{r["label"]},{r["domain"]}\n' for r in rows).encode())
    assert len(load_labelled(bom)) == len(rows)
    report = validate_corpus(bom, params.validate_, params.data.split, params.min_examples_per_class())
    assert report["success"], [r for r in report["results"] if not r["success"]]

    rows[3]["text"] = {"nested": "object"}
    bad = tmp_path / "object.jsonl"
    bad.write_bytes(jsonl(rows))
    with pytest.raises(DataError, match=":4: the text must be a string"):
        load_labelled(bad)
    report = validate_corpus(bad, params.validate_, params.data.split, params.min_examples_per_class())
    failed = [r for r in report["results"] if not r["success"]]
    assert [r["column"] for r in failed] == ["row_problem"] and failed[0]["examples"][0]["line"] == 4


# (params.yaml change as dotted key -> value, words the message must contain)
PARAMS = [
    ("meta_train.train.lr", -1, "meta_train.train.lr"),
    ("meta_train.train.lr", 0, "meta_train.train.lr"),
    ("meta_train.train.episodes", 0, "meta_train.train.episodes"),
    ("meta_train.train.episode.ways", 1, "meta_train.train.episode.ways"),
    ("meta_train.train.episode.shots", 0, "meta_train.train.episode.shots"),
    ("meta_train.train.episode.queries", -2, "meta_train.train.episode.queries"),
    ("meta_train.train.val_episode.ways", 1, "meta_train.train.val_episode.ways"),
    ("meta_train.train.tasks_per_step", 0, "meta_train.train.tasks_per_step"),
    ("meta_train.train.val_every", 0, "meta_train.train.val_every"),
    ("meta_train.train.distributed.processes", 0, "meta_train.train.distributed.processes"),
    ("meta_train.train.distributed.processes", 2, "tasks_per_step >= 2"),
    ("meta_train.train.device", "tpu", "device"),
    ("meta_train.train.seed", "x", "meta_train.train.seed"),
    ("meta_train.train.episodes", "many", "meta_train.train.episodes"),
    ("meta_train.learner", {"kind": "magic"}, "magic"),
    ("meta_train.learner", "magic", "magic"),
    ("meta_train.learner", {"kind": "anil", "adapt": "top"}, "adapt"),
    ("meta_train.learner", {"kind": "maml", "inner_steps": 0}, "inner_steps"),
    ("meta_train.learner", {"kind": "maml", "inner_lr": -0.1}, "inner_lr"),
    ("meta_train.learner", {"kind": "protonet", "distance": "manhattan"}, "distance"),
    ("meta_train.encoder.pooling", "max", "pooling"),
    ("meta_train.encoder.max_length", 0, "max_length"),
    ("meta_train.trian", {"lr": 1}, "trian"),
    ("data.split.by", "alphabet", "data.split.by"),
    ("data.split.test_domains", ["garden"], "garden"),
    ("evaluate.shots", [0], "evaluate.shots"),
    ("evaluate.ways", 1, "evaluate.ways"),
    ("evaluate.episodes", 1, "evaluate.episodes"),
    ("evaluate.repeats", 0, "evaluate.repeats"),
    ("evaluate.queries", 0, "evaluate.queries"),
    ("evaluate.primary", "9-way 9-shot", "primary"),
    ("evaluate.full_label_space_shots", [-1], "full_label_space_shots"),
    ("tune.trials", 0, "tune.trials"),
    ("tune.timeout_s", 0, "tune.timeout_s"),
    ("tune.episodes", 0, "tune.episodes"),
    ("validate.min_chars", -1, "validate.min_chars"),
    ("validate.max_chars", 0, "validate.max_chars"),
    ("validate.min_classes_per_split", 0, "validate.min_classes_per_split"),
    ("pretrain.modes", ["bogus"], "pretrain.modes"),
    ("pretrain.mlm_steps", -1, "pretrain.mlm_steps"),
    ("pretrain.smlmt_fraction", 1.5, "pretrain.smlmt_fraction"),
    ("register.model_name", "", "register.model_name"),
    ("unknown_stage", {"x": 1}, "unknown_stage"),
    ("meta_train.train.lr", BIG, "meta_train.train.lr"),
    ("tune.storage", "not a database", "tune.storage"),
    ("register.tracking_uri", "bogus://nowhere", "register.tracking_uri"),
    ("register.tracking_uri", "sqlite:///relative.db", "register.tracking_uri"),
]


def set_key(params: dict, dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value
    return params


@pytest.mark.parametrize(("key", "value", "message"), PARAMS, ids=[f"{k}={str(v)[:20]}" for k, v, _ in PARAMS])
def test_a_bad_parameter_stops_the_main_job_before_any_stage(tiny_project, key, value, message):
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(set_key(params, key, value)))
    result = runner.invoke(app, ["run", "--params", str(tiny_project / "params.yaml")])
    output = result.output.strip()
    assert result.exit_code == 2 and output.startswith("error:") and "Traceback" not in output, output[:3000]
    assert message in output and len(output) < 2500, output[:3000]
    assert not (tiny_project / "artifacts").exists() and not (tiny_project / "mlflow").exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "params.yaml"), (b"- a list\n- of things\n", "params.yaml"), (b"data: [unclosed\n", "params.yaml"),
    (b"\xff\xfe not yaml", "params.yaml")])
def test_a_broken_params_file(tiny_project, content, message):
    (tiny_project / "params.yaml").write_bytes(content)
    result = runner.invoke(app, ["run", "--params", str(tiny_project / "params.yaml")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tiny_project / "artifacts").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_encoder_config):
    from metanlp.learners import build_learner, save_learner

    return save_learner(build_learner("protonet", tiny_encoder_config), tmp_path_factory.mktemp("m") / "model")


@pytest.mark.parametrize(("arguments", "message"), [
    (["evaluate", "--data", "default", "--episodes", "0"], "--episodes"),
    (["evaluate", "--data", "default", "--repeats", "0"], "--repeats"),
    (["evaluate", "--data", "default", "--queries", "0"], "--queries"),
    (["evaluate", "--data", "default", "--queries", "-2"], "--queries"),
    (["evaluate", "--data", "default", "--finetune-episodes", "-1"], "--finetune-episodes"),
    (["evaluate", "--data", "default", "--shots", "0"], "--shots"),
    (["evaluate", "--data", "default", "--device", "tpu"], "tpu"),
    (["predict", "--support", "default", "--text", "hi", "--top", "0"], "--top"),
    (["adapt", "--support", "default", "--seconds", "0"], "--seconds"),
    (["adapt", "--support", "default", "--steps", "-1"], "--steps"),
    (["adapt", "--support", "default", "--selfsup-steps", "-5"], "--selfsup-steps"),
    (["train", "--encoder", "/nonexistent/encoder"], "/nonexistent/encoder"),
    (["train", "--learner", "magic"], "magic"),
    (["train", "--ways", "1"], "ways"),
])
def test_bad_command_line_values(tiny_model, tmp_path, arguments, message):
    command, *rest = arguments
    model = ["--model", str(tiny_model)] if command in ("evaluate", "predict", "adapt") else []
    out = ["--out", str(tmp_path / "out" / "x")] if command in ("adapt", "train") else []
    result = runner.invoke(app, [command, *model, *rest, *out])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_an_encoder_path_that_is_a_file_and_an_out_under_a_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not an encoder")
    result = runner.invoke(app, ["train", "--encoder", str(tmp_path / "weights.bin"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "weights.bin" in result.output and "Traceback" not in result.output
    (tmp_path / "a_file").write_text("x")
    result = runner.invoke(app, ["train", "--encoder", "tiny-random-bert", "--episodes", "1",
                                 "--out", str(tmp_path / "a_file" / "model")])
    assert result.exit_code == 2 and "a_file" in result.output and "Traceback" not in result.output
    assert (tmp_path / "a_file").read_text() == "x"


def test_a_pickle_where_the_weights_should_be_is_never_unpickled(tiny_model, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (model / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    result = runner.invoke(app, ["predict", "--model", str(model), "--support", "default", "--text", "hello"])
    assert result.exit_code == 2 and "model.safetensors" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_the_suite_is_as_large_as_promised():
    assert len(CORPORA) + 2 >= 40 and len(PARAMS) + 4 >= 40
