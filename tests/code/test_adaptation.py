"""Domain adaptation from the support set: fusion endpoints, budgets, no access to queries, the CLI."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from metanlp.adaptation import AdaptBudget, domain_adapt, fuse, held_out_split
from metanlp.cli import app
from metanlp.learners import build_learner, load_learner
from metanlp.learners.base import support_targets

runner = CliRunner()


@pytest.fixture
def learner(tiny_encoder_config):
    return build_learner("protonet", tiny_encoder_config)


def support_of(corpus, classes=4, shots=3):
    by_class = corpus.indices_by_class()
    rows = [i for c in list(by_class)[:classes] for i in by_class[c][:shots]]
    return [corpus.texts[i] for i in rows], [corpus.labels[i] for i in rows]


def test_fusion_endpoints_are_the_two_models():
    start = {"w": torch.zeros(3), "n": torch.tensor([1, 2])}
    tuned = {"w": torch.ones(3), "n": torch.tensor([5, 6])}
    assert torch.equal(fuse(start, tuned, 0.0)["w"], start["w"])
    assert torch.equal(fuse(start, tuned, 1.0)["w"], tuned["w"])
    assert torch.equal(fuse(start, tuned, 0.5)["n"], start["n"])  # integer buffers are not averaged


def test_held_out_split_keeps_one_shot_per_class():
    fit, held = held_out_split(np.array([0, 0, 0, 1, 1, 1]), seed=0)
    assert sorted(np.array([0, 0, 0, 1, 1, 1])[held]) == [0, 1] and len(fit) == 4
    # a class with a single shot trains with it and is not scored; the others still hold one out
    fit, held = held_out_split(np.array([0, 1, 1]), seed=0)
    assert 0 in fit and len(fit) == 2 and len(held) == 1 and held[0] in (1, 2)
    assert held_out_split(np.array([0, 1, 2]), seed=0) is None  # one shot of every class: nothing to hold out


def test_finetune_respects_the_step_budget_and_leaves_the_learner_alone(learner, corpus):
    texts, labels = support_of(corpus)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    adapted, report = domain_adapt(learner, texts, labels, strategies=["finetune", "fused"],
                                   budget=AdaptBudget(finetune_steps=4, lr=1e-3))
    assert report.finetune_steps <= 4 and report.fusion in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in before.items())
    assert adapted is not learner


def test_seconds_budget_stops_fine_tuning(learner, corpus):
    texts, labels = support_of(corpus)
    _, report = domain_adapt(learner, texts, labels, strategies=["finetune"],
                             budget=AdaptBudget(finetune_steps=500, seconds=1e-9, lr=1e-3))
    assert report.finetune_steps <= 1  # the held-out pass stopped after its first step


def test_the_seconds_cap_holds_for_each_strategy_as_a_whole(learner, corpus):
    """Choosing the steps and the final pass share one cap (it once held per pass: 156 s against 90 s)."""
    texts, labels = support_of(corpus)
    _, report = domain_adapt(learner, texts, labels, strategies=["selfsup", "finetune"],
                             budget=AdaptBudget(finetune_steps=100_000, selfsup_steps=100_000, seconds=2.0, lr=1e-3))
    # per pass, fine-tuning took twice the cap (4 s and more); the margin is for one step and set-up on a busy CI
    assert report.seconds["finetune"] < 3.5 and report.seconds["selfsup"] < 3.5
    assert 0 < report.selfsup_steps < 100_000


def test_prototypes_strategy_changes_nothing(learner, corpus):
    texts, labels = support_of(corpus)
    adapted, _ = domain_adapt(learner, texts, labels, strategies=["prototypes"])
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in adapted.state_dict().items())


def test_selfsup_uses_unlabeled_text(learner, corpus):
    texts, labels = support_of(corpus)
    adapted, report = domain_adapt(learner, texts, labels, unlabeled=corpus.texts[100:200], strategies=["selfsup"],
                                   budget=AdaptBudget(selfsup_steps=2, lr=1e-3))
    assert report.selfsup_steps == 2
    assert any(not torch.equal(v, learner.state_dict()[k]) for k, v in adapted.state_dict().items())


def test_unknown_strategy_is_named(learner, corpus):
    with pytest.raises(ValueError, match="unknown adaptation strategy"):
        domain_adapt(learner, *support_of(corpus), strategies=["magic"])


def test_adapt_cli_writes_a_model_predict_can_use(tmp_path, learner, corpus):
    from conftest import write_jsonl
    from metanlp.learners import save_learner

    save_learner(learner, tmp_path / "model")
    texts, labels = support_of(corpus)
    rows = [{"text": t, "label": lab} for t, lab in zip(texts, labels, strict=True)]
    support = write_jsonl(tmp_path / "support.jsonl", rows)
    result = runner.invoke(app, ["adapt", "--model", str(tmp_path / "model"), "--support", str(support),
                                 "--strategy", "finetune,fused", "--steps", "3", "--out", str(tmp_path / "adapted")])
    assert result.exit_code == 0, result.output
    adapted = load_learner(tmp_path / "adapted")
    assert adapted.provenance.adapted["strategies"] == ["finetune", "fused"]
    predicted = runner.invoke(app, ["predict", "--model", str(tmp_path / "adapted"), "--support", str(support),
                                    "--text", texts[0], "--json"])
    assert predicted.exit_code == 0 and labels[0] in predicted.output


def test_adaptation_never_reads_query_labels(learner, corpus):
    """Shuffling the queries' labels changes the score, never the predictions."""
    from metanlp.adaptation import DomainAdaptedLearner
    from metanlp.data.episodes import EpisodeSampler

    method = DomainAdaptedLearner(learner, ["finetune", "fused"], AdaptBudget(finetune_steps=3, lr=1e-3))
    tokens = learner.encoder.tokenize(corpus.texts)
    episode = EpisodeSampler(corpus, 3, 3, 4, seed=2).sample()
    shuffled = np.random.default_rng(0).permutation(episode.query_labels)
    predictions = []
    for query_labels in (episode.query_labels, shuffled):
        torch.manual_seed(0)
        labels = [episode.classes[i] for i in episode.support_labels]
        classifier = method.adapt(tokens.subset(episode.support), labels)
        predictions.append(classifier.predict(tokens.subset(episode.query)).labels)
        assert len(query_labels) == len(predictions[-1])
    assert predictions[0] == predictions[1]


