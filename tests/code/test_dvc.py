"""DVC in a temporary git repository: dvc.yaml runs every stage, a second `dvc repro` has nothing to do,
and a replaced corpus added with `dvc add` is a new data version that the next run records. dvc.yaml and
the Prefect cache keys read the same params keys and files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_params
from metanlp.data.load import default_corpus_path
from metanlp.pipeline import stage_inputs
from metanlp.stages import dvc_yaml, load_params, stages


def dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=root, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_dvc_yaml_is_generated_from_the_stage_declarations():
    """dvc.yaml, the Prefect tasks and their cache keys come from one declaration per stage."""
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(load_params(REPO / "params.yaml"), REPO), \
        "run `metanlp dvc-yaml` after changing a stage"
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(declared) == list(stages()) == ["validate", "build_corpus", "pretrain", "tune", "meta_train",
                                                 "evaluate", "register", "summary"]
    params = load_params(REPO / "params.yaml")
    for name, stage in stages().items():
        assert declared[name]["params"] == list(stage.params), name
        reads = {str(p.relative_to(REPO)) for p in stage_inputs(stage, params, REPO)}
        assert {d for d in declared[name]["deps"] if d != "src/metanlp"} <= reads, name
        outs = {next(iter(o)) if isinstance(o, dict) else o
                for key in ("outs", "metrics") for o in declared[name].get(key, [])}
        for path in stage.done:  # what a stage must leave is an output or one of its run records
            assert any(path.startswith(out) for out in outs) or path in stage.records, (name, path)
        for path in stage.records:  # run records (paths, run ids, timings) are no DVC output
            assert not any(path.startswith(out) or out.startswith(path) for out in outs), (name, path)


def test_a_stage_reading_its_own_successor_is_a_loop():
    from metanlp.stages import Stage, data_order

    first = Stage(name="a", run=lambda p, r: {}, params=(), deps=("b.json",), outs=("a.json",), done=())
    second = Stage(name="b", run=lambda p, r: {}, params=(), deps=("a.json",), outs=("b.json",), done=())
    with pytest.raises(RuntimeError, match="in a loop"):
        data_order([first, second])


GIT = ["git", "-c", "user.name=metanlp-test", "-c", "user.email=test@localhost"]


def git_project(root: Path, **params) -> str:
    """A git repository with the embedded corpus under DVC, the code, dvc.yaml and a tiny params.yaml,
    committed; returns the commit."""
    (root / "data").mkdir(parents=True)
    shutil.copy(default_corpus_path(), root / "data" / "corpus.jsonl")
    shutil.copytree(REPO / "src" / "metanlp", root / "src" / "metanlp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for ignores in (".gitignore", "artifacts/.gitignore", "artifacts/evaluation/.gitignore"):
        (root / ignores).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / ignores, root / ignores)
    write_params(root, **params)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "add", "-q", "data")
    return commit_all(root, "project")


def commit_all(root: Path, message: str) -> str:
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
def test_dvc_repro_runs_then_is_up_to_date_then_records_a_new_data_version(tmp_path):
    root = tmp_path / "repo"
    head = git_project(root, tune={"enabled": False})
    first_version = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]

    dvc(root, "repro")
    record = yaml.safe_load((root / "artifacts" / "registry.json").read_text())
    assert record["version"] == "1" and record["data_dvc_md5"] == first_version
    where = yaml.safe_load((root / "artifacts" / "runs" / "register.json").read_text())  # the run record
    assert where["git_commit"] == head  # what the pipeline writes itself does not make the tree dirty
    assert (root / "dvc.lock").exists()
    assert "Data and pipelines are up to date" in dvc(root, "repro")

    corpus = root / "data" / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join(lines[:-3]) + "\n")  # a new corpus version: 3 rows of a test class fewer
    dvc(root, "add", "-q", "data")
    second_version = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    assert second_version != first_version
    assert "validate" in dvc(root, "status")
    dvc(root, "repro")
    record = yaml.safe_load((root / "artifacts" / "registry.json").read_text())
    assert record["data_dvc_md5"] == second_version
    # the rows removed were test rows: training made the same model, which is not registered a second time
    assert record["version"] == "1" and "identical to v1" in record["reason"]


@pytest.mark.slow
def test_metanlp_run_on_a_fresh_clone_leaves_dvc_repro_nothing_to_do(tmp_path):
    """The two runners agree on outputs: a project whose dvc.lock came from `dvc repro`, cloned elsewhere
    (another absolute path, an empty registry and study), run by the Prefect flow as `metanlp run` does, is up
    to date for DVC and git; its paths, run ids and timings stay in git-ignored run records."""
    from prefect.testing.utilities import prefect_test_harness

    from metanlp.pipeline import build_flow

    first = tmp_path / "first"
    git_project(first, tune={"trials": 2})
    dvc(first, "remote", "add", "-d", "store", str(tmp_path / "store"))  # the project's DVC remote
    dvc(first, "repro")
    dvc(first, "push", "-q", "data.dvc")
    commit_all(first, "dvc.lock and metrics from dvc repro")
    lock = (first / "dvc.lock").read_text()
    clone = tmp_path / "elsewhere" / "clone"
    subprocess.run(["git", "clone", "-q", str(first), str(clone)], check=True)
    dvc(clone, "pull", "-q", "data.dvc")  # the README's set-up on a fresh clone
    assert "deleted" in dvc(clone, "status")  # nothing has run here yet

    with prefect_test_harness(server_startup_timeout=60):
        result = build_flow()(params_file=str(clone / "params.yaml"), root=str(clone))
    assert result["register"]["version"] == "1" and result["register"]["promoted"]
    assert "recorded in dvc.lock" in result["dvc"] and (clone / "dvc.lock").read_text() == lock
    assert "Data and pipelines are up to date" in dvc(clone, "status")
    assert "Data and pipelines are up to date" in dvc(clone, "repro")
    tracked = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert tracked == ""  # metrics.json is the same; run records are ignored
    runs = json.loads((clone / "artifacts" / "runs" / "evaluate.json").read_text())
    assert all(m["adapt_ms"] > 0 for methods in runs.values() for m in methods.values())
    assert str(clone) in (clone / "artifacts" / "runs" / "register.json").read_text()
