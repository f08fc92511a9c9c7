"""Latency on loopback, side by side in one run: `metanlp serve` and the same model as the MLflow pyfunc under
`mlflow models serve` (--env-manager local), one after the other. For each: cold task creation (5-way 5-shot
and 77-way 10-shot from CLINC150) and cached predictions of one text by task id, p50/p95/p99 at concurrency 1
and 8; then, for `metanlp serve`, a bounded load (requests in total, concurrency 8) counting errors and the
server's memory before and after.

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


def rss_mib(group: int) -> float:
    """Resident memory of a process group (the server and any process it started, e.g. mlflow's uvicorn)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:  # the process group id
                status = (stat.parent / "status").read_text()
                total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration, IndexError, ValueError):
            continue  # gone meanwhile, or a kernel thread
    return total / 1024


def support(classes: int, shots: int) -> list[dict]:
    data = load_labelled(SHARED / "clinc150" / "train.jsonl")
    chosen = [c for c in data.classes if c != "oos"][:classes]
    by_class = data.indices_by_class()
    return [{"text": data.texts[i], "label": c} for c in chosen for i in by_class[c][:shots]]


def percentiles(seconds: list[float]) -> dict:
    ms = 1000 * np.asarray(seconds)
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


class MetanlpServe:
    """`metanlp serve`: tasks by POST /tasks, predictions by POST /tasks/{id}/predict."""

    name = "metanlp serve"

    def command(self, model: Path, scratch: Path, port: int) -> list[str]:
        return [sys.executable, "-m", "metanlp.cli", "serve", "--model", str(model), "--port", str(port),
                "--cache-size", "8", "--max-rows", "2000", "--max-chars", "2000"]

    health = "/health"

    def create(self, client, rows: list[dict]) -> tuple[str, float | None]:
        answer = client.post("/tasks", json={"support": rows})
        answer.raise_for_status()
        return answer.json()["task_id"], answer.json()["adapt_ms"]

    def predict(self, client, task: str, text: str) -> None:
        client.post(f"/tasks/{task}/predict", json={"texts": [text]}).raise_for_status()