def test_evaluate_compares_adaptation_strategies_on_the_same_episodes(tmp_path, learner):
    import json

    from metanlp.learners import save_learner

    save_learner(learner, tmp_path / "model")
    result = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "model"), "--data", "default", "--shots", "2",
                                 "--episodes", "2", "--methods", "protonet,frozen", "--adapt", "finetune,fused",
                                 "--adapt", "prototypes", "--out", str(tmp_path / "e.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    methods = json.loads((tmp_path / "e.json").read_text())["settings"][0]["methods"]
    assert set(methods) == {"protonet", "frozen", "protonet+finetune+fused", "protonet+prototypes"}
    assert methods["protonet+prototypes"]["per_episode"] == methods["protonet"]["per_episode"]


def test_contrastive_respects_its_step_and_seconds_budgets_and_leaves_the_learner_alone(learner, corpus):
    texts, labels = support_of(corpus, classes=4, shots=4)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    budget = AdaptBudget(contrastive_steps=6, contrastive_every=2, lr=1e-3, batch_size=8)
    adapted, report = domain_adapt(learner, texts, labels, strategies=["contrastive"], budget=budget)
    assert report.contrastive_steps in (0, 2, 4, 6) and report.finetune_steps is None
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in before.items())
    if report.contrastive_steps:
        assert any(not torch.equal(v, before[k]) for k, v in adapted.state_dict().items())
    _, timed = domain_adapt(learner, texts, labels, strategies=["contrastive"],
                            budget=AdaptBudget(contrastive_steps=100_000, seconds=1.0, lr=1e-3, batch_size=8))
    # The budget is checked between steps: it overshoots by about one step and the final pass, which a loaded
    # machine stretches (2.5 s was exceeded with CI beside a distillation run); unbounded steps would take hours.
    assert timed.seconds["contrastive"] < 6.0 and timed.contrastive_steps < 100_000


