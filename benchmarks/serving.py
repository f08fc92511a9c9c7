"""Latency of `metanlp serve` on loopback: cold task creation (5-way 5-shot and 77-way 10-shot from CLINC150)
and cached predictions of one text, p50/p95/p99 at concurrency 1 and 8, then a bounded load (requests in
total, concurrency 8) counting errors and the server's memory before and after.

    python benchmarks/serving.py                       # a ProtoNet on the default encoder, 2,000 load requests
    python benchmarks/serving.py --model models/clinc --load 500

Writes benchmarks/results/serving.{json,md}. Every request goes to 127.0.0.1 only; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fewshot_intents import ROOT, SHARED

from metanlp.data.load import load_labelled


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def support(classes: int, shots: int) -> list[dict]:
    data = load_labelled(SHARED / "clinc150" / "train.jsonl")
    chosen = [c for c in data.classes if c != "oos"][:classes]
    by_class = data.indices_by_class()
    return [{"text": data.texts[i], "label": c} for c in chosen for i in by_class[c][:shots]]


def percentiles(seconds: list[float]) -> dict:
    ms = 1000 * np.asarray(seconds)
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a metanlp model folder (default: ProtoNet on "
                                                                 "the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--requests", type=int, default=200, help="cached predictions per concurrency level")
    parser.add_argument("--load", type=int, default=2000, help="requests of the bounded load, concurrency 8")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving")
    args = parser.parse_args()
    import httpx

    scratch = Path(tempfile.mkdtemp(prefix="metanlp-serving-"))
    model = args.model
    if model is None:
        from metanlp.config import EncoderConfig
        from metanlp.learners import build_learner, save_learner

        model = scratch / "model"
        save_learner(build_learner("protonet", EncoderConfig()), model)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "metanlp.cli", "serve", "--model", str(model), "--port", str(port),
                               "--cache-size", "8", "--max-rows", "2000", "--max-chars", "2000"], env=env)
    base = f"http://127.0.0.1:{port}"
    results: dict = {"model": str(args.model or "protonet on all-MiniLM-L6-v2 (not meta-trained)")}
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            for _ in range(600):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            results["rss_mib_idle"] = rss_mib(server.pid)
            tasks = {}
            for name, (ways, shots) in {"5-way 5-shot": (5, 5), "77-way 10-shot": (77, 10)}.items():
                started = time.perf_counter()
                answer = client.post("/tasks", json={"support": support(ways, shots)})
                answer.raise_for_status()
                tasks[name] = answer.json()["task_id"]
                results[f"create {name}"] = {"seconds": time.perf_counter() - started,
                                             "adapt_ms": answer.json()["adapt_ms"]}
            query = {"texts": ["how do i transfer money to my savings account"]}

            def predict(task: str) -> float:
                started = time.perf_counter()
                client.post(f"/tasks/{task}/predict", json=query).raise_for_status()
                return time.perf_counter() - started

            for name, task in tasks.items():
                for concurrency in (1, 8):
                    predict(task)  # warm
                    with ThreadPoolExecutor(concurrency) as pool:
                        seconds = list(pool.map(predict, [task] * args.requests))
                    results[f"predict {name} c={concurrency}"] = percentiles(seconds)
            errors, started = 0, time.perf_counter()

            def load(i: int) -> bool:
                body = {"support": [{"text": f"example {i % 16} a", "label": "a"},
                                    {"text": f"example {i % 16} b", "label": "b"}]} if i % 10 == 0 else None
                try:
                    if body is not None:  # every tenth request makes (or finds) one of 16 tasks: LRU of 8
                        client.post("/tasks", json=body).raise_for_status()
                    else:
                        client.post(f"/tasks/{tasks['5-way 5-shot']}/predict", json=query).raise_for_status()
                    return True
                except httpx.HTTPError:
                    return False

            with ThreadPoolExecutor(8) as pool:
                errors = sum(not ok for ok in pool.map(load, range(args.load)))
            health = client.get("/health").json()
            results["load"] = {"requests": args.load, "concurrency": 8, "errors": errors,
                               "seconds": time.perf_counter() - started, "tasks_adapted": health["tasks_adapted"],
                               "rss_mib_after": rss_mib(server.pid)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = ["| measurement | p50 ms | p95 ms | p99 ms | requests |", "|---|---|---|---|---|"]
    for key, value in results.items():
        if key.startswith("predict"):
            lines.append(f"| {key} | {value['p50_ms']:.1f} | {value['p95_ms']:.1f} | {value['p99_ms']:.1f} | "
                         f"{value['n']} |")
    lines += ["", "| task creation | seconds (request) | adapt ms |", "|---|---|---|"]
    lines += [f"| {k.removeprefix('create ')} | {v['seconds']:.2f} | {v['adapt_ms']:.0f} |"
              for k, v in results.items() if k.startswith("create")]
    load_result = results["load"]
    lines += ["", f"Load: {load_result['requests']} requests at concurrency 8 in {load_result['seconds']:.1f} s, "
              f"{load_result['errors']} errors; {load_result['tasks_adapted']} tasks in memory (cache 8); server RSS "
              f"{results['rss_mib_idle']:.0f} MiB idle, {load_result['rss_mib_after']:.0f} MiB after."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
