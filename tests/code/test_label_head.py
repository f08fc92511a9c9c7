"""Code tests: the label head (ProtoNet's `label_head`). A multinomial logistic regression of the training rows'
label names on their unit embeddings, fitted after meta-training; its logits, times the weight, are added to a new
task's logits of the classes it names (0 for a name it never met); off by default (and then not written); kept
through save/load and transductive refinement; a damaged head is refused with the file's name; `metanlp train
--label-head` and `benchmarks/label_head.py` on a saved model give the same head."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import review_pool_train_args
from metanlp.cli import app
from metanlp.config import ProtoNetConfig
from metanlp.data.load import DataError, LabelledTexts
from metanlp.learners import build_learner, load_learner, save_learner
from metanlp.learners.logreg import fit_logistic_regression
from metanlp.learners.protonet import LABEL_HEAD_FILE, LabelHead

SUPPORT = ["great blender", "love this kettle", "broke in a week", "returned it"]
LABELS = ["positive", "positive", "negative", "negative"]
QUERIES = ["works fine", "stopped working", "very happy", "waste of money"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def encoder(tiny_encoder_config):
    from metanlp.encoder import TextEncoder

    return TextEncoder.from_config(tiny_encoder_config)


def test_the_head_is_a_logistic_regression_of_the_names_on_unit_embeddings():
    generator = torch.Generator().manual_seed(0)
    embedded = torch.randn(40, 8, generator=generator) * 3
    names = ["neutral" if row[0] > 1 else "positive" if row[1] > 0 else "negative" for row in embedded]
    head = LabelHead.fit(embedded, names)
    assert head.names == ("negative", "neutral", "positive")  # sorted
    targets = torch.tensor([head.names.index(n) for n in names])
    weight, bias = fit_logistic_regression(F.normalize(embedded, dim=-1), targets, 3, C=1.0, max_iter=500)
    assert torch.allclose(head.weight, weight) and torch.allclose(head.bias, bias)
    scores = head.logits(embedded, list(head.names))
    assert (scores.argmax(dim=1) == targets).float().mean() > 0.8  # it learned the names it was given
    with pytest.raises(DataError, match="at least two label names"):  # one name: nothing to tell apart
        LabelHead.fit(embedded, ["positive"] * 40)


def test_the_head_logits_are_added_to_the_classes_it_names(encoder):
    weight = torch.randn(2, encoder.dim, generator=torch.Generator().manual_seed(0))
    head = LabelHead(("negative", "positive"), weight, torch.tensor([-0.3, 0.3]))
    plain = build_learner(ProtoNetConfig(), encoder).eval()
    weighted = build_learner(ProtoNetConfig(label_head=2.0), encoder).eval()
    weighted.label_head = head

    def logits(learner, labels=LABELS) -> np.ndarray:
        return np.log(learner.adapt(SUPPORT, labels).predict(QUERIES).scores)

    embedded = encoder.embed(encoder.tokenize(QUERIES))
    expected = 2.0 * head.logits(embedded, ["negative", "positive"]).numpy()
    shift = logits(weighted) - logits(plain)  # log-softmax keeps differences between classes
    assert np.allclose(shift[:, 1] - shift[:, 0], expected[:, 1] - expected[:, 0], atol=1e-4)
    other = ["joy", "joy", "anger", "anger"]  # no name met in training: the prototypes alone
    assert np.allclose(logits(weighted, other), logits(plain, other), atol=1e-6)
    half = ["positive", "positive", "anger", "anger"]  # an unmet name adds 0
    shift = logits(weighted, half) - logits(plain, half)  # classes: anger, positive
    assert np.allclose(shift[:, 1] - shift[:, 0], expected[:, 1], atol=1e-4)


def test_off_by_default_and_not_written(encoder, tmp_path):
    assert ProtoNetConfig().label_head == 0
    learner = build_learner(ProtoNetConfig(), encoder)
    learner.learn_from_training_rows(LabelledTexts(["a", "b", "c"], ["x", "x", "y"]))
    assert learner.label_head is None
    save_learner(learner, tmp_path / "m")
    assert "label_head" not in (tmp_path / "m" / "learner.json").read_text()  # earlier models' bytes kept
    assert not (tmp_path / "m" / LABEL_HEAD_FILE).exists()


def test_the_head_survives_save_and_load_and_a_damaged_one_is_refused(encoder, tmp_path):
    learner = build_learner(ProtoNetConfig(label_head=1.0), encoder).eval()
    learner.learn_from_training_rows(LabelledTexts(SUPPORT + QUERIES, LABELS + ["positive", "negative"] * 2))
    save_learner(learner, tmp_path / "m")
    loaded = load_learner(tmp_path / "m")
    assert loaded.label_head.names == ("negative", "positive")
    assert torch.equal(loaded.label_head.weight, learner.label_head.weight)
    assert np.allclose(loaded.adapt(SUPPORT, LABELS).predict(QUERIES).scores,
                       learner.adapt(SUPPORT, LABELS).predict(QUERIES).scores, atol=1e-6)
    from metanlp.stages.register import model_digest  # the registry tells models apart by their heads too

    path = tmp_path / "m" / LABEL_HEAD_FILE
    digest, tensors = model_digest(tmp_path / "m"), load_file(str(path))
    save_file({"weight": tensors["weight"] * 2, "bias": tensors["bias"]}, str(path),
              metadata={"names": json.dumps(["negative", "positive"])})
    assert model_digest(tmp_path / "m") != digest
    save_file({"weight": tensors["weight"][:, :3].contiguous(), "bias": tensors["bias"]}, str(path),
              metadata={"names": json.dumps(["negative", "positive"])})
    with pytest.raises(DataError, match=f"{LABEL_HEAD_FILE}: not a label head of {encoder.dim}-dimensional"):
        load_learner(tmp_path / "m")
    path.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=f"{LABEL_HEAD_FILE}: the model's label_head needs its label head"):
        load_learner(tmp_path / "m")
    path.unlink()
    with pytest.raises(DataError, match=f"{LABEL_HEAD_FILE}: the model's label_head needs its label head"):
        load_learner(tmp_path / "m")


def test_transductive_refinement_keeps_the_head(encoder):
    from metanlp.adaptation import AdaptBudget, DomainAdaptedLearner

    budget = AdaptBudget(transductive_check=False, transductive_proportion_rows=0)
    learner = build_learner(ProtoNetConfig(label_head=1.0), encoder).eval()
    learner.label_head = LabelHead(("negative", "positive"), torch.zeros(2, encoder.dim), torch.tensor([-40.0, 40.0]))
    predicted = DomainAdaptedLearner(learner, ["transductive"], budget).adapt(SUPPORT, LABELS).predict(QUERIES)
    assert predicted.labels == ["positive"] * len(QUERIES)  # the head's bias overwhelms any tiny-encoder margin


def test_train_fits_the_head_and_the_script_gives_a_saved_model_the_same(tmp_path):
    args = review_pool_train_args(tmp_path, {task: {"positive": 6, "negative": 6} for task in ("toys", "books")})
    result = CliRunner().invoke(app, [*args, "--label-head", "2", "--out", str(tmp_path / "with_head")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "with_head" / "learner.json").read_text())["learner"]["label_head"] == 2.0
    trained = load_learner(tmp_path / "with_head").label_head
    assert trained.names == ("negative", "positive")
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    script = [sys.executable, str(ROOT / "benchmarks" / "label_head.py"), "--pool", str(tmp_path / "pool.yaml"),
              "--weight", "2"]
    subprocess.run([*script, "--model", str(tmp_path / "plain"), "--out", str(tmp_path / "added")], check=True)
    added = load_learner(tmp_path / "added")
    assert added.config == load_learner(tmp_path / "with_head").config
    assert torch.allclose(added.label_head.weight, trained.weight) and torch.allclose(added.label_head.bias,
                                                                                      trained.bias)
    refused = subprocess.run([*script, "--model", str(tmp_path / "added"), "--weight", "0", "--out",
                              str(tmp_path / "x")], capture_output=True, text=True)
    assert refused.returncode != 0 and "--weight must be above 0" in refused.stderr and not (tmp_path / "x").exists()