@pytest.mark.parametrize("refit", [True, False])
def test_slow_held_out_checks_stay_inside_the_seconds_cap(learner, corpus, refit):
    """Each held-out check of the start and of the tuned weights embeds every support row: on 1,810 texts it
    took seconds, and once ran after the cap (COVID, 126 s against 90). The start's loss is now taken inside the
    cap and the last step leaves time for one more check."""
    from metanlp.adaptation import _Tuner

    class SlowChecks(_Tuner):  # our own tuner with a check as slow, relative to its steps, as on a large support
        def loss(self, *args):
            time.sleep(0.4)
            return super().loss(*args)

    texts, labels = support_of(corpus, classes=4, shots=4)
    targets = support_targets(labels)[1]
    budget = AdaptBudget(lr=1e-3, batch_size=8, seconds=2.0, refit=refit)
    tuner = SlowChecks(learner, learner.encoder.tokenize(texts), targets, 4, budget, "contrastive")
    started = time.perf_counter()
    _, steps, _ = tuner.choose_and_train(100_000, started, score_every=3)
    # before stop 34 one check ran past the cap (2.9 s with refit off); the margin is one tiny step on a loaded CI
    assert time.perf_counter() - started < budget.seconds + 0.3
    assert steps < 100_000


def test_a_class_with_one_shot_does_not_stop_the_tuning_of_the_others(learner, corpus):
    """Real label spaces have rare classes (ATIS: 4 of 21 intents with fewer than 5 training rows, some with one):
    before stop 39 a single one-shot class left the whole support untuned."""
    from metanlp.adaptation import _Tuner

    class Recording(_Tuner):
        def train(self, rows, steps, **kwargs):
            result = super().train(rows, steps, **kwargs)
            self.runs.append((rows.tolist(), result[3]))
            return result

    texts, labels = support_of(corpus, classes=4, shots=4)
    texts, labels = texts[:13], labels[:13]  # the fourth class keeps a single shot, row 12
    targets = support_targets(labels)[1]
    tuner = Recording(learner, learner.encoder.tokenize(texts), targets, 4,
                      AdaptBudget(lr=1e-3, batch_size=8, seconds=60.0), "contrastive")
    tuner.runs = []
    tuner.choose_and_train(6, time.perf_counter(), score_every=2, one_shot_steps=0)
    [(rows, steps)] = tuner.runs  # one pass: the steps are chosen on the held-out shots of the three other classes
    assert 12 in rows and len(rows) == 10 and steps == 6


def test_contrastive_batches_hold_several_rows_of_few_classes(learner, corpus):
    """Every anchor needs a positive: a batch takes a few classes with up to 4 rows each, not 8 random rows."""
    from metanlp.adaptation import _Tuner

    texts, labels = support_of(corpus, classes=4, shots=4)
    targets = support_targets(labels)[1]
    tuner = _Tuner(learner, learner.encoder.tokenize(texts), targets, 4, AdaptBudget(batch_size=8), "contrastive")
    rows = np.arange(len(texts))
    batch = tuner.batch(rows, tuner.class_groups(rows), np.random.default_rng(0))
    assert len(batch) == 8 and sorted(np.bincount(targets[batch].numpy()).tolist()) == [0, 0, 4, 4]


