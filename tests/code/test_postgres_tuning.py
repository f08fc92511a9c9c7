"""Tuning on a real PostgreSQL (Debian's package, started here in a temporary folder on 127.0.0.1): two workers
(`metanlp tune --workers 2`) share one Optuna study; every trial of the budget is recorded exactly once, with
distinct values, and the best values written are the study's best."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from conftest import write_params
from metanlp.cli import app
from metanlp.stages import load_params, stages
from metanlp.stages.tune import OVER_BUDGET, study_name


def postgres_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} is missing: install Debian's postgresql package (.ci/run does)")
    return found


def as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: then its own user runs it."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres_url():
    # not under pytest's tmp_path: its parents are private to root, and the server runs as its own user
    folder = Path(tempfile.mkdtemp(prefix="metanlp-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, log = folder / "data", folder / "server.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(as_server_user([postgres_binary("initdb"), "-D", str(data), "-U", "metanlp", "--auth=trust",
                                   "-E", "UTF8"]), check=True, capture_output=True)
    pg_ctl = postgres_binary("pg_ctl")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
    subprocess.run(as_server_user([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]),
                   check=True, capture_output=True)
    try:
        subprocess.run(as_server_user([postgres_binary("createdb"), "-h", "127.0.0.1", "-p", str(port),
                                       "-U", "metanlp", "optuna"]), check=True, capture_output=True)
        yield f"postgresql://metanlp@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(as_server_user([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_one_study_on_postgresql(tiny_project, postgres_url):
    write_params(tiny_project, tune={"trials": 4, "episodes": 4, "val_every": 2, "val_episodes": 3,
                                     "storage": postgres_url})
    params = load_params(tiny_project / "params.yaml")
    for name in ("validate", "build_corpus", "pretrain"):
        stages()[name].run(params, tiny_project)
    result = CliRunner().invoke(app, ["tune", "--params", str(tiny_project / "params.yaml"), "--workers", "2",
                                      "--quiet"])
    assert result.exit_code == 0, result.output

    study = optuna.load_study(study_name=study_name(params, tiny_project), storage=postgres_url)
    counted = [t for t in study.trials if not t.user_attrs.get(OVER_BUDGET)]
    assert sorted(t.number for t in counted) == [0, 1, 2, 3]  # each trial of the budget once
    assert all(t.state.is_finished() for t in counted)
    assert len({json.dumps(t.params, sort_keys=True) for t in counted}) == 4
    best = json.loads((tiny_project / "artifacts" / "tune" / "best.json").read_text())
    assert best["best_value"] == study.best_value and best["overrides"] == study.best_params
    where = json.loads((tiny_project / "artifacts" / "runs" / "tune.json").read_text())  # the run record
    assert where["storage"].startswith("postgresql://metanlp@127.0.0.1") and "storage" not in best
    assert not Path(tiny_project / "artifacts" / "optuna.db").exists()  # nothing went to the sqlite default
