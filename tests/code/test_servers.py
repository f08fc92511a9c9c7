"""The pipeline against real servers on 127.0.0.1: `mlflow server` on a temporary sqlite database and
`prefect server start` with a temporary home. The flow runs against both; the registry then holds the
champion, and `metanlp schedule` leaves deployments (retraining, batch scoring) with their cron schedules on the
Prefect server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(command: list[str], health: str, env: dict, log: Path, timeout: float = 120) -> Iterator[None]:
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[0]} exited {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(health, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{command[0]} did not answer {health} in {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def server_env(tmp_path: Path) -> dict:
    """The servers' and their clients' environment: a temporary Prefect home, no UI, no telemetry, and no
    Prefect server named yet."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("PREFECT_API_URL", None)
    return env


@contextmanager
def prefect_server(env: dict, log: Path) -> Iterator[str]:
    """A real `prefect server start` on a free port of 127.0.0.1; yields its API URL."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    with server([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                f"{api}/health", env, log):
        yield api


@pytest.mark.slow
def test_flow_against_real_mlflow_and_prefect_servers(tiny_project, tmp_path):
    mlflow_port = free_port()
    env = server_env(tmp_path)
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    with server([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                 "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                 "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                f"{mlflow_url}/health", env, tmp_path / "mlflow.log"), \
         prefect_server(env, tmp_path / "prefect.log") as prefect_api:
        client_env = {**env, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_url}
        params = str(tiny_project / "params.yaml")
        done = subprocess.run([str(BIN / "metanlp"), "run", "--params", params], env=client_env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        assert "v1 is champion" in done.stdout and f"at `{mlflow_url}`" in done.stdout  # the closing summary

        registry = MlflowClient(tracking_uri=mlflow_url)
        champion = registry.get_model_version_by_alias("metanlp-classifier", "champion")
        assert str(champion.version) == "1"
        assert not (tiny_project / "mlflow" / "mlflow.db").exists()  # nothing went to the local default

        runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={}).json()
        assert [r["state"]["type"] for r in runs] == ["COMPLETED"]

        scheduled = subprocess.run([str(BIN / "metanlp"), "schedule", "--cron", "0 3 * * 0", "--no-serve",
                                    "--params", params], env=client_env, capture_output=True, text=True,
                                   timeout=300)
        assert scheduled.returncode == 0, scheduled.stderr[-3000:]
        deployment = httpx.get(f"{prefect_api}/deployments/name/metanlp-train/retrain").json()
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 0"]
        assert deployment["parameters"]["params_file"] == params

        scoring = subprocess.run([str(BIN / "metanlp"), "schedule", "--job", "score", "--cron", "0 6 * * *",
                                  "--no-serve", "--params", params, "--model", "models:/metanlp-classifier@champion",
                                  "--support", str(tiny_project / "data" / "corpus.jsonl"),
                                  "--texts", str(tiny_project / "data" / "corpus.jsonl"),
                                  "--out", str(tmp_path / "scores.jsonl")],
                                 env=client_env, capture_output=True, text=True, timeout=300)
        assert scoring.returncode == 0, scoring.stderr[-3000:]
        deployment = httpx.get(f"{prefect_api}/deployments/name/metanlp-score/score").json()
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 6 * * *"]
        assert deployment["parameters"]["model"] == "models:/metanlp-classifier@champion"


@pytest.mark.slow
def test_a_prefect_worker_runs_the_retraining_deployment_of_a_work_pool(tiny_project, tmp_path):
    from metanlp.tracking import tracking_uri

    env = server_env(tmp_path)
    with prefect_server(env, tmp_path / "prefect.log") as api:
        client_env = {**env, "PREFECT_API_URL": api}
        scheduled = subprocess.run([str(BIN / "metanlp"), "schedule", "--pool", "metanlp-pool", "--params",
                                    str(tiny_project / "params.yaml")], env=client_env, capture_output=True,
                                   text=True, timeout=300)
        assert scheduled.returncode == 0, scheduled.stderr[-3000:]
        assert "created process work pool 'metanlp-pool'" in scheduled.stdout
        deployment = httpx.get(f"{api}/deployments/name/metanlp-train/retrain").json()
        assert deployment["work_pool_name"] == "metanlp-pool"
        assert deployment["entrypoint"] == "metanlp.pipeline.train_flow"  # loadable wherever metanlp is installed
        created = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=60)
        # a failure says what the server answered (once, in CI under load, the answer had no flow run id)
        server_log = (tmp_path / "prefect.log").read_text()[-3000:] if not created.is_success else ""
        assert created.is_success, f"{created.status_code}: {created.text[-2000:]}\n{server_log}"
        flow_run = created.json()

        log = tmp_path / "worker.log"
        with log.open("w") as out:
            worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "metanlp-pool"],
                                      env=client_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline, state = time.monotonic() + 900, None
            while time.monotonic() < deadline:
                state = httpx.get(f"{api}/flow_runs/{flow_run['id']}").json()["state"]
                if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                assert worker.poll() is None, log.read_text()[-3000:]
                time.sleep(2)
        finally:
            os.killpg(worker.pid, 15)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a worker may wait out its polling before it heeds SIGTERM
                os.killpg(worker.pid, 9)
                worker.wait(timeout=30)
        assert state is not None and state["type"] == "COMPLETED", f"{state}\n{log.read_text()[-4000:]}"

    registry = MlflowClient(tracking_uri=tracking_uri(None, tiny_project))
    assert str(registry.get_model_version_by_alias("metanlp-classifier", "champion").version) == "1"