def test_contrastive_batches_take_a_class_and_the_classes_nearest_it(learner, corpus):
    """Hard negatives: the classes nearest a class under the starting weights share its batches (`nearest`);
    `random`, the default, mixes classes at random; another value is refused by name."""
    from metanlp.adaptation import _Tuner
    from metanlp.data.load import DataError

    class Placed(_Tuner):  # our own tuner whose starting embeddings put classes 2k and 2k + 1 side by side
        def embed(self, weights, rows):
            classes = self.targets[torch.as_tensor(rows)].float()
            angle = (classes // 2) * 0.7 + (classes % 2) * 0.05
            return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)

    texts, labels = support_of(corpus, classes=8, shots=4)
    targets = support_targets(labels)[1]
    tuner = Placed(learner, learner.encoder.tokenize(texts), targets, 8, AdaptBudget(batch_size=8), "contrastive")
    rows = np.arange(len(texts))
    groups = tuner.class_groups(rows)
    nearest = tuner.nearest_classes(rows, groups)
    assert nearest[:, 0].tolist() == list(range(8)) and nearest[:, 1].tolist() == [c ^ 1 for c in range(8)]
    rng = np.random.default_rng(0)
    for _ in range(20):  # 8 rows: one class and its nearest, 4 rows each
        first, second = sorted(set(targets[tuner.batch(rows, groups, rng, nearest)].tolist()))
        assert second == first ^ 1
    at_random = [sorted(set(targets[tuner.batch(rows, groups, rng)].tolist())) for _ in range(20)]
    assert any(second != first ^ 1 for first, second in at_random)
    # where a batch holds every class there is nothing to choose: the same batches as `random`
    texts, labels = support_of(corpus, classes=8, shots=6)  # 48 rows, 8 classes x 4 rows a batch
    targets = support_targets(labels)[1]
    whole = Placed(learner, learner.encoder.tokenize(texts), targets, 8, AdaptBudget(batch_size=32), "contrastive")
    rows = np.arange(len(texts))
    groups = whole.class_groups(rows)
    nearest = whole.nearest_classes(rows, groups)
    assert np.array_equal(whole.batch(rows, groups, np.random.default_rng(1), nearest),
                          whole.batch(rows, groups, np.random.default_rng(1)))
    assert AdaptBudget().contrastive_batches == "random"
    with pytest.raises(DataError, match="contrastive_batches: unknown 'hardest'"):
        AdaptBudget(contrastive_batches="hardest")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seconds", 0.0, "seconds: 0.0 is not a positive number of seconds"),
    ("seconds", -1.0, "seconds: -1.0 is not a positive number of seconds"),
    ("top_layers", 0, r"top_layers: 0 is not a number of layers \(1 or more\)")])
def test_a_budget_without_time_or_layers_is_refused_by_name(field, value, message):
    from metanlp.data.load import DataError
    with pytest.raises(DataError, match=message):
        AdaptBudget(**{field: value})


@pytest.mark.parametrize("objective", ["contrastive", "head"])
def test_tuning_the_top_layers_runs_the_bottom_once_and_changes_only_the_top(learner, corpus, objective):
    """With `top_layers` the tuner starts from the same embeddings as the whole encoder (the bottom's states are
    run once and reused), and its steps move the top layers' weights only."""
    from metanlp.adaptation import _Tuner

    texts, labels = support_of(corpus, classes=4, shots=4)
    targets = support_targets(labels)[1]
    tokens = learner.encoder.tokenize(texts)
    whole = _Tuner(learner, tokens, targets, 4, AdaptBudget(lr=1e-2, batch_size=8), objective)
    top = _Tuner(learner, tokens, targets, 4, AdaptBudget(lr=1e-2, batch_size=8, top_layers=1), objective)
    rows = np.arange(len(texts))
    assert torch.allclose(top.embed(top.start, rows), whole.embed(whole.start, rows), atol=1e-5)
    assert top.start and all(name.startswith("model.encoder.layer.1.") for name in top.start)
    assert len(top.start) < len(whole.start)
    tuned, _, _, done = top.train(rows, 3)
    assert done == 3 and any(not torch.equal(tuned[k], top.start[k]) for k in tuned)
    assert not torch.allclose(top.embed(tuned, rows), top.embed(top.start, rows))
    # the tuned top on the whole encoder gives what the tuner saw
    whole_weights = {**dict(learner.encoder.named_parameters()), **tuned}
    assert torch.allclose(top.embed(tuned, rows), whole.embed(whole_weights, rows), atol=1e-5)


