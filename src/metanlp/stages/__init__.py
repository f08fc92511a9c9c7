"""The pipeline's stages, in data order:

    raw corpus (data/, tracked by data.dvc)
      -> validate      Great Expectations suite, report in artifacts/validation/
      -> build_corpus  class-disjoint train/val/test files in artifacts/corpus/
      -> pretrain      optional MLM / SMLMT / hybrid pretraining, artifacts/pretrained/
      -> tune          Optuna study, best values in artifacts/tune/
      -> meta_train    the meta-trained learner in artifacts/model/
      -> evaluate      every method on the same episodes, artifacts/evaluation/
      -> register      MLflow run, registered version and guarded promotion, artifacts/registry.json
      -> summary       the run's closing summary, artifacts/summary.md

What one run of a stage did (MLflow run ids, database URLs, timings, absolute paths) goes to its run records
(`Stage.records`, under artifacts/runs/), never to its DVC outputs, so the two runners write the same outputs.

Each stage is one module of this package declaring `STAGE` (`common.Stage`): its name, the params.yaml keys
it reads, the files it reads and writes, and its run function `run(params, root) -> dict`. Everything else is
made from the declarations: `metanlp stage NAME`, the Prefect tasks and their cache keys (`pipeline`), and
dvc.yaml (`dvc_yaml`, checked against the committed file by a test). The order is the data order: a stage
runs after the stages whose outputs it reads. A new stage is a new module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from metanlp.atomic import file_digest
from metanlp.stages.common import (
    SOURCE_DIR,
    Stage,
    StageError,
    Workspace,
    load_params,
    params_slice,
    read_json,
    write_json,
)

_HELPERS = {"common"}


def _declared() -> list[Stage]:
    stages = []
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name not in _HELPERS:
            declared = getattr(importlib.import_module(f"{__name__}.{module.name}"), "STAGE", None)
            if isinstance(declared, Stage):
                stages.append(declared)
    return stages


def _produces(stage: Stage, path: str) -> bool:
    return any(path == out or path.startswith(out.rstrip("/") + "/") or out.startswith(path.rstrip("/") + "/")
               for out in (*stage.outs, *stage.uncached, *stage.metrics))


def data_order(stages: list[Stage]) -> list[Stage]:
    """Stages sorted so that each comes after those whose outputs it reads (ties by name)."""
    after = {s.name: {o.name for o in stages if o is not s and any(_produces(o, d) for d in s.deps)}
             for s in stages}
    ordered, placed = [], set()
    while len(ordered) < len(stages):
        ready = sorted(s.name for s in stages if s.name not in placed and after[s.name] <= placed)
        if not ready:
            raise RuntimeError(f"stages read each other's outputs in a loop: {sorted(set(after) - placed)}")
        ordered.append(next(s for s in stages if s.name == ready[0]))
        placed.add(ready[0])
    return ordered


def stages() -> dict[str, Stage]:
    """Every declared stage by name, in data order."""
    return {stage.name: stage for stage in data_order(_declared())}


def named_files(stage: Stage, params, root: Path) -> list[str]:
    """The files params.yaml names for a stage (a task pool's datasets, pretraining text) that lie outside its
    declared deps, relative to the project: dvc.yaml lists them, so DVC sees their contents change too."""
    import os

    if stage.inputs is None:
        return []
    root = root.resolve()
    declared = [(root / dep).resolve() for dep in stage.deps]
    return sorted({os.path.relpath(path, root) for path in stage.inputs(params, root)
                   if not any(path == dep or path.is_relative_to(dep) for dep in declared)})


def dvc_yaml(params=None, root: Path | None = None) -> str:
    """dvc.yaml as the declarations say it for `params` (default: the default params) in the project at `root`
    (`metanlp dvc-yaml` writes it; a test checks the committed one)."""
    import yaml

    from metanlp.config import PipelineParams

    params, root = params if params is not None else PipelineParams(), root or Path.cwd()
    entries, plots = {}, []
    for stage in stages().values():
        entry = {"cmd": f"metanlp stage {stage.name}",
                 "deps": [*stage.deps, *named_files(stage, params, root), SOURCE_DIR], "params": list(stage.params)}
        outs = [*stage.outs, *({path: {"cache": False}} for path in stage.uncached)]
        if outs:
            entry["outs"] = outs
        if stage.metrics:
            entry["metrics"] = [{path: {"cache": False}} for path in stage.metrics]
        entries[stage.name] = entry
        plots += stage.plots
    header = ("# Generated from the stage declarations in src/metanlp/stages/ by `metanlp dvc-yaml`; do not edit.\n"
              "# `dvc repro` runs the same stages as `metanlp run` (Prefect), with the same params keys and files.\n")
    return header + yaml.safe_dump({"stages": entries, "plots": plots}, sort_keys=False, width=120)


__all__ = ["SOURCE_DIR", "Stage", "StageError", "Workspace", "data_order", "dvc_yaml", "file_digest", "load_params",
           "params_slice", "read_json", "stages", "write_json"]
