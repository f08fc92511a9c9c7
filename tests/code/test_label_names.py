"""Code tests: label semantics in ProtoNet's prototypes. A label that is a name counts, embedded, as
`label_names` support examples; ids fall back to the examples alone; it is off unless asked; zero-shot works
from the names and refuses ids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metanlp.config import FrozenConfig, ProtoNetConfig
from metanlp.learners import build_learner
from metanlp.learners.protonet import label_text, leave_one_out_loss

SUPPORT = ["water the ferns", "when to water roses", "aphids on my kale", "slugs ate the lettuce",
           "prune the apple tree", "cut back the hedge"]


@pytest.fixture(scope="module")
def encoder(tiny_encoder_config):
    from metanlp.encoder import TextEncoder

    return TextEncoder.from_config(tiny_encoder_config)


def protos(learner, labels):
    return learner.adapt(SUPPORT, labels).state["prototypes"]


@pytest.mark.parametrize(("label", "text"), [
    ("card_arrival", "card arrival"), ("joy", "joy"), ("snips::PlayMusic", "PlayMusic"),
    ("book-a.table", "book a table"), ("0", None), ("17", None), ("t4", None), ("__", None), ("arsc/t2::1", None)])
def test_label_text_reads_names_and_refuses_ids(label, text):
    assert label_text(label) == text


def test_off_by_default_and_ids_fall_back_to_the_examples(encoder):
    assert ProtoNetConfig().label_names == 0 and FrozenConfig().label_names == 0
    plain = build_learner(FrozenConfig(), encoder)
    named = build_learner(FrozenConfig(label_names=2.0), encoder)
    ids = ["0", "0", "1", "1", "2", "2"]
    assert torch.equal(protos(plain, ids), protos(named, ids))
    names = ["a_watering", "a_watering", "b_pests", "b_pests", "c_pruning", "c_pruning"]  # sorted as the ids
    assert not torch.allclose(protos(plain, names), protos(named, names))
    assert torch.equal(protos(plain, names), protos(plain, ids))  # off: the names change nothing


def test_a_named_prototype_is_the_weighted_mean_with_its_embedded_name(encoder):
    learner = build_learner(FrozenConfig(label_names=3.0), encoder)
    labels = ["water_plants", "water_plants", "17", "17", "pruning", "pruning"]
    got = protos(learner, labels)
    embedded = encoder.embed(encoder.tokenize(SUPPORT))
    norm = embedded.norm(dim=-1).mean()
    classes = ["17", "pruning", "water_plants"]  # sorted, as the classifier orders them
    assert learner.adapt(SUPPORT, labels).classes == classes
    for i, label in enumerate(classes):
        rows = [j for j, lab in enumerate(labels) if lab == label]
        mean = embedded[rows].mean(dim=0)
        if label == "17":
            expected = mean
        else:
            name = F.normalize(encoder.embed(encoder.tokenize([label_text(label)]))[0], dim=0) * norm
            expected = (len(rows) * mean + 3.0 * name) / (len(rows) + 3.0)
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-6)


def test_zero_shot_uses_the_names_alone_and_refuses_ids(encoder):
    learner = build_learner(ProtoNetConfig(), encoder)
    classifier = learner.zero_shot(["water_plants", "pruning"])
    names = F.normalize(encoder.embed(encoder.tokenize(["water plants", "pruning"])), dim=-1)
    torch.testing.assert_close(classifier.state["prototypes"], names)
    assert set(classifier.predict(["water the ferns"]).labels) <= {"water_plants", "pruning"}
    with pytest.raises(ValueError, match=r"zero-shot needs label names; \['0'\] are ids"):
        learner.zero_shot(["0", "pruning"])


def hand_leave_one_out(embedded, targets, extra, extra_weight, scale):
    losses = []
    for i in range(len(embedded)):
        protos = []
        for c in range(len(extra)):
            rows = [j for j in range(len(embedded)) if targets[j] == c and j != i]
            if not rows and c == targets[i]:
                break  # row i is alone in its class: nothing to leave it out of
            total = sum((embedded[j] for j in rows), torch.zeros(2)) + extra_weight[c] * extra[c]
            protos.append(total / (len(rows) + extra_weight[c]))
        else:
            cosines = torch.stack([F.cosine_similarity(embedded[i], p, dim=0) for p in protos])
            losses.append(-torch.log_softmax(scale * cosines, dim=0)[targets[i]])
    return float(torch.stack(losses).mean())


def test_leave_one_out_loss_equals_a_hand_computation():
    embedded = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.2]])
    targets = torch.tensor([0, 0, 1, 1, 2])
    extra = torch.tensor([[0.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])  # classes 1 and 2 hold a name beside their rows
    scale = torch.tensor(7.0)
    # class 2's one row is skipped with or without its name: every weight is scored on the same rows
    for extra_weight in (torch.tensor([0.0, 1.5, 0.5]), torch.tensor([0.0, 1.5, 0.0])):
        expected = hand_leave_one_out(embedded, targets, extra, extra_weight, scale)
        got = leave_one_out_loss(embedded, targets, 3, extra, extra_weight, "cosine", scale)
        assert got == pytest.approx(expected, rel=1e-5)


def test_auto_counts_names_that_help_the_support_and_drops_names_that_mislead(encoder):
    learner = build_learner(FrozenConfig(label_names="auto"), encoder)
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.arange(3).repeat_interleave(4)
    support = centres[targets] + 0.6 * torch.randn(12, 3, generator=generator)
    named, norm = [0, 1, 2], support.norm(dim=-1).mean()  # names weigh as long as the rows, as in `adapt`
    assert learner.chosen_name_weight(support, targets, 3, named, centres * norm) == 8  # at the true centres
    assert learner.chosen_name_weight(support, targets, 3, named, -centres * norm) == 0  # pointing away from them
    one_shot = torch.arange(3)  # nothing to leave out: examples alone, not a guess
    assert learner.chosen_name_weight(support[[0, 4, 8]], one_shot, 3, named, centres * norm) == 0


def test_auto_is_one_of_the_fixed_weights_and_ids_fall_back_to_the_examples(encoder):
    from metanlp.learners.protonet import LABEL_NAME_WEIGHTS

    auto = build_learner(FrozenConfig(label_names="auto"), encoder)
    ids = ["0", "0", "1", "1", "2", "2"]
    assert torch.equal(protos(auto, ids), protos(build_learner(FrozenConfig(), encoder), ids))
    names = ["watering", "watering", "pests", "pests", "pruning", "pruning"]
    fixed = [protos(build_learner(FrozenConfig(label_names=w), encoder), names) for w in LABEL_NAME_WEIGHTS]
    assert any(torch.allclose(protos(auto, names), p, atol=1e-6) for p in fixed)


def test_label_names_takes_a_weight_or_auto_and_the_memory_learner_a_weight():
    from pydantic import ValidationError

    from metanlp.config import MemoryConfig

    assert ProtoNetConfig(label_names="auto").label_names == "auto"
    for wrong in ("sometimes", -1.0):
        with pytest.raises(ValidationError):
            ProtoNetConfig(label_names=wrong)
    with pytest.raises(ValidationError):
        MemoryConfig(label_names="auto")