@pytest.mark.parametrize("top_layers", [None, 1])
def test_held_out_checks_embed_in_length_sorted_chunks_to_the_same_embeddings(learner, corpus, top_layers):
    """The checks and prototypes embed many rows in chunks sorted by length (less padding): each row gets the
    embedding one batch of all of them gives, in the order asked for."""
    from metanlp.adaptation import _Tuner

    texts, labels = support_of(corpus, classes=4, shots=4)
    texts = [text + " and more" * (i % 5) for i, text in enumerate(texts)]  # lengths that differ
    tokens = learner.encoder.tokenize(texts)
    learner.eval()
    tuner = _Tuner(learner, tokens, support_targets(labels)[1], 4, AdaptBudget(top_layers=top_layers), "contrastive")
    rows = np.random.default_rng(0).permutation(len(texts))
    assert len(set(tokens.lengths[torch.as_tensor(rows)].tolist())) > 2
    with torch.no_grad():
        one_batch = tuner.embed(tuner.start, rows)
    chunked = tuner.embed_rows(tuner.start, rows, chunk=3)
    assert chunked.shape == one_batch.shape
    assert torch.allclose(chunked, one_batch, atol=1e-5)


def test_without_refit_the_weights_of_the_best_held_out_step_are_kept(learner, corpus):
    """`refit=False`: no second pass on every row; the choosing pass's weights at its lowest held-out loss."""
    from metanlp.adaptation import _Tuner

    texts, labels = support_of(corpus, classes=4, shots=4)
    targets = support_targets(labels)[1]
    budget = AdaptBudget(lr=1e-2, batch_size=8, refit=False, contrastive_steps=6)
    learner.eval()  # no dropout: the three passes below see the same batches and compute the same steps
    tuner = _Tuner(learner, learner.encoder.tokenize(texts), targets, 4, budget, "contrastive")
    fit, held = held_out_split(targets.numpy(), budget.seed)
    kept, _, losses, done = tuner.train(fit, 6, score_rows=held, keep_best=True)
    last, _, _, _ = tuner.train(fit, 6, score_rows=held)
    best = min(losses, key=losses.get)
    at_best, _, _, _ = tuner.train(fit, best)  # the same seeded batches, stopped at the best step
    assert done == 6 and all(torch.allclose(kept[k], at_best[k]) for k in kept)
    if best < 6:
        assert any(not torch.equal(kept[k], last[k]) for k in kept)
    weights, steps, _ = tuner.choose_and_train(6, time.perf_counter())
    before = tuner.loss(tuner.start, None, held, fit)
    assert steps == (best if losses[best] < before else 0)
    if steps:
        assert all(torch.allclose(weights[k], at_best[k]) for k in weights)


def test_domain_adapt_with_top_layers_leaves_the_bottom_as_it_was(learner, corpus):
    texts, labels = support_of(corpus, classes=4, shots=4)
    budget = AdaptBudget(finetune_steps=4, lr=1e-2, top_layers=1)
    adapted, report = domain_adapt(learner, texts, labels, strategies=["finetune"], budget=budget)
    before, after = learner.encoder.state_dict(), adapted.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("model.encoder.layer.1."))
    if report.finetune_steps:
        assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("model.encoder.layer.1."))


def test_contrastive_with_one_shot_per_class_changes_nothing(learner, corpus):
    texts, labels = support_of(corpus, classes=4, shots=1)
    adapted, report = domain_adapt(learner, texts, labels, strategies=["contrastive"])
    assert report.contrastive_steps == 0
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in adapted.state_dict().items())


