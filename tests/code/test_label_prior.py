"""Code tests: learned label base rates (ProtoNet's `label_prior`). The rates are each label name's centred log
count over the training tasks; they are added, times the weight, to a new task's logits of the classes of those
names; off by default (and then not written); kept through save/load and transductive refinement; a model
missing its rates is refused with the file's name."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import review_pool_train_args
from metanlp.cli import app
from metanlp.config import ProtoNetConfig
from metanlp.data.load import DataError, LabelledTexts
from metanlp.data.pool import label_base_rates
from metanlp.learners import build_learner, load_learner, save_learner

SUPPORT = ["great blender", "love this kettle", "broke in a week", "returned it"]
LABELS = ["positive", "positive", "negative", "negative"]
QUERIES = ["works fine", "stopped working", "very happy", "waste of money"]


def rows(counts: dict[str, int]) -> list[str]:
    return [label for label, n in counts.items() for _ in range(n)]


def test_base_rates_are_centred_log_counts_averaged_over_tasks():
    labels = rows({"a::positive": 30, "a::negative": 10}) + rows({"b::positive": 20, "b::negative": 20,
                                                                  "b::neutral": 5})
    rates = label_base_rates(LabelledTexts([""] * len(labels), labels))
    b_centre = (2 * math.log(20) + math.log(5)) / 3
    assert rates["positive"] == pytest.approx((math.log(3) / 2 + math.log(20) - b_centre) / 2)
    assert rates["negative"] == pytest.approx((-math.log(3) / 2 + math.log(20) - b_centre) / 2)
    assert rates["neutral"] == pytest.approx(math.log(5) - b_centre)
    plain = label_base_rates(LabelledTexts([""] * 6, ["x", "x", "y", "y", "z", "z"]))  # one task, balanced
    assert plain == {"x": 0.0, "y": 0.0, "z": 0.0}


@pytest.fixture
def encoder(tiny_encoder_config):
    from metanlp.encoder import TextEncoder

    return TextEncoder.from_config(tiny_encoder_config)


def with_rates(encoder, weight: float, rates: dict[str, float]):
    learner = build_learner(ProtoNetConfig(label_prior=weight), encoder).eval()
    learner.label_rates = rates
    return learner


def logits(learner, labels=LABELS) -> np.ndarray:
    return np.log(learner.adapt(SUPPORT, labels).predict(QUERIES).scores)


def test_the_rates_are_added_to_the_logits_of_the_classes_they_name(encoder):
    plain = with_rates(encoder, 0.0, {"positive": 0.5, "negative": -0.5})
    weighted = with_rates(encoder, 2.0, {"positive": 0.5, "negative": -0.5})
    shift = logits(weighted) - logits(plain)  # classes sorted: negative, positive; log-softmax keeps differences
    assert np.allclose(shift[:, 1] - shift[:, 0], 2.0 * (0.5 - (-0.5)), atol=1e-5)
    other = ["joy", "joy", "anger", "anger"]  # no name met in training: the prototypes alone
    assert np.allclose(logits(weighted, other), logits(plain, other), atol=1e-6)
    half = ["positive", "positive", "anger", "anger"]  # an unmet name counts as an average class (0)
    shift = logits(weighted, half) - logits(plain, half)  # classes: anger, positive
    assert np.allclose(shift[:, 1] - shift[:, 0], 1.0, atol=1e-5)


def test_off_by_default_and_not_written(encoder, tmp_path):
    assert ProtoNetConfig().label_prior == 0
    learner = build_learner(ProtoNetConfig(), encoder)
    learner.learn_from_training_rows(LabelledTexts(["a", "b", "c"], ["x", "x", "y"]))
    assert learner.label_rates == {}
    save_learner(learner, tmp_path / "m")
    assert "label_prior" not in (tmp_path / "m" / "learner.json").read_text()  # earlier models' bytes kept
    assert not (tmp_path / "m" / "label_prior.json").exists()


def test_rates_survive_save_and_load_and_a_model_without_them_is_refused(encoder, tmp_path):
    learner = with_rates(encoder, 1.0, {"positive": 0.7, "negative": -0.7})
    save_learner(learner, tmp_path / "m")
    loaded = load_learner(tmp_path / "m")
    assert loaded.label_rates == {"positive": 0.7, "negative": -0.7}
    assert np.allclose(logits(loaded), logits(learner), atol=1e-6)
    from metanlp.stages.register import model_digest  # the registry tells models apart by their rates too

    digest = model_digest(tmp_path / "m")
    (tmp_path / "m" / "label_prior.json").write_text(json.dumps({"positive": 0.1, "negative": -0.1}))
    assert model_digest(tmp_path / "m") != digest
    (tmp_path / "m" / "label_prior.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="label_prior.json: not a mapping"):
        load_learner(tmp_path / "m")
    (tmp_path / "m" / "label_prior.json").unlink()
    with pytest.raises(DataError, match="label_prior.json: the model's label_prior needs"):
        load_learner(tmp_path / "m")


def test_transductive_refinement_keeps_the_rates(encoder):
    from metanlp.adaptation import AdaptBudget, DomainAdaptedLearner

    budget = AdaptBudget(transductive_check=False, transductive_proportion_rows=0)
    lean = with_rates(encoder, 1.0, {"positive": 40.0, "negative": -40.0})  # overwhelms any tiny-encoder margin
    predicted = DomainAdaptedLearner(lean, ["transductive"], budget).adapt(SUPPORT, LABELS).predict(QUERIES)
    assert predicted.labels == ["positive"] * len(QUERIES)
    off = with_rates(encoder, 0.0, {"positive": 40.0, "negative": -40.0})
    plain = DomainAdaptedLearner(off, ["transductive"], budget).adapt(SUPPORT, LABELS).predict(QUERIES)
    assert not np.allclose(predicted.scores, plain.scores)


def test_train_learns_the_rates_of_its_pool_and_other_learners_refuse_the_option(tmp_path):
    args = review_pool_train_args(tmp_path, {"toys": {"positive": 9, "negative": 3},  # 3:1 and 1:1 positive
                                             "books": {"positive": 6, "negative": 6}})
    result = CliRunner().invoke(app, [*args, "--label-prior", "1", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    rates = json.loads((tmp_path / "m" / "label_prior.json").read_text())
    assert rates["positive"] == pytest.approx(math.log(3) / 4) and rates["negative"] == pytest.approx(-math.log(3) / 4)
    assert json.loads((tmp_path / "m" / "learner.json").read_text())["learner"]["label_prior"] == 1.0
    refused = CliRunner().invoke(app, [*args, "--learner", "maml", "--label-prior", "1", "--out", str(tmp_path / "x")])
    assert refused.exit_code != 0 and "--label-prior is for protonet, not 'maml'" in " ".join(refused.output.split())
    assert not (tmp_path / "x").exists()
