"""Meta-training objectives on the embedded corpus: the pipeline's recipe (ProtoNet with its tuned values, episodes
within one domain) trained with the prototype loss alone and with a supervised contrastive term of each weight
(`learner.supcon`), each scored as the evaluate stage scores the pipeline's model: the held-out intent domains and
the held-out kind (emotion), the frozen encoder on the same episodes, and each weight paired with weight 0.

    python benchmarks/objectives.py           # after `metanlp run` or `dvc repro` (reads artifacts/corpus, tune)
    python benchmarks/objectives.py --quick   # 30 training episodes, 10 evaluation episodes: checks the script
    python benchmarks/objectives.py --anchor 0,0.01,1   # instead: the L2-SP pull toward the pretrained weights
                                                        # (`train.anchor`), with the pipeline's supcon weight

Writes benchmarks/results/objectives/objectives.{json,md} (anchor.{json,md} with --anchor).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from fewshot_intents import ROOT

from metanlp.evaluation import mean_ci
from metanlp.reporting import gain, percent
from metanlp.stages import load_params, read_json
from metanlp.stages.evaluate import evaluate_on_test
from metanlp.stages.meta_train import BEST, train_model, with_overrides
from metanlp.stages.pretrain import starting_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=ROOT, help="a project after `metanlp run` / `dvc repro`")
    parser.add_argument("--supcon", default="0,0.5,1", help="weights of the contrastive term; the first is the base")
    parser.add_argument("--anchor", default=None, help="weights of the anchor (train.anchor) to compare instead; the "
                                                          "first is the base")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "objectives")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    root = args.project.resolve()
    params = load_params(root / "params.yaml")
    base = with_overrides(starting_encoder(params, root), read_json(root / BEST, "tune")["overrides"])
    evaluate = params.evaluate
    if args.quick:
        base = base.model_copy(update={"train": base.train.model_copy(update={
            "episodes": 30, "val_every": 10, "val_episodes": 10, "warmup_episodes": 5})})
        evaluate = evaluate.model_copy(update={"episodes": 10})
    if args.anchor is None:
        variant, key, weights = "supcon weight", "learner.supcon", [float(w) for w in args.supcon.split(",")]
        extra, name = {"learner.supcon_temperature": args.temperature}, "objectives"
    else:
        variant, key, weights = "anchor weight", "train.anchor", [float(w) for w in args.anchor.split(",")]
        extra, name = {}, "anchor"
    runs = {}
    with tempfile.TemporaryDirectory() as models:
        for weight in weights:
            config = with_overrides(base, {key: weight, **extra})
            started = time.perf_counter()
            trained = train_model(config, root, params.data, Path(models) / f"{weight:g}", show_progress=False)
            seconds = time.perf_counter() - started
            results = evaluate_on_test(Path(models) / f"{weight:g}", root, evaluate, methods=["frozen"],
                                       show_progress=False, label_spaces=params.data.label_spaces,
                                       corpus=root / params.data.corpus)
            runs[f"{weight:g}"] = {key: weight, "train_seconds": seconds, "best_episode": trained.best_episode,
                                   "best_val_accuracy": trained.best_val_accuracy, "results": results}
            print(f"{key} {weight:g}: validation {100 * trained.best_val_accuracy:.1f}% at episode "
                  f"{trained.best_episode}, {seconds:.0f} s", flush=True)
    report = {"variant": variant, "temperature": args.temperature, "train": base.train.model_dump(mode="json"),
              "learner": base.learner.model_dump(mode="json"), "evaluate": evaluate.model_dump(mode="json"),
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    text = markdown(report, f"{weights[0]:g}")
    (args.out / f"{name}.md").write_text(text)
    print(text)


def markdown(report: dict, base: str) -> str:
    runs = report["runs"]
    lines = [f"# Meta-training objectives ({report['train']['episodes']} meta-training episodes, "
             f"{report['evaluate']['episodes']} evaluation episodes per setting, temperature "
             f"{report['temperature']:g})", "",
             f"| data | setting | {report.get('variant', 'supcon weight')} | accuracy % (95% CI) | vs frozen, pp | "
             f"vs weight " + base
             + ", pp (paired) | validation % | train s |", "|---|---|---|---|---|---|---|---|"]
    base_settings = runs[base]["results"]["settings"]
    for index, entry in enumerate(base_settings):
        data, setting = entry.get("dataset", "test classes"), entry["setting"].split(": ")[-1]
        reference = np.asarray(entry["methods"]["protonet"]["per_episode"])
        for name, run in runs.items():
            mine = run["results"]["settings"][index]["methods"]["protonet"]
            diff, ci = mean_ci(np.asarray(mine["per_episode"]) - reference)
            lines.append(f"| {data} | {setting} | {name} | {percent(mine['accuracy'])} ± {percent(mine['ci95'])} | "
                         f"{gain(mine['diff_vs_frozen'], mine['diff_ci95'])} | "
                         f"{'—' if name == base else gain(diff, ci)} | {percent(run['best_val_accuracy'])} | "
                         f"{run['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
