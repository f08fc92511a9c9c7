"""The benchmark suite over `metanlp benchmark`: meta-train one model on a task pool (unless it is there), then
score it and the peers on the pool's held-out eval datasets, every method on the same supports and queries.

    python benchmarks/suite.py --quick                       # small budgets, under 10 minutes on 2 cores
    python benchmarks/suite.py                               # universal pool, K = 5 and 10, 3 draws
    python benchmarks/suite.py --pool benchmarks/pools/no_sentiment.yaml --name no_sentiment \
        --datasets arsc_target,airline_tweets                # leave one task kind out, scored on it
    python benchmarks/suite.py --methods frozen,logreg,setfit --setfit-iterations 5 --datasets snips,ag_news \
        --reuse benchmarks/results/suite/universal.json      # add SetFit rows to an earlier run's supports
    python benchmarks/suite.py --adapt contrastive           # + rows with the encoder tuned on each support

Writes benchmarks/results/suite/NAME.{json,md,png}; the model goes to the gitignored benchmarks/results/suite/work/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fewshot_intents import ROOT, metanlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=ROOT / "benchmarks" / "pools" / "universal.yaml")
    parser.add_argument("--name", default="universal", help="the model's name in the tables and files")
    parser.add_argument("--learner", default="protonet")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--methods", default="frozen,logreg,finetune")
    parser.add_argument("--shots", default="5,10")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--max-queries", type=int, default=2000)
    parser.add_argument("--datasets", default=None)
    parser.add_argument("--setfit-iterations", type=int, default=20)
    parser.add_argument("--adapt", action="append", default=[],
                        help="adaptation strategies on the model and the frozen encoder (repeatable), e.g. contrastive")
    parser.add_argument("--reuse", type=Path, default=None, help="an earlier suite JSON of the same supports")
    parser.add_argument("--reuse-methods", default=None, help="methods whose rows --reuse supplies (default setfit)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "suite")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.train_steps, args.shots, args.draws, args.max_queries = 20, "5", 1, 200
        args.methods, args.datasets = "frozen,logreg", args.datasets or "snips,ag_news,arsc_target"
        args.name = f"{args.name}_quick"
    model = args.out / "work" / args.name
    if not (model / "learner.json").exists():
        metanlp(["train", "--pool", str(args.pool), "--learner", args.learner, "--episodes", str(args.train_steps),
                 "--val-every", str(max(1, args.train_steps // 4)), "--val-episodes", "60", "--out", str(model),
                 "--no-checkpoint", "--quiet"])
    command = ["benchmark", "--pool", str(args.pool), "--model", f"{args.name}={model}", "--methods", args.methods,
               "--shots", args.shots, "--draws", str(args.draws), "--max-queries", str(args.max_queries),
               "--setfit-iterations", str(args.setfit_iterations), "--out", str(args.out / f"{args.name}.json")]
    if args.datasets:
        command += ["--datasets", args.datasets]
    for combination in args.adapt:
        command += ["--adapt", combination]
    if args.reuse:
        command += ["--reuse", str(args.reuse)]
        if args.reuse_methods:
            command += ["--reuse-methods", args.reuse_methods]
    metanlp(command)


if __name__ == "__main__":
    main()
