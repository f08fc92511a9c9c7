"""Code tests: `metanlp average`, a model soup: the mean of several models' weights, refused for models that
differ in learner, encoder or shape."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from metanlp.cli import app
from metanlp.config import learner_config
from metanlp.learners import build_learner, load_learner, save_learner

runner = CliRunner()


def trained_apart(encoder_config, seed: int):
    """The tiny model with its weights moved by a seeded step, as training with another seed would."""
    learner, generator = build_learner("protonet", encoder_config), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return learner


def test_the_average_is_the_mean_of_each_tensor_and_says_what_it_averaged(tmp_path, tiny_encoder_config):
    folders = [save_learner(trained_apart(tiny_encoder_config, seed), tmp_path / f"seed{seed}") for seed in (0, 1, 2)]
    states = [load_learner(folder).state_dict() for folder in folders]
    assert not torch.equal(states[0]["encoder.model.embeddings.word_embeddings.weight"],
                           states[1]["encoder.model.embeddings.word_embeddings.weight"])  # three different models
    out = tmp_path / "soup"
    result = runner.invoke(app, ["average", *(f"--model={folder}" for folder in folders), "--out", str(out)])
    assert result.exit_code == 0, result.output
    averaged = load_learner(out)
    for name, tensor in averaged.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, sum(state[name] for state in states) / 3)
    assert json.loads((out / "learner.json").read_text())["provenance"]["averaged"] == [str(f) for f in folders]
    assert "averaged" not in json.loads((folders[0] / "learner.json").read_text())["provenance"]


def test_models_of_another_encoder_or_learner_are_refused_and_nothing_is_written(tmp_path, tiny_encoder_config):
    first = save_learner(build_learner("protonet", tiny_encoder_config), tmp_path / "first")
    shorter = save_learner(build_learner("protonet", tiny_encoder_config.model_copy(update={"max_length": 32})),
                           tmp_path / "shorter")
    rates = []
    for name, rate in (("rates_a", 0.5), ("rates_b", 0.6)):  # label base rates learned from other rows
        learner = build_learner(learner_config("protonet", label_prior=1.0), tiny_encoder_config)
        learner.label_rates = {"positive": rate, "negative": -rate}
        rates.append(save_learner(learner, tmp_path / name))
    out = tmp_path / "soup"
    for args, message in (([first, shorter], f"{shorter}: not the learner and encoder of {first}"),
                          (rates, f"{rates[1]}: what it keeps beside its weights (['label_prior.json']) differs"),
                          ([first], "at least two models")):
        result = runner.invoke(app, ["average", *(f"--model={folder}" for folder in args), "--out", str(out)])
        assert result.exit_code != 0 and message in " ".join(result.output.split()), result.output
        assert not out.exists()