class MlflowModelsServe:
    """The registered pyfunc under `mlflow models serve` (local env): a support set with one query makes the
    task; later requests send the query row alone with `params: {task_id}`."""

    name = "mlflow models serve"
    health = "/health"

    def command(self, model: Path, scratch: Path, port: int) -> list[str]:
        import mlflow

        from metanlp.serving import pyfunc_arguments

        packaged = scratch / "pyfunc"
        if not packaged.exists():
            mlflow.pyfunc.save_model(path=str(packaged), **pyfunc_arguments(model))
        return [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(packaged), "--env-manager",
                "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]

    @staticmethod
    def body(texts: list[str], labels: list[str], task: str | None = None) -> dict:
        rows = [[text, label] for text, label in zip(texts, labels, strict=True)]
        frame = {"dataframe_split": {"columns": ["text", "label"], "data": rows}}
        return {**frame, "params": {"task_id": task}} if task else frame

    def create(self, client, rows: list[dict]) -> tuple[str, float | None]:
        texts, labels = [r["text"] for r in rows] + ["hello"], [r["label"] for r in rows] + [""]
        answer = client.post("/invocations", json=self.body(texts, labels))
        answer.raise_for_status()
        return answer.json()["predictions"][0]["task_id"], None

    def predict(self, client, task: str, text: str) -> None:
        client.post("/invocations", json=self.body([text], [""], task)).raise_for_status()


def measure(backend, model: Path, scratch: Path, args, load: bool) -> dict:
    import httpx

    port = free_port()
    # mlflow models serve execs `uvicorn` by name: the environment's scripts must be on PATH
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(backend.command(model, scratch, port), env=env, start_new_session=True)
    results: dict = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for _ in range(1200):
                if server.poll() is not None:
                    raise SystemExit(f"{backend.name} exited with {server.returncode} before answering")
                try:
                    if client.get(backend.health).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            results["rss_mib_idle"] = rss_mib(server.pid)
            tasks = {}
            for name, (ways, shots) in {"5-way 5-shot": (5, 5), "77-way 10-shot": (77, 10)}.items():
                started = time.perf_counter()
                tasks[name], adapt_ms = backend.create(client, support(ways, shots))
                results[f"create {name}"] = {"seconds": time.perf_counter() - started, "adapt_ms": adapt_ms}
            query = "how do i transfer money to my savings account"

            def predict(task: str) -> float:
                started = time.perf_counter()
                backend.predict(client, task, query)
                return time.perf_counter() - started

            for name, task in tasks.items():
                for concurrency in (1, 8):
                    predict(task)  # warm
                    with ThreadPoolExecutor(concurrency) as pool:
                        seconds = list(pool.map(predict, [task] * args.requests))
                    results[f"predict {name} c={concurrency}"] = percentiles(seconds)
            if load:
                results["load"] = bounded_load(client, tasks["5-way 5-shot"], query, args.load)
                results["load"]["rss_mib_after"] = rss_mib(server.pid)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    return results


def bounded_load(client, task: str, query: str, requests: int) -> dict:
    """`requests` at concurrency 8; every tenth makes (or finds) one of 16 two-class tasks, so the LRU of 8 is
    exercised; the rest predict on `task`."""
    import httpx

    def one(i: int) -> bool:
        try:
            if i % 10 == 0:
                body = {"support": [{"text": f"example {i % 16} a", "label": "a"},
                                    {"text": f"example {i % 16} b", "label": "b"}]}
                client.post("/tasks", json=body).raise_for_status()
            else:
                client.post(f"/tasks/{task}/predict", json={"texts": [query]}).raise_for_status()
            return True
        except httpx.HTTPError:
            return False

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        errors = sum(not ok for ok in pool.map(one, range(requests)))
    health = client.get("/health").json()
    return {"requests": requests, "concurrency": 8, "errors": errors, "seconds": time.perf_counter() - started,
            "tasks_adapted": health["tasks_adapted"]}


def markdown(results: dict) -> list[str]:
    lines = ["| server | measurement | p50 ms | p95 ms | p99 ms | requests |", "|---|---|---|---|---|---|"]
    for server, measured in results["servers"].items():
        lines += [f"| {server} | {key} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['p99_ms']:.1f} | {v['n']} |"
                  for key, v in measured.items() if key.startswith("predict")]
    lines += ["", "| server | task creation | seconds (request) | adapt ms | RSS idle MiB |", "|---|---|---|---|---|"]
    for server, measured in results["servers"].items():
        for key, value in measured.items():
            if key.startswith("create"):
                adapt = "-" if value["adapt_ms"] is None else f"{value['adapt_ms']:.0f}"
                lines.append(f"| {server} | {key.removeprefix('create ')} | {value['seconds']:.2f} | {adapt} | "
                             f"{measured['rss_mib_idle']:.0f} |")
    load = results["servers"]["metanlp serve"].get("load")
    if load:
        lines += ["", f"Load (metanlp serve): {load['requests']} requests at concurrency 8 in {load['seconds']:.1f} s, "
                  f"{load['errors']} errors; {load['tasks_adapted']} tasks in memory (cache 8); server RSS "
                  f"{results['servers']['metanlp serve']['rss_mib_idle']:.0f} MiB idle, "
                  f"{load['rss_mib_after']:.0f} MiB after."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a metanlp model folder (default: ProtoNet on "
                                                                 "the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--requests", type=int, default=200, help="cached predictions per concurrency level")
    parser.add_argument("--load", type=int, default=2000, help="requests of the bounded load, concurrency 8")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="metanlp-serving-"))
    model = args.model
    if model is None:
        from metanlp.config import EncoderConfig
        from metanlp.learners import build_learner, save_learner

        model = scratch / "model"
        save_learner(build_learner("protonet", EncoderConfig()), model)
    results = {"model": str(args.model or "protonet on all-MiniLM-L6-v2 (not meta-trained)"), "servers": {}}
    for backend in (MetanlpServe(), MlflowModelsServe()):  # one after the other: they share the 2 cores
        results["servers"][backend.name] = measure(backend, model, scratch, args, load=backend.name == "metanlp serve")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = markdown(results)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
