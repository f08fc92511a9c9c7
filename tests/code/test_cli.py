"""Code tests: the `metanlp` command line, end to end on the tiny encoder, and its bad-input errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from metanlp.cli import app

runner = CliRunner()
TINY_TRAIN = ["train", "--encoder", "tiny-random-bert", "--episodes", "4", "--val-every", "2", "--val-episodes",
              "3", "--quiet"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model"
    result = runner.invoke(app, [*TINY_TRAIN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_a_model_with_its_split_and_history(tiny_model):
    spec = json.loads((tiny_model / "learner.json").read_text())
    assert spec["learner"]["kind"] == "protonet"
    assert set(spec["provenance"]["classes"]) == {"train", "val", "test"}
    # predict and the service tune its top four layers on a support set first unless told otherwise
    assert spec["adaptation"] == {"strategy": "contrastive", "seconds": 90.0, "top_layers": 4, "batches": "nearest"}
    assert (tiny_model / "history.json").is_file() and (tiny_model / "learning_curve.png").is_file()


def test_evaluate_on_the_models_test_split(tiny_model, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["evaluate", "--model", str(tiny_model), "--data", "default", "--split", "test",
                                 "--shots", "1", "--episodes", "4", "--methods", "protonet,frozen,finetune",
                                 "--finetune-episodes", "2", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    methods = results["settings"][0]["methods"]
    assert set(methods) == {"protonet", "frozen", "finetune"}
    spec = json.loads((tiny_model / "learner.json").read_text())
    assert results["config"]["split"] == "test" and spec["provenance"]["classes"]["test"]
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()


def test_evaluate_with_domain_label_spaces_keeps_episodes_in_one_domain(tiny_model, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["evaluate", "--model", str(tiny_model), "--data", "default", "--split", "test",
                                 "--shots", "1", "--episodes", "4", "--label-spaces", "domain", "--out", str(out),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    (setting,) = json.loads(out.read_text())["settings"]
    assert setting["setting"] == "5-way 1-shot" and setting["methods"]["protonet"]["episodes"] == 4
    assert "--label-spaces" in runner.invoke(app, ["train", "--help"]).output


def test_evaluate_any_jsonl_full_label_space(tiny_model, small_jsonl, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["evaluate", "--model", str(tiny_model), "--data", str(small_jsonl), "--ways", "all",
                                 "--shots", "2", "--repeats", "2", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    setting = json.loads(out.read_text())["settings"][0]
    assert setting["setting"] == "all-way 2-shot" and setting["episodes"] == 2


def test_predict_prints_labels_and_scores(tiny_model, small_jsonl):
    result = runner.invoke(app, ["predict", "--model", str(tiny_model), "--support", str(small_jsonl),
                                 "--text", "pizza example", "--text", "rain example", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line["text"] for line in lines] == ["pizza example", "rain example"]
    assert all(line["label"] in {"weather", "music", "food", "travel"} for line in lines)
    assert all(abs(sum(line["scores"].values()) - 1) < 0.5 for line in lines)


def test_predict_with_contrastive_adaptation_tunes_a_copy_of_the_encoder(tiny_model, small_jsonl):
    before = (tiny_model / "model.safetensors").read_bytes()
    result = runner.invoke(app, ["predict", "--model", str(tiny_model), "--support", str(small_jsonl),
                                 "--text", "pizza example", "--strategy", "contrastive", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["label"] in {"weather", "music", "food", "travel"}
    assert (tiny_model / "model.safetensors").read_bytes() == before


def test_predict_takes_a_budget_for_contrastive_tuning_and_refuses_it_for_other_strategies(tiny_model, small_jsonl,
                                                                                          tmp_path):
    args = ["predict", "--model", str(tiny_model), "--support", str(small_jsonl), "--text", "pizza example", "--json"]
    result = runner.invoke(app, [*args, "--strategy", "contrastive", "--adapt-seconds", "0.5",
                                 "--adapt-top-layers", "1", "--adapt-batches", "nearest"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["label"] in {"weather", "music", "food", "travel"}
    refused = runner.invoke(app, [*args, "--adapt-seconds", "0.5"])  # a budget is for "contrastive" alone
    assert refused.exit_code != 0 and "only strategy 'contrastive'" in refused.output
    from metanlp.adaptation import AdaptBudget
    from metanlp.learners import load_learner
    from metanlp.tasks import strategy_learner

    tuned = strategy_learner(load_learner(tiny_model), "contrastive", AdaptBudget(seconds=0.5, top_layers=1))
    assert (tuned.budget.seconds, tuned.budget.top_layers) == (0.5, 1)
    assert strategy_learner(load_learner(tiny_model), "contrastive").budget == AdaptBudget()
    out = tmp_path / "scored.jsonl"
    texts = tmp_path / "texts.txt"
    texts.write_text("pizza example\nrain example\n")
    scored = runner.invoke(app, ["predict", "--model", str(tiny_model), "--support", str(small_jsonl), "--texts",
                                 str(texts), "--out", str(out), "--strategy", "contrastive", "--adapt-seconds", "0.5",
                                 "--quiet"])
    assert scored.exit_code == 0, scored.output
    assert len(out.read_text().strip().splitlines()) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "--data", "missing.jsonl"], "missing.jsonl: no such file"),
        (["evaluate", "--data", "default", "--shots", "one"], "--shots takes comma-separated integers"),
        (["evaluate", "--data", "default", "--methods", "protonet"], "method 'protonet' needs a model meta-trained"),
        (["evaluate", "--data", "default", "--methods", "magic"], "unknown method 'magic'"),
        (["evaluate", "--data", "default", "--split", "test"], "--split needs --model"),
        (["evaluate", "--data", "default", "--episodes", "2", "--shots", "25"], "need 30 examples per class"),
        (["train", "--episodes", "0"], "invalid parameter: episodes"),
        (["train", "--data", "other.jsonl"], "give the class split"),
        (["train", "--learner", "frozen", "--encoder", "tiny-random-bert"], "nothing to meta-train"),
        (["predict", "--model", ".", "--support", "x.csv"], "give --text or --texts"),
        (["predict", "--model", ".", "--support", "x.csv", "--text", "a", "--strategy", "magic"],
         "--strategy: unknown 'magic'"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_failed_training_writes_no_model(tmp_path):
    out = tmp_path / "model"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x", "domain": "d"}])
    result = runner.invoke(app, [*TINY_TRAIN, "--data", str(bad), "--train-domains", "d", "--val-domains", "e",
                                 "--test-domains", "f", "--out", str(out)])
    assert result.exit_code == 2
    assert not out.exists()


def test_evaluating_on_trained_classes_warns(tiny_model, tmp_path):
    result = runner.invoke(app, ["evaluate", "--model", str(tiny_model), "--data", "default", "--shots", "1",
                                 "--episodes", "2", "--out", str(tmp_path / "e.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "classes of" in result.output and "were meta-trained on" in result.output


@pytest.mark.parametrize("learner", ["maml", "fomaml", "anil", "metasgd", "reptile", "leopard", "lstm"])
def test_every_gradient_learner_trains_and_evaluates_from_the_cli(learner, tmp_path):
    out = tmp_path / learner
    extra = ["--adapt", "lora"] if learner == "maml" else []
    result = runner.invoke(app, [*TINY_TRAIN, "--learner", learner, "--tasks-per-step", "2", "--inner-steps", "2",
                                 *extra, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not out.with_name(out.name + ".checkpoint").exists()
    result = runner.invoke(app, ["evaluate", "--model", str(out), "--data", "default", "--split", "test", "--shots",
                                 "1", "--episodes", "2", "--methods", f"{learner},frozen", "--quiet",
                                 "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e.json").read_text())["settings"][0]["methods"][learner]["episodes"] == 2


def test_train_sets_the_supcon_weight_and_refuses_learner_options_a_kind_does_not_take(tmp_path):
    result = runner.invoke(app, [*TINY_TRAIN, "--episodes", "2", "--supcon", "0.5", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "learner.json").read_text())["learner"]["supcon"] == 0.5
    gradient = "maml, fomaml, anil, metasgd, reptile, leopard, lstm"
    for learner, option, takers in (("maml", "--supcon", "protonet"), ("protonet", "--inner-steps", gradient)):
        refused = runner.invoke(app, [*TINY_TRAIN, "--learner", learner, option, "2", "--out", str(tmp_path / "x")])
        assert refused.exit_code != 0
        assert f"{option} is for {takers}, not '{learner}'" in " ".join(refused.output.split())
        assert not (tmp_path / "x").exists()


def test_pretrain_mlm_then_smlmt_writes_an_encoder_that_train_accepts(tmp_path):
    out = tmp_path / "encoder"
    result = runner.invoke(app, ["pretrain", "--text", "default", "--out", str(out), "--mode", "mlm,smlmt",
                                 "--encoder", "tiny-random-bert", "--mlm-steps", "2", "--smlmt-episodes", "2",
                                 "--smlmt-words", "20", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "masked-LM loss" in result.output and "SMLMT: 20 cloze classes" in result.output, result.output
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    trained = runner.invoke(app, ["train", "--encoder", str(out), "--episodes", "2", "--val-every", "1",
                                  "--val-episodes", "2", "--out", str(tmp_path / "model"), "--quiet"])
    assert trained.exit_code == 0, trained.output


def test_pretrain_rejects_an_unknown_mode(tmp_path):
    result = runner.invoke(app, ["pretrain", "--text", "default", "--out", str(tmp_path / "e"), "--mode", "bert"])
    assert result.exit_code == 2 and "--mode" in result.output and not (tmp_path / "e").exists()


def test_pretrain_hybrid_mixes_supervised_episodes(tmp_path, small_jsonl):
    def pretrain(labelled: str, out: str):
        return runner.invoke(app, ["pretrain", "--text", "default", "--out", str(tmp_path / out), "--mode", "smlmt",
                                   "--encoder", "tiny-random-bert", "--smlmt-episodes", "2", "--smlmt-words", "20",
                                   "--labelled", labelled, "--smlmt-fraction", "0.5", "--quiet"])

    result = pretrain("default", "enc")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "enc" / "model.safetensors").exists()
    too_few = pretrain(str(small_jsonl), "enc2")  # 4 supervised classes cannot fill a 5-way episode
    assert too_few.exit_code == 2 and "need 5 other classes, found 4" in too_few.output
    assert not (tmp_path / "enc2").exists()


def test_pretrain_refuses_text_that_fails_validation(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(b"only \xff one line.\n")
    result = runner.invoke(app, ["pretrain", "--text", str(text), "--out", str(tmp_path / "enc"),
                                 "--encoder", "tiny-random-bert", "--quiet"])
    assert result.exit_code == 2 and "expect_column_values_to_be_in_set on 'utf8_valid'" in result.output
    assert "expect_table_row_count_to_be_between" in result.output and not (tmp_path / "enc").exists()


@pytest.mark.parametrize("command", [
    ["train", "--encoder", "tiny-random-bert", "--episodes", "1"],
    ["pretrain", "--text", "default", "--encoder", "tiny-random-bert", "--mlm-steps", "1"],
])
def test_out_never_replaces_a_folder_that_is_not_its_output(tmp_path, command):
    """A wrong --out (a thesis folder, a home folder) is refused before any work, and left as it was."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    result = runner.invoke(app, [*command, "--out", str(folder), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "not an output of this kind" in " ".join(result.output.split())
    assert sorted(p.name for p in folder.iterdir()) == ["chapter1.tex"]
    assert (folder / "chapter1.tex").read_text() == "years of work"
    if command[0] == "train":  # --force says the user means it
        forced = runner.invoke(app, [*command, "--out", str(folder), "--quiet", "--force", "--no-checkpoint",
                                     "--val-episodes", "2"])
        assert forced.exit_code == 0, forced.output
        assert (folder / "learner.json").is_file() and not (folder / "chapter1.tex").exists()


