"""Does pretraining before meta-training help? (a) none, (b) masked-LM, (c) SMLMT, (d) hybrid, then the same
meta-learner, on the same episodes.

Unlabeled text: WikiText-2 (valid part) plus the texts of the six CLINC150 training domains; their labels are
used only by the hybrid, whose supervised episodes come from those same training classes. Every variant is
then meta-trained with ProtoNet on the CLINC150 training domains (as in fewshot_intents.py) and evaluated on
the 45 intents of the 3 held-out CLINC150 domains and on SNIPS (never trained on). Evaluation episodes
depend only on the data, the protocol and the seed, so the differences to (a) are paired episode by episode.

    python benchmarks/pretraining.py              # about 50 minutes on 2 CPU cores
    python benchmarks/pretraining.py --quick      # tiny budgets, checks the script

Writes benchmarks/results/pretraining/pretraining.{json,md}; encoders and models go to its work/ folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from fewshot_intents import CLINC_SPLIT, ROOT, SHARED, metanlp

from metanlp.evaluation import mean_ci

TRAIN_DOMAINS = CLINC_SPLIT[CLINC_SPLIT.index("--train-domains") + 1].split(",")
VARIANTS = {  # name -> `metanlp pretrain` arguments (None: meta-train the packaged encoder as it is)
    "none": None,
    "mlm": ["--mode", "mlm"],
    "smlmt": ["--mode", "smlmt"],
    "hybrid": ["--mode", "smlmt", "--labelled", "{labelled}"],
}


def training_domain_rows(work: Path) -> Path:
    """The CLINC150 train rows of the training domains (text, label): unlabeled text and hybrid tasks."""
    path = work / "clinc_train_domains.jsonl"
    rows = [json.loads(line) for line in (SHARED / "clinc150" / "train.jsonl").read_text().splitlines()]
    kept = [{"text": r["text"], "label": r["label"]} for r in rows if r.get("domain") in TRAIN_DOMAINS]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--mlm-steps", type=int, default=500)
    parser.add_argument("--smlmt-episodes", type=int, default=300)
    parser.add_argument("--train-episodes", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pretraining")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep-previous", action="store_true",
                        help="keep the rows of variants already in OUT/pretraining.json (same episodes)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS) or "none" not in variants and not args.keep_previous:
        parser.error(f"--variants: choose from {list(VARIANTS)}; 'none' is the reference of every difference")
    if args.quick:
        args.mlm_steps, args.smlmt_episodes, args.train_episodes, args.episodes, args.repeats = 2, 2, 2, 4, 1
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    clinc, snips = SHARED / "clinc150", SHARED / "snips"
    labelled = training_domain_rows(work)
    unlabeled = ["--text", str(SHARED / "wikitext2" / "valid.txt"), "--text", str(labelled)]
    quiet = ["--quiet"] if args.quick else []
    evaluations = {
        "clinc_episodic": ["--data", str(clinc / "test.jsonl"), "--split", "test", "--ways", "5", "--shots", "1,5",
                           "--episodes", str(args.episodes)],
        "clinc_full": ["--data", str(clinc / "test.jsonl"), "--split", "test", "--ways", "all", "--shots", "5",
                       "--support-data", str(clinc / "train.jsonl"), "--repeats", str(args.repeats)],
        "snips_episodic": ["--data", str(snips / "test.jsonl"), "--ways", "5", "--shots", "1,5",
                           "--episodes", str(args.episodes)],
        "snips_full": ["--data", str(snips / "test.jsonl"), "--ways", "all", "--shots", "5",
                       "--support-data", str(snips / "train.jsonl"), "--repeats", str(args.repeats)],
    }
    previous = args.out / "pretraining.json"
    runs: dict[str, dict] = json.loads(previous.read_text())["runs"] if args.keep_previous and previous.exists() else {}
    for variant in variants:
        run: dict = {}
        encoder = ["--encoder", "default"]
        if VARIANTS[variant] is not None:
            encoder_dir = work / f"{variant}_encoder"
            run["pretrain_seconds"] = metanlp([
                "pretrain", *unlabeled, *[a.format(labelled=labelled) for a in VARIANTS[variant]],
                "--mlm-steps", str(args.mlm_steps), "--smlmt-episodes", str(args.smlmt_episodes),
                "--out", str(encoder_dir), *quiet])
            encoder = ["--encoder", str(encoder_dir)]
        model = work / f"{variant}_protonet"
        run["train_seconds"] = metanlp([
            "train", "--data", str(clinc / "train.jsonl"), "--val-data", str(clinc / "val.jsonl"), *CLINC_SPLIT,
            *encoder, "--learner", "protonet", "--episodes", str(args.train_episodes), "--ways", "5", "--shots",
            "5", "--queries", "5", "--val-every", str(max(1, args.train_episodes // 3)), "--val-episodes",
            str(min(100, args.episodes)), "--no-checkpoint", "--out", str(model), *quiet])
        history = json.loads((model / "history.json").read_text())
        run["best_val_accuracy"], run["best_episode"] = history["best_val_accuracy"], history["best_episode"]
        for key, evaluation in evaluations.items():
            out = work / f"{variant}_{key}.json"
            metanlp(["evaluate", "--model", str(model), *evaluation, "--methods", "protonet,frozen",
                     "--out", str(out), *quiet])
            run[key] = json.loads(out.read_text())
        runs[variant] = run
        write_tables(args, runs, list(evaluations))  # after every variant: an interrupted run keeps its rows


def write_tables(args, runs: dict, evaluations: list[str]) -> None:
    """One row per (variant, method): accuracy and the paired difference to (a) no pretraining + ProtoNet."""
    lines = [f"Same episodes for every row. Budget: masked-LM {args.mlm_steps} steps of 32 sentences; SMLMT and "
             f"hybrid {args.smlmt_episodes} ProtoNet episodes on cloze tasks (hybrid: half of them supervised "
             f"episodes of the CLINC150 training domains); then {args.train_episodes} ProtoNet 5-way 5-shot "
             f"episodes on the CLINC150 training domains for every variant. `frozen` is a variant's encoder "
             f"before meta-training. `python benchmarks/pretraining.py --mlm-steps {args.mlm_steps} "
             f"--smlmt-episodes {args.smlmt_episodes} --train-episodes {args.train_episodes} --episodes "
             f"{args.episodes} --repeats {args.repeats}`\n",
             "| data | setting | pretraining | method | accuracy % (95% CI) | Δ vs (a) none + protonet, pp (95% CI) "
             "| pretrain s | meta-train s |", "|---|---|---|---|---|---|---|---|"]
    if "none" not in runs:
        return
    reference = runs["none"]
    for key in evaluations:
        data = "CLINC150 held-out domains" if key.startswith("clinc") else "SNIPS (never trained on)"
        for index, entry in enumerate(reference[key]["settings"]):
            base = np.array(entry["methods"]["protonet"]["per_episode"])
            for variant, run in runs.items():
                for method in ("protonet", "frozen"):
                    if variant != "none" and method == "frozen" and key.endswith("full"):
                        continue  # the pretrained encoders' frozen rows are in the episodic settings
                    scores = np.array(run[key]["settings"][index]["methods"][method]["per_episode"])
                    mean, ci = mean_ci(scores)
                    if variant == "none" and method == "protonet":
                        delta = "—"
                    else:
                        diff, diff_ci = mean_ci(scores - base)
                        delta = f"{100 * diff:+.1f} ± {100 * diff_ci:.1f}"
                    lines.append(f"| {data} | {entry['setting']} | {variant} | {method} | {100 * mean:.1f} ± "
                                 f"{100 * ci:.1f} | {delta} | {run.get('pretrain_seconds', 0):.0f} | "
                                 f"{run['train_seconds']:.0f} |")
    (args.out / "pretraining.md").write_text("\n".join(lines) + "\n")
    (args.out / "pretraining.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "runs": runs}))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
