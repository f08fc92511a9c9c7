"""The learners in the suite: frozen, ProtoNet, MAML, the learned LSTM optimizer, LEOPARD and memory-augmented
adaptation, all on the same supports and queries of datasets none of them trained on.

The meta-learners are those of benchmarks/learners_clinc.py (meta-trained on CLINC150's 6 training domains, 150
steps; trained here if missing). The memory model is the ProtoNet model with an episodic memory of past tasks
(benchmarks/pools/past_tasks.yaml: ARSC's source tasks and CLINC150's training domains); `memory+mbpa` adds
MbPA local adaptation where a task's support set says it helps (the default check), `memory+mbpa-unchecked` on
every task. The distilled student has its own benchmark (benchmarks/distillation.py).

    python benchmarks/learners_suite.py                  # 33 min on 2 cores (24 of them training the models)
    python benchmarks/learners_suite.py --quick          # tiny budgets: checks the script

Writes benchmarks/results/learners/suite.{json,md,png} and learners_suite.md (the table with training time).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fewshot_intents import ROOT, metanlp
from learners_clinc import train_args

LEARNERS = ("protonet", "maml", "lstm", "leopard")


def add_reuse_options(parser: argparse.ArgumentParser, methods: str) -> None:
    parser.add_argument("--reuse", type=Path, default=None,
                        help="an earlier suite.json of the same supports: rows of --reuse-methods are taken from it")
    parser.add_argument("--reuse-methods", default=methods)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "benchmarks" / "results" / "learners",
                        help="where the meta-trained models are (or are trained)")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--shots", default="5,10")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--max-queries", type=int, default=300)
    parser.add_argument("--datasets", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learners")
    add_reuse_options(parser, "frozen,protonet,lstm,leopard,memory,memory+mbpa")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    pools = ROOT / "benchmarks" / "pools"
    quiet = ["--quiet"]
    if args.quick:
        args.train_steps, args.shots, args.draws, args.max_queries = 2, "5", 1, 50
        args.datasets, args.models = args.datasets or "snips,airline_tweets", args.out / "quick"
    args.out.mkdir(parents=True, exist_ok=True)
    recorded = args.models / "train_seconds.json"  # training times of the models trained here, kept for reruns
    train_seconds = json.loads(recorded.read_text()) if recorded.exists() else {}
    for learner in LEARNERS:
        model = args.models / learner
        if not (model / "learner.json").exists():
            tasks = 1 if learner == "protonet" else 4
            train_seconds[learner] = metanlp([*train_args(learner, args.train_steps, tasks,
                                                          max(1, args.train_steps // 5), 50, model), *quiet])
            recorded.write_text(json.dumps(train_seconds, indent=2))
    previous = args.models / "learners_clinc.json"
    if previous.exists():
        for learner, run in json.loads(previous.read_text()).items():
            train_seconds.setdefault(learner, run["train_seconds"])
    work = args.out / "work"
    memory, mbpa, unchecked = work / "memory", work / "memory_mbpa", work / "memory_mbpa_unchecked"
    if not (memory / "learner.json").exists():
        train_seconds["memory"] = metanlp(["memory", "--model", str(args.models / "protonet"), "--pool",
                                           str(pools / "past_tasks.yaml"), "--out", str(memory), "--force"])
    for out, check in ((mbpa, "--local-check"), (unchecked, "--no-local-check")):
        if not (out / "learner.json").exists():
            metanlp(["memory", "--model", str(memory), "--local-steps", "5", check, "--out", str(out), "--force"])
    models = {"protonet": args.models / "protonet", "maml": args.models / "maml", "lstm": args.models / "lstm",
              "leopard": args.models / "leopard", "memory": memory, "memory+mbpa": mbpa,
              "memory+mbpa-unchecked": unchecked}
    suite = args.out / "suite.json"
    command = ["benchmark", "--pool", str(pools / "learners.yaml"), "--methods", "frozen", "--no-model-logreg",
               "--shots", args.shots, "--draws", str(args.draws), "--max-queries", str(args.max_queries),
               "--out", str(suite), *quiet]
    command += [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
    if args.datasets:
        command += ["--datasets", args.datasets]
    if args.reuse:
        command += ["--reuse", str(args.reuse), "--reuse-methods", args.reuse_methods]
    metanlp(command)
    write_table(args, json.loads(suite.read_text()), train_seconds)


def write_table(args, results: dict, train_seconds: dict) -> None:
    """learners_suite.md: mean accuracy over the held-out datasets per K with paired differences to frozen,
    adaptation ms, training time."""
    lines = ["Same supports and queries for every row (`python benchmarks/learners_suite.py`); mean over the "
             "held-out datasets, each weighted equally; differences paired over support draws (Student 95% CI).\n",
             "| K | method | accuracy % | Δ vs frozen, pp | adapt ms per support set | training s |",
             "|---|---|---|---|---|---|"]
    for entry in results["summary"]["mean"]:
        for method, row in entry["methods"].items():
            diff = row.get("vs_frozen")
            delta = f"{100 * diff['diff']:+.1f} ± {100 * diff['ci95']:.1f}" if diff else "—"
            trained = train_seconds.get(method.split("+")[0])
            lines.append(f"| {entry['shots']} | {method} | {100 * row['accuracy']:.1f} ± {100 * row['ci95']:.1f} | "
                         f"{delta} | {1000 * row['adapt_s']:.0f} | {f'{trained:.0f}' if trained else '—'} |")
    (args.out / "learners_suite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
