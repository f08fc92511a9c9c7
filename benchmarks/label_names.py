"""Label semantics on the embedded corpus: prototypes that count each label's embedded name as W support examples
(`label_names: W`), and zero-shot from the names alone, for the pipeline's model and the frozen encoder.

W is chosen on the validation domains (it_helpdesk, reviews_movies) and then reported on data never trained on:
the held-out intent domains (real_estate, events) and the held-out kind (emotion). Episodes are drawn within one
domain, as the pipeline's evaluate stage draws them; every variant sees the same episodes.

    python benchmarks/label_names.py --model artifacts/model          # after `metanlp run` or `dvc repro`
    python benchmarks/label_names.py --model artifacts/model --quick  # a few episodes, to check the script

Writes benchmarks/results/label_names/label_names.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from fewshot_intents import ROOT

from metanlp.data.episodes import EpisodeSampler
from metanlp.data.load import load_labelled
from metanlp.data.pool import domain_weights
from metanlp.evaluation import Setting, build_methods, evaluate_methods, mean_ci
from metanlp.learners import load_learner
from metanlp.reporting import gain, percent
from metanlp.stages import load_params

SETS = {"validation": ["it_helpdesk", "reviews_movies"], "test classes": ["real_estate", "events"],
        "emotion": ["emotion"]}


def variants(model: Path, weights: list[float]) -> dict:
    """The model's learner and the frozen encoder (the same pretrained weights it started from), each with every
    label-name weight (0: the plain learner)."""
    kind = load_learner(model).config.kind
    plain = build_methods(model, "default", [kind, "frozen"])
    return {name if w == 0 else f"{name}+names({w:g})": learner if w == 0 else _copy(learner, w)
            for name, learner in plain.items() for w in weights}


def _copy(learner, weight: float):
    import copy

    twin = copy.copy(learner)  # shares the encoder and temperature; only the config differs
    twin.config = learner.config.model_copy(update={"label_names": weight})
    return twin


def zero_shot(learner, data, episodes) -> tuple[float, float]:
    accuracies = []
    for episode in episodes:
        classifier = learner.zero_shot(episode.classes)
        predicted = classifier.predict([data.texts[i] for i in episode.query]).labels
        truth = [episode.classes[i] for i in episode.query_labels]
        accuracies.append(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    return mean_ci(np.array(accuracies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "model")
    parser.add_argument("--weights", default="0,1,2,4")
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "label_names")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.episodes = 6
    weights = [float(w) for w in args.weights.split(",")]
    corpus = load_labelled(ROOT / load_params(ROOT / "params.yaml").data.corpus)
    domain_of = corpus.domain_of_class()
    methods = variants(args.model, weights)
    kind = load_learner(args.model).config.kind
    results = {"model": str(args.model), "episodes": args.episodes, "weights": weights, "sets": {}}
    for set_name, domains in SETS.items():
        data = corpus.with_classes([c for c, d in domain_of.items() if d in domains])
        settings = []
        for k in (int(s) for s in args.shots.split(",")):
            setting = Setting(5, k, dataset=set_name)
            setting.episodes = EpisodeSampler(data, 5, k, 5, seed=1000 * k, spaces=domain_weights(data)).take(
                args.episodes)
            settings.append(setting)
        outcome = evaluate_methods(methods, data, settings, show_progress=False)
        for name in ("frozen", kind):
            mean, ci = zero_shot(methods[name], data, settings[0].episodes)
            outcome[f"zero_shot.{name}"] = {"accuracy": mean, "ci95": ci}
        results["sets"][set_name] = outcome
        print(set_name, "done", flush=True)
    chosen = max(weights, key=lambda w: np.mean([
        e["methods"][kind if w == 0 else f"{kind}+names({w:g})"]["accuracy"]
        for e in results["sets"]["validation"]["settings"]]))
    results["chosen_weight"] = chosen
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "label_names.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Label names in the prototypes ({args.episodes} episodes per setting, 5-way within one domain)", "",
             f"Weight chosen on validation: **{chosen:g}** (examples a name counts as).", "",
             "| data | setting | method | accuracy % (95% CI) | Δ vs frozen, pp (95% CI) | adapt ms |",
             "|---|---|---|---|---|---|"]
    for set_name, outcome in results["sets"].items():
        for entry in outcome["settings"]:
            for name, m in entry["methods"].items():
                diff = gain(m["diff_vs_frozen"], m["diff_ci95"]) if name != "frozen" else ""
                lines.append(f"| {set_name} | {entry['setting'].split(': ')[-1]} | {name} | "
                             f"{percent(m['accuracy'])} ± {percent(m['ci95'])} | {diff} | {m['adapt_ms']:.0f} |")
        for name in ("frozen", kind):
            z = outcome[f"zero_shot.{name}"]
            lines.append(f"| {set_name} | 5-way 0-shot | {name} (names only) | {percent(z['accuracy'])} ± "
                         f"{percent(z['ci95'])} | | |")
    (args.out / "label_names.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
