"""Data-parallel meta-training throughput: `metanlp train` with 1 process and with N processes on the same
total work (the same meta-batches of the same seeded episodes; each of N processes takes 1/N of every
meta-batch's tasks and the meta-gradients are all-reduced, gloo on CPU, NCCL on CUDA).

Each setting is timed at two lengths (SHORT and LONG meta-training steps, everything else equal: loading,
tokenising, the two validations), and throughput is the difference: (LONG - SHORT) steps x tasks per step over
the difference in wall time, so start-up and validation do not count. On CPU the cores are shared: one process
gets all the machine's threads, N processes get threads/N each.

    python benchmarks/distributed_training.py     # writes benchmarks/results/distributed/throughput.{json,md}
    python benchmarks/distributed_training.py --processes 1 4 --out benchmarks/results/gpu   # on a 4-GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METANLP = Path(sys.executable).parent / "metanlp"


def timed_run(processes: int, steps: int, tasks: int, learner: str, threads: int, work: Path) -> float:
    out = work / f"model-{processes}-{steps}"
    command = [str(METANLP), "train", "--learner", learner, "--episodes", str(steps), "--tasks-per-step", str(tasks),
               "--val-every", str(steps), "--val-episodes", "5", "--patience", "100", "--processes", str(processes),
               "--no-checkpoint", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--short", type=int, default=4, help="meta-training steps of the short run")
    parser.add_argument("--long", type=int, default=24, help="meta-training steps of the long run")
    parser.add_argument("--tasks-per-step", type=int, default=4)
    parser.add_argument("--learner", default="protonet")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for processes in args.processes:
            threads = max(1, cores // processes)
            short = timed_run(processes, args.short, args.tasks_per_step, args.learner, threads, Path(work))
            long = timed_run(processes, args.long, args.tasks_per_step, args.learner, threads, Path(work))
            steps_per_s = (args.long - args.short) / (long - short)
            rows.append({"processes": processes, "threads_each": threads, "short_run_s": round(short, 1),
                         "long_run_s": round(long, 1), "steps_per_s": round(steps_per_s, 3),
                         "episodes_per_s": round(steps_per_s * args.tasks_per_step, 3)})
            print(rows[-1], flush=True)
    base = rows[0]["episodes_per_s"]
    for row in rows:
        row["speed_up"] = round(row["episodes_per_s"] / base, 2)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {cores} cores"
    result = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
              "learner": args.learner, "encoder": "all-MiniLM-L6-v2", "tasks_per_step": args.tasks_per_step,
              "episode": "5-way 5-shot 5-query", "steps": [args.short, args.long], "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(result, indent=2))
    lines = [f"Data-parallel meta-training, {args.learner} on all-MiniLM-L6-v2, {args.tasks_per_step} tasks per step "
             f"(5-way 5-shot 5-query), embedded corpus; {device}. Throughput from runs of {args.short} and "
             f"{args.long} steps (start-up and validation cancel out).", "",
             "| processes | threads each | episodes/s | speed-up |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['processes']} | {r['threads_each']} | {r['episodes_per_s']:.2f} | {r['speed_up']:.2f}x |"
              for r in rows]
    (args.out / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
