"""Domain adaptation strategies on new domains, full label space, the same support draws for every row.

The ProtoNet meta-trained on 6 CLINC150 domains by fewshot_intents.py (benchmarks/results/clinc_protonet)
is adapted from K shots per class drawn from each data set's train file, and scored on every row of its
test file: SNIPS (never trained on) and the 3 CLINC150 domains held out from meta-training. `selfsup` is
transductive: its unlabeled text is the test texts (never their labels).

    python benchmarks/adaptation.py            # after fewshot_intents.py has written the model
    python benchmarks/adaptation.py --quick    # one draw, 5 shots, SNIPS only: checks the script

Writes benchmarks/results/adaptation/{snips,clinc}.json and adaptation.md (Δ against frozen and against the
meta-trained prototypes, paired over the support draws).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from fewshot_intents import ROOT, SHARED, metanlp

from metanlp.data.load import load_labelled
from metanlp.evaluation import mean_ci
from metanlp.learners import read_spec

STRATEGIES = ["finetune", "selfsup,finetune,fused"]


def pm(mean: float, ci: float) -> str:
    return f"{100 * mean:+.1f} ± {100 * ci:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "benchmarks" / "results" / "clinc_protonet")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adaptation")
    parser.add_argument("--shots", default="5,10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--refit", action="store_true",
                        help="finetune and contrastive train again on every row after choosing their steps (two "
                             "passes, the default before stop 34, as in the committed results)")
    args = parser.parse_args()
    sets = {"snips": (SHARED / "snips", []), "clinc": (SHARED / "clinc150", ["--split", "test"])}
    if args.quick:
        args.shots, args.repeats, sets = "5", 1, {"snips": sets["snips"]}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (folder, extra) in sets.items():
        # transductive selfsup: the queries' texts, no labels; a temporary file (shared data is never copied in)
        unlabeled = Path(tempfile.mkdtemp(prefix="metanlp-adapt-")) / f"{name}_test_texts.txt"
        queries = load_labelled(folder / "test.jsonl")
        if extra:  # CLINC150: only the rows of the held-out domains are this domain's text
            queries = queries.with_classes(read_spec(args.model).provenance.classes["test"])
        unlabeled.write_text("\n".join(queries.texts) + "\n")
        out = args.out / f"{name}.json"
        adapt = [arg for s in STRATEGIES for arg in ("--adapt", s)]
        metanlp(["evaluate", "--model", str(args.model), "--data", str(folder / "test.jsonl"), *extra,
                 "--ways", "all", "--shots", args.shots, "--support-data", str(folder / "train.jsonl"),
                 "--repeats", str(args.repeats), "--methods", "protonet,frozen", *adapt,
                 "--unlabeled", str(unlabeled), "--exclude-labels", "oos", "--out", str(out), "--quiet",
                 *(["--adapt-refit"] if args.refit else [])])
        results[name] = json.loads(out.read_text())
    lines = ["| data | setting | method | accuracy % (95% CI) | Δ vs frozen, pp | Δ vs protonet, pp | adapt s |",
             "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        for entry in result["settings"]:
            proto = np.array(entry["methods"]["protonet"]["per_episode"])
            for method, m in entry["methods"].items():
                scores = np.array(m["per_episode"])
                vs_proto = "—" if method == "protonet" else pm(*mean_ci(scores - proto))
                vs_frozen = "—" if method == "frozen" else pm(m["diff_vs_frozen"], m["diff_ci95"])
                lines.append(f"| {name} | {entry['setting']} | {method} | {100 * m['accuracy']:.1f} ± "
                             f"{100 * m['ci95']:.1f} | {vs_frozen} | {vs_proto} | {m['adapt_ms'] / 1000:.1f} |")
    table = "\n".join(lines) + "\n"
    (args.out / "adaptation.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