def test_every_option_has_help_and_choices_are_listed():
    import typer.main

    command = typer.main.get_command(app)
    missing = [f"{name} --{param.name}" for name, sub in command.commands.items() for param in sub.params
               if not getattr(param, "help", None)]
    assert missing == []
    train_help = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output
    assert "lora" in train_help and "metasgd" in train_help  # --adapt and --learner name their choices
    wrong = runner.invoke(app, ["train", "--adapt", "everything", "--out", "x"])
    assert wrong.exit_code == 2 and "everything" in wrong.output


def test_own_data_with_other_column_names(tiny_model, tmp_path):
    """A CSV whose columns are `utterance` and `intent` works once the columns are named."""
    import pandas as pd

    words = {"weather": "rain", "music": "song", "food": "pizza", "travel": "flight", "sport": "goal",
             "bank": "loan"}
    frame = pd.DataFrame([{"utterance": f"{word} example number {i}", "intent": label}
                          for label, word in words.items() for i in range(6)])
    frame.to_csv(tmp_path / "mine.csv", index=False)
    refused = runner.invoke(app, ["evaluate", "--data", str(tmp_path / "mine.csv"), "--model", str(tiny_model),
                                  "--shots", "1", "--episodes", "2", "--quiet", "--out", str(tmp_path / "r.json")])
    assert refused.exit_code != 0 and "no text column 'text'" in refused.output
    result = runner.invoke(app, ["evaluate", "--data", str(tmp_path / "mine.csv"), "--model", str(tiny_model),
                                 "--text-column", "utterance", "--label-column", "intent", "--shots", "1",
                                 "--episodes", "2", "--ways", "3", "--quiet", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    trained = runner.invoke(app, [*TINY_TRAIN, "--data", str(tmp_path / "mine.csv"), "--text-column", "utterance",
                                  "--label-column", "intent", "--split-by", "random", "--split-sizes", "2,2,2",
                                  "--ways", "2", "--shots", "2", "--queries", "2", "--out", str(tmp_path / "model")])
    assert trained.exit_code == 0, trained.output


def test_the_readme_python_snippet_runs_as_written(tiny_model, tmp_path, monkeypatch):
    """The README's snippet, on a model where it says (`artifacts/model`, here the tiny one)."""
    import re
    import shutil

    from conftest import REPO

    snippets = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert snippets, "the README has a Python snippet"
    shutil.copytree(tiny_model, tmp_path / "artifacts" / "model")
    monkeypatch.chdir(tmp_path)
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {})