def test_soft_k_means_step_equals_a_hand_computation():
    from metanlp.learners.protonet import refine_prototypes

    protos = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    counts = torch.tensor([2, 1])
    queries = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    scale = torch.tensor(1.0)
    refined, logits = refine_prototypes(protos, counts, queries, "euclidean", scale, steps=1)
    # euclidean logits: -|q - p|^2 / dim; softmax over the two classes
    w = torch.softmax(-torch.cdist(queries, protos).pow(2) / 2, dim=-1)
    expected = torch.stack([(2 * protos[0] + w[:, 0] @ queries) / (2 + w[:, 0].sum()),
                            (1 * protos[1] + w[:, 1] @ queries) / (1 + w[:, 1].sum())])
    assert torch.allclose(refined, expected)
    assert torch.allclose(logits, -torch.cdist(queries, expected).pow(2) / 2)  # no class proportions added
    assert torch.equal(refine_prototypes(protos, counts, queries, "euclidean", scale, steps=0)[0], protos)


def test_class_proportions_recover_an_imbalanced_batch():
    """Two well-separated classes, 80% of the batch in the first: a classifier that assumes equal classes, its
    proportions estimated by EM, finds 0.8 / 0.2; pooled with a balanced support of 10 + 10 rows they move
    toward 0.5 by exactly the support's share."""
    from metanlp.learners.protonet import class_proportions

    logits = torch.cat([torch.tensor([[8.0, 0.0]]).repeat(80, 1), torch.tensor([[0.0, 8.0]]).repeat(20, 1)])
    assert torch.allclose(class_proportions(logits).exp(), torch.tensor([0.8, 0.2]), atol=1e-3)
    pooled = class_proportions(logits, torch.tensor([10, 10])).exp()
    assert torch.allclose(pooled, torch.tensor([90 / 120, 30 / 120]), atol=1e-3)
    balanced = torch.cat([torch.tensor([[8.0, 0.0]]).repeat(50, 1), torch.tensor([[0.0, 8.0]]).repeat(50, 1)])
    assert torch.allclose(class_proportions(balanced).exp(), torch.tensor([0.5, 0.5]), atol=1e-4)


def test_soft_k_means_step_with_class_proportions_equals_a_hand_computation():
    from metanlp.learners.protonet import class_proportions, refine_prototypes

    protos = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    counts = torch.tensor([2, 1])
    queries = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.5, 0.5]])
    scale = torch.tensor(1.0)
    refined, refined_logits = refine_prototypes(protos, counts, queries, "euclidean", scale, steps=1,
                                                proportions=True)
    logits = -torch.cdist(queries, protos).pow(2) / 2
    w = torch.softmax(logits + class_proportions(logits, counts), dim=-1)
    expected = torch.stack([(2 * protos[0] + w[:, 0] @ queries) / (2 + w[:, 0].sum()),
                            (1 * protos[1] + w[:, 1] @ queries) / (1 + w[:, 1].sum())])
    assert torch.allclose(refined, expected)
    plain = -torch.cdist(queries, expected).pow(2) / 2
    log_prior = refined_logits - plain  # the same log proportions added to every query's logits
    assert torch.allclose(log_prior, class_proportions(plain, counts).expand_as(plain), atol=1e-6)
    assert abs(float(log_prior[0].exp().sum()) - 1) < 1e-5


def test_transductive_estimates_class_proportions_only_with_enough_texts_per_class(learner, corpus):
    from metanlp.adaptation import DomainAdaptedLearner

    texts, labels = support_of(corpus, classes=4, shots=3)
    queries = corpus.texts[200:240]  # 10 per class

    def scores(rows):
        budget = AdaptBudget(transductive_check=False, transductive_proportion_rows=rows)
        return DomainAdaptedLearner(learner, ["transductive"], budget).adapt(texts, labels).predict(queries).scores

    equal = scores(0)
    assert np.allclose(scores(11), equal, atol=1e-6)  # 40 texts < 11 x 4 classes: proportions stay equal
    assert not np.allclose(scores(10), equal, atol=1e-4)


