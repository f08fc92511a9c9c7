"""Model tests: distillation into a shallower student, and the student as a normal metanlp model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from metanlp.cli import app
from metanlp.config import DistilConfig
from metanlp.data.load import DataError
from metanlp.distillation import default_layers, distil, distillation_loss, hidden_state_loss, shrink
from metanlp.learners import build_learner, load_learner, save_learner
from metanlp.pretrain import unlabeled_sentences

runner = CliRunner()
TEXTS = [f"{verb} the {thing} {when}" for verb in ("water", "book", "cancel", "find", "play", "pay")
         for thing in ("roses", "flight", "song", "bill", "table") for when in ("today", "tomorrow", "soon")]


def test_every_other_layer_ends_with_the_top_one():
    assert default_layers(6) == [1, 3, 5] and default_layers(12) == [1, 3, 5, 7, 9, 11] and default_layers(2) == [1]


def test_the_loss_is_zero_for_the_teachers_embeddings_and_counts_similarities():
    teacher = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    assert float(distillation_loss(teacher, teacher, 1.0)) == pytest.approx(0.0, abs=1e-7)
    scaled = 2.0 * teacher  # same similarities, other embeddings: only the embedding term is left
    assert float(distillation_loss(scaled, teacher, 1.0)) == pytest.approx(1.0, rel=1e-5)
    assert float(distillation_loss(scaled, teacher, 5.0)) == pytest.approx(1.0, rel=1e-5)


def test_a_student_learns_the_teachers_embeddings_and_loads_and_predicts_as_a_model(tmp_path, tiny_encoder_config):
    teacher = build_learner("protonet", tiny_encoder_config)
    with torch.no_grad():  # larger layer weights than the random init's, so that dropping a layer shows
        for p in teacher.encoder.model.encoder.layer.parameters():
            p.mul_(3.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, summary = distil(teacher, TEXTS, DistilConfig(steps=40, lr=1e-3, batch_size=16), "cpu", False)
    assert summary["layers"] == [1] and student.encoder.model.config.num_hidden_layers == 1
    start = copy.deepcopy(teacher)
    shrink(start.encoder, [1])
    tokens = teacher.encoder.tokenize(TEXTS)
    wanted = teacher.encoder.embed(tokens)
    gap_before = float(distillation_loss(start.encoder.embed(tokens), wanted, 1.0))
    gap_after = float(distillation_loss(student.encoder.embed(tokens), wanted, 1.0))
    assert gap_after < 0.3 * gap_before, (gap_before, gap_after)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items()), "the teacher is unchanged"
    save_learner(student, tmp_path / "student")
    loaded = load_learner(tmp_path / "student")
    assert loaded.encoder.model.config.num_hidden_layers == 1 and loaded.config.kind == "protonet"
    support, labels = ["water the roses", "book a flight", "water the lawn", "book a table"], ["g", "t", "g", "t"]
    assert loaded.adapt(support, labels).predict(["water the tulips"]).labels[0] in {"g", "t"}
    # Same seed and texts: the same student.
    again, _ = distil(teacher, TEXTS, DistilConfig(steps=40, lr=1e-3, batch_size=16), "cpu", False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in student.state_dict().items())


def test_distil_command_writes_a_student_and_refuses_bad_layers(tmp_path, tiny_encoder_config):
    save_learner(build_learner("protonet", tiny_encoder_config), tmp_path / "teacher")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    result = runner.invoke(app, ["distil", "--teacher", str(tmp_path / "teacher"), "--text",
                                 str(tmp_path / "texts.txt"), "--steps", "3", "--batch-size", "8", "--layers", "0",
                                 "--hidden-weight", "0.5", "--per-text", "40",
                                 "--out", str(tmp_path / "student"), "--quiet"])
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "student" / "learner.json").read_text())["provenance"]["distilled"]
    assert recipe["layers"] == [0] and recipe["texts"] == 40 and recipe["per_text"] == 40
    assert recipe["config"]["hidden_weight"] == 0.5
    for layers, message in (("0,5", "the teacher has 2 layers"), ("1,0", "increasing order")):
        refused = runner.invoke(app, ["distil", "--teacher", str(tmp_path / "teacher"), "--text",
                                      str(tmp_path / "texts.txt"), "--layers", layers, "--steps", "2",
                                      "--out", str(tmp_path / "bad"), "--quiet"])
        assert refused.exit_code != 0 and message in refused.output, refused.output
        assert not (tmp_path / "bad").exists()
    with pytest.raises(DataError, match="at least 32 texts"):
        distil(build_learner("protonet", tiny_encoder_config), TEXTS[:5], DistilConfig(), "cpu", False)


def test_the_layer_state_term_pairs_each_kept_layer_with_the_teachers_layer_it_came_from():
    gen = torch.Generator().manual_seed(1)
    teacher = tuple(torch.randn(2, 3, 4, generator=gen) for _ in range(5))  # embeddings + 4 layers
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    student = (teacher[0], teacher[2], teacher[4])  # a 2-layer student copied from layers 1 and 3
    assert float(hidden_state_loss(student, teacher, [1, 3], mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(hidden_state_loss(student, teacher, [0, 3], mask)) > 0.1
    # By hand: the first layer off by 1 on every real coordinate, the second exact; padding never counts.
    shifted = (teacher[0], teacher[2] + 1.0 - 9.0 * (1 - mask).unsqueeze(-1), teacher[4])
    real = mask.unsqueeze(-1).float()
    by_hand = (real.sum() * 4 / ((teacher[2] ** 2) * real).sum()) / 2
    assert float(hidden_state_loss(shifted, teacher, [1, 3], mask)) == pytest.approx(float(by_hand), rel=1e-5)


def test_layer_states_pool_to_the_encoders_own_embeddings(tiny_encoder_config):
    encoder = build_learner("protonet", tiny_encoder_config).encoder.eval()
    batch = encoder.tokenize(TEXTS[:4]).batch([0, 1, 2, 3])
    pooled, states = encoder.with_layer_states(batch)
    assert torch.equal(pooled, encoder(batch)) and len(states) == encoder.model.config.num_hidden_layers + 1
    assert encoder.with_layer_states(batch, False)[1] is None


def test_the_layer_state_term_brings_the_kept_layers_closer_to_the_teachers(tiny_encoder_config):
    teacher = build_learner("protonet", tiny_encoder_config)
    with torch.no_grad():
        for p in teacher.encoder.model.encoder.layer.parameters():
            p.mul_(3.0)
    batch = teacher.encoder.tokenize(TEXTS).batch(list(range(len(TEXTS))))
    _, wanted = teacher.encoder.eval().with_layer_states(batch)

    def gap(hidden_weight: float) -> float:
        config = DistilConfig(steps=30, lr=1e-3, batch_size=16, hidden_weight=hidden_weight)
        student, _ = distil(teacher, TEXTS, config, "cpu", False)
        with torch.no_grad():
            return float(hidden_state_loss(student.encoder.with_layer_states(batch)[1], wanted, [1],
                                           batch.attention_mask))

    assert gap(1.0) < gap(0.0)


def test_a_cap_per_text_source_samples_each_large_source_alike_and_in_order(tmp_path):
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("\n".join(f"big sentence number {i}." for i in range(100)))
    small.write_text("\n".join(f"small sentence number {i}." for i in range(5)))
    everything = unlabeled_sentences([str(big), str(small)])
    assert len(everything) == 105
    capped = unlabeled_sentences([str(big), str(small)], per_source=10, seed=3)
    assert len(capped) == 15 and capped[10:] == everything[100:]
    numbers = [int(s.split()[-1].rstrip(".")) for s in capped[:10]]
    assert numbers == sorted(numbers) and set(capped) < set(everything)
    assert unlabeled_sentences([str(big), str(small)], per_source=10, seed=3) == capped
    assert unlabeled_sentences([str(big), str(small)], per_source=10, seed=4) != capped
