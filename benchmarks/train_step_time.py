"""Seconds per meta-training step of `metanlp train`, at several commits, side by side on one machine.

Timing two commits in separate runs mixes the change with the machine's drift (on the 2-core CI machine rates
move by 15-20% between days). Here every commit is checked out in a temporary git worktree and run with the
same command (the CLINC150 training domains, as in learners_clinc.py), the commits alternating within each
repeat. The time per step is the difference between a long and a short run divided by their difference in
steps, so start-up, tokenisation and the final validation cancel out.

    python benchmarks/train_step_time.py --revisions c3dfd0a,HEAD --learners fomaml,maml

Writes benchmarks/results/train_step_time.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from fewshot_intents import ROOT, metanlp
from learners_clinc import train_args


def timed_train(source: Path, learner: str, steps: int, tasks: int, out: Path) -> float:
    # Validation only at the start (val-every past the last step), on few episodes: it cancels out anyway.
    return metanlp([*train_args(learner, steps, tasks, steps + 1, 5, out), "--quiet"], source=source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revisions", default="HEAD", help="commits to compare, the first is the baseline")
    parser.add_argument("--learners", default="fomaml,maml")
    parser.add_argument("--steps", type=int, nargs=2, default=(3, 13), metavar=("SHORT", "LONG"))
    parser.add_argument("--tasks-per-step", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    short, long = args.steps
    if not 0 < short < long:
        parser.error(f"--steps needs 0 < SHORT < LONG, got {short} {long}")
    revisions, learners = args.revisions.split(","), args.learners.split(",")
    commits = {r: subprocess.run(["git", "rev-parse", "--short", r], check=True, capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip() for r in revisions}
    per_step: dict[str, dict[str, list[float]]] = {learner: {r: [] for r in revisions} for learner in learners}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {r: Path(tmp) / f"tree-{i}" for i, r in enumerate(revisions)}
        for revision, tree in trees.items():
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], check=True, cwd=ROOT,
                           capture_output=True)
        try:
            for repeat in range(args.repeats):
                for learner in learners:
                    # Alternate the order between repeats so that drift during a repeat does not favour a commit.
                    for revision in revisions if repeat % 2 == 0 else revisions[::-1]:
                        seconds = {n: timed_train(trees[revision], learner, n, args.tasks_per_step,
                                                  Path(tmp) / "model") for n in (short, long)}
                        per_step[learner][revision].append((seconds[long] - seconds[short]) / (long - short))
                        print(f"{learner} @ {revision} ({commits[revision]}), repeat {repeat + 1}: "
                              f"{per_step[learner][revision][-1]:.2f} s/step", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    write_tables(args, revisions, commits, per_step)


def write_tables(args, revisions: list[str], commits: dict[str, str], per_step: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"Seconds per meta-training step ({args.tasks_per_step} tasks, 5-way 5-shot 5-query, CLINC150 "
             f"training domains), from runs of {args.steps[0]} and {args.steps[1]} steps, {args.repeats} repeats "
             f"with the commits alternating; `python benchmarks/train_step_time.py --revisions {args.revisions} "
             f"--learners {args.learners}`.\n",
             f"| learner | commit | s per step (runs) | speed-up vs {commits[revisions[0]]} |", "|---|---|---|---|"]
    for learner, by_revision in per_step.items():
        base = float(np.mean(by_revision[revisions[0]]))
        for revision in revisions:
            times = by_revision[revision]
            lines.append(f"| {learner} | {commits[revision]} | {np.mean(times):.2f} "
                         f"({', '.join(f'{t:.2f}' for t in times)}) | {base / np.mean(times):.2f}x |")
    (args.out / "train_step_time.md").write_text("\n".join(lines) + "\n")
    (args.out / "train_step_time.json").write_text(json.dumps(
        {"revisions": {r: commits[r] for r in revisions}, "steps": list(args.steps),
         "tasks_per_step": args.tasks_per_step, "seconds_per_step": per_step}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