def test_transductive_refinement_is_off_unless_asked(learner, corpus):
    """By default a text's prediction never depends on the other texts predicted with it; asked for, it does."""
    from metanlp.adaptation import DomainAdaptedLearner

    texts, labels = support_of(corpus, classes=4, shots=3)
    queries = corpus.texts[200:230]
    plain = learner.adapt(texts, labels)
    alone = np.concatenate([plain.predict([q]).scores for q in queries])
    assert np.allclose(alone, plain.predict(queries).scores, atol=1e-5)
    always = AdaptBudget(transductive_check=False)
    refined = DomainAdaptedLearner(learner, ["transductive"], always).adapt(texts, labels)
    alone = np.concatenate([refined.predict([q]).scores for q in queries])
    assert not np.allclose(alone, refined.predict(queries).scores, atol=1e-3)
    assert refined.state is None  # the prototypes move with each prediction: nothing to restore


def test_transductive_refinement_is_checked_on_the_supports_left_out_rows():
    """Queries around the classes' true centres, beyond a support drawn toward the middle, separate the
    prototypes: refined. A mass of queries between the classes pulls them together: left plain."""
    from metanlp.adaptation import refinement_helps

    support = torch.tensor([[1.4, 0.1], [1.6, -0.1], [1.5, 0.0], [2.6, 0.1], [2.4, -0.1], [2.5, 0.0]])
    targets = torch.tensor([0, 0, 0, 1, 1, 1])
    scale = torch.tensor(4.0)
    around_centres = torch.tensor([[x, y] for x in (0.0, 4.0) for y in (-0.2, 0.0, 0.2)])
    between = torch.tensor([[2.0, y] for y in (-0.2, -0.1, 0.0, 0.1, 0.2)] * 4)
    assert refinement_helps(support, targets, around_centres, "euclidean", scale, steps=1)
    assert not refinement_helps(support, targets, between, "euclidean", scale, steps=1)
    # one shot per class: no row can be left out, so nothing is refined
    assert not refinement_helps(support[[0, 3]], targets[[0, 3]], around_centres, "euclidean", scale, steps=1)


def test_checked_transductive_predicts_with_the_plain_or_the_refined_prototypes(learner, corpus):
    from metanlp.adaptation import DomainAdaptedLearner

    texts, labels = support_of(corpus, classes=4, shots=3)
    queries = corpus.texts[200:230]
    plain = learner.adapt(texts, labels).predict(queries).scores
    always = DomainAdaptedLearner(learner, ["transductive"], AdaptBudget(transductive_check=False))
    refined = always.adapt(texts, labels).predict(queries).scores
    checked = DomainAdaptedLearner(learner, ["transductive"]).adapt(texts, labels).predict(queries).scores
    assert np.allclose(checked, plain, atol=1e-5) or np.allclose(checked, refined, atol=1e-5)
    one_shot = support_of(corpus, classes=4, shots=1)
    assert np.allclose(DomainAdaptedLearner(learner, ["transductive"]).adapt(*one_shot).predict(queries).scores,
                       learner.adapt(*one_shot).predict(queries).scores, atol=1e-5)


def test_transductive_is_refused_where_it_cannot_act(learner, corpus, tiny_encoder_config):
    from metanlp.adaptation import DomainAdaptedLearner

    texts, labels = support_of(corpus)
    with pytest.raises(ValueError, match="acts when predicting"):
        domain_adapt(learner, texts, labels, strategies=["transductive"])
    with pytest.raises(ValueError, match="does not classify by prototypes"):
        DomainAdaptedLearner(build_learner("logreg", tiny_encoder_config), ["transductive"]).adapt(texts, labels)
    with pytest.raises(ValueError, match="unknown adaptation strategy"):
        DomainAdaptedLearner(learner, ["transductiv"])
