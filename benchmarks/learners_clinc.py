"""Every meta-learner on the same CLINC150 split and the same evaluation episodes.

Each learner is meta-trained on the 6 training domains (as in fewshot_intents.py), early-stopped on `work`,
and evaluated on the 45 intents of the 3 held-out domains. Evaluation episodes depend only on the data, the
protocol and the seed, so every run scores the same episodes and the paired difference to the frozen
encoder is taken episode by episode across runs.

    python benchmarks/learners_clinc.py --learners protonet,fomaml,anil --train-steps 150
    python benchmarks/learners_clinc.py --quick      # tiny budgets, checks the script

Writes benchmarks/results/learners/learners_clinc.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from fewshot_intents import CLINC_SPLIT, ROOT, SHARED, metanlp

from metanlp.evaluation import mean_ci


def train_args(learner: str, steps: int, tasks: int, val_every: int, val_episodes: int, out: Path) -> list[str]:
    """`metanlp train` on the CLINC150 training domains, early-stopped on `work`."""
    clinc = SHARED / "clinc150"
    return ["train", "--data", str(clinc / "train.jsonl"), "--val-data", str(clinc / "val.jsonl"), *CLINC_SPLIT,
            "--learner", learner, "--episodes", str(steps), "--tasks-per-step", str(tasks),
            "--val-every", str(val_every), "--val-episodes", str(val_episodes), "--no-checkpoint", "--out", str(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learners", default="protonet,fomaml,anil,metasgd,reptile,leopard,lstm,maml")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--tasks-per-step", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learners")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep-previous", action="store_true",
                        help="keep the rows of learners already in OUT/learners_clinc.json (same episodes)")
    args = parser.parse_args()
    if args.quick:
        args.train_steps, args.episodes, args.repeats = 2, 4, 1
    args.out.mkdir(parents=True, exist_ok=True)
    clinc = SHARED / "clinc150"
    quiet = ["--quiet"] if args.quick else []
    protocols = {
        "episodic": ["--ways", "5", "--shots", "1,5", "--episodes", str(args.episodes)],
        "full": ["--ways", "all", "--shots", "5", "--support-data", str(clinc / "train.jsonl"),
                 "--repeats", str(args.repeats)],
    }
    runs: dict[str, dict] = {}
    previous = args.out / "learners_clinc.json"
    if args.keep_previous and previous.exists():
        runs = json.loads(previous.read_text())
    for learner in args.learners.split(","):
        model = args.out / learner
        tasks = 1 if learner == "protonet" else args.tasks_per_step
        seconds = metanlp([*train_args(learner, args.train_steps, tasks, max(1, args.train_steps // 5),
                                       min(50, args.episodes), model), *quiet])
        runs[learner] = {"train_seconds": seconds, "tasks_per_step": tasks}
        for protocol, protocol_args in protocols.items():
            out = args.out / f"{learner}_{protocol}.json"
            metanlp(["evaluate", "--model", str(model), "--data", str(clinc / "test.jsonl"), "--split", "test",
                     *protocol_args, "--methods", f"{learner},frozen", "--out", str(out), *quiet])
            runs[learner][protocol] = json.loads(out.read_text())
        write_tables(args, runs, protocols)  # after every learner: an interrupted run keeps what it measured


def write_tables(args, runs: dict, protocols: dict) -> None:
    kept = [learner for learner in runs if learner not in args.learners.split(",")]
    lines = [f"Same episodes for every row; {args.train_steps} meta-training steps "
             f"({args.tasks_per_step} tasks each for gradient learners, 1 for protonet); "
             f"`python benchmarks/learners_clinc.py --learners {args.learners} --train-steps {args.train_steps}"
             f"{' --keep-previous' if args.keep_previous else ''}`"
             + (f" (rows kept from earlier runs: {', '.join(kept)})" if kept else "") + ".\n",
             "| setting | method | accuracy % (95% CI) | Δ vs frozen, pp (95% CI) | adapt ms/episode | train s |",
             "|---|---|---|---|---|---|"]
    first = next(iter(runs.values()))
    for protocol in protocols:
        for index, entry in enumerate(first[protocol]["settings"]):
            frozen = np.array(entry["methods"]["frozen"]["per_episode"])
            mean, ci = mean_ci(frozen)
            lines.append(f"| {entry['setting']} | frozen | {100 * mean:.1f} ± {100 * ci:.1f} | — | "
                         f"{entry['methods']['frozen']['adapt_ms']:.0f} | — |")
            for learner, run in runs.items():
                method = run[protocol]["settings"][index]["methods"][learner]
                scores = np.array(method["per_episode"])
                diff, diff_ci = mean_ci(scores - frozen[: len(scores)])
                lines.append(f"| {entry['setting']} | {learner} | {100 * method['accuracy']:.1f} ± "
                             f"{100 * method['ci95']:.1f} | {100 * diff:+.1f} ± {100 * diff_ci:.1f} | "
                             f"{method['adapt_ms']:.0f} | {run['train_seconds']:.0f} |")
    (args.out / "learners_clinc.md").write_text("\n".join(lines) + "\n")
    (args.out / "learners_clinc.json").write_text(json.dumps(
        {k: {"train_seconds": v["train_seconds"], "tasks_per_step": v.get("tasks_per_step")}
         | {p: v[p] for p in protocols}
         for k, v in runs.items()}))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
