"""Tuning shared by several workers: one Optuna study in one database, `tune.trials` the budget of the whole
study (not of each worker), and every worker proposing its own values (its own seed), so 2 workers and a
budget of 4 give 4 distinct trials."""

from __future__ import annotations

import json

import optuna
from typer.testing import CliRunner

from conftest import write_params
from metanlp.cli import app
from metanlp.stages import load_params, stages
from metanlp.stages.tune import OVER_BUDGET, storage_url, study_name

runner = CliRunner()


def test_two_workers_share_a_budget_of_four_trials(tiny_project):
    write_params(tiny_project, tune={"trials": 4, "episodes": 4, "val_every": 2, "val_episodes": 3})
    params = load_params(tiny_project / "params.yaml")
    for name in ("validate", "build_corpus", "pretrain"):
        stages()[name].run(params, tiny_project)
    result = runner.invoke(app, ["tune", "--params", str(tiny_project / "params.yaml"), "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "tune: trial 1 of 4 (" in result.output  # progress says which trial runs

    study = optuna.load_study(study_name=study_name(params, tiny_project),
                              storage=storage_url(params, tiny_project))
    counted = [t for t in study.trials if not t.user_attrs.get(OVER_BUDGET)]
    assert len(counted) == 4 and all(t.state.is_finished() for t in counted)
    proposals = {json.dumps(t.params, sort_keys=True) for t in counted}
    assert len(proposals) == 4  # distinct: the workers' samplers are seeded apart
    best = json.loads((tiny_project / "artifacts" / "tune" / "best.json").read_text())
    assert best["trials"] == 4 and best["trials_planned"] == 4 and not best["stopped_by_timeout"]


def test_a_killed_workers_trial_is_marked_failed_not_lost(tiny_project):
    """A worker killed in the middle of its second trial (SIGKILL at the trial's first validation; the first
    trial validates twice) leaves it 'running'; its heartbeat
    stops, and the next worker marks it failed before going on with the budget."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from metanlp.atomic import FAULT_ENV

    write_params(tiny_project, tune={"trials": 3, "episodes": 4, "val_every": 2, "val_episodes": 3,
                                     "heartbeat_s": 1})
    params = load_params(tiny_project / "params.yaml")
    for name in ("validate", "build_corpus", "pretrain"):
        stages()[name].run(params, tiny_project)
    command = [sys.executable, "-m", "metanlp.cli", "tune", "--params", str(tiny_project / "params.yaml"), "--quiet"]
    killed = subprocess.run(command, env={**os.environ, FAULT_ENV: "tune.validation@3"}, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    time.sleep(3)  # past the grace period of two heartbeats
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]

    study = optuna.load_study(study_name=study_name(params, tiny_project),
                              storage=storage_url(params, tiny_project))
    states = {t.number: t.state.name for t in study.trials if not t.user_attrs.get(OVER_BUDGET)}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE"} or states == {0: "COMPLETE", 1: "FAIL",
                                                                              2: "PRUNED"}
