"""The Prefect flows. Training (`metanlp-train`): validate -> build_corpus -> pretrain -> tune -> meta_train ->
evaluate -> register -> summary, each a cached, retried task around the plain stage function of
`metanlp.stages`; in a DVC project the flow ends by committing the outputs to DVC, as `dvc repro` would
have. Scoring (`metanlp-score`): `metanlp.scoring.score_file` as a retried task.

Caching is by content: a stage's key hashes its slice of params.yaml, the bytes of the files it reads and
the metanlp source code, so a re-run with nothing changed takes every stage from the cache, and a change
reruns the stages that read it and those downstream of their outputs (the same rule `dvc repro` applies).
A stage whose outputs were deleted runs again even if its key is cached. Transient failures are retried
with exponential backoff; bad input (a failed validation, a wrong parameter) fails at once.

Prefect's home, database and results live under the project's .prefect/ unless PREFECT_HOME and
PREFECT_LOCAL_STORAGE_PATH say otherwise (`metanlp.runtime.apply_environment_defaults`, called by the entry
points before Prefect is imported).

A deployment on a work pool names its flow by module path (`metanlp.pipeline.train_flow`,
`metanlp.pipeline.score_flow`), so a `prefect worker` anywhere metanlp is installed can run it: the module
builds the flow when the worker asks for it, not at import.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import ValidationError

from metanlp.data.load import DataError
from metanlp.runtime import ProjectBusy, project_lock
from metanlp.stages import Stage, StageError, file_digest, load_params, params_slice, stages
from metanlp.stages.common import corpus_file


def stage_inputs(stage: Stage, params, root: Path) -> list[Path]:
    """The files a stage reads besides params.yaml: its declared deps and the files its params name."""
    return [root / dep for dep in stage.deps] + (stage.inputs(params, root) if stage.inputs else [])


def code_version() -> str:
    package = Path(__file__).resolve().parent
    digest = hashlib.md5()
    for file in sorted(package.rglob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def stage_cache_key(name: str, params_file: str, root: str) -> str:
    """The stage's params slice, the bytes of every file it reads and the code: equal keys, equal results."""
    from metanlp.tracking import tracking_uri

    stage, params, root_path = stages()[name], load_params(params_file), Path(root)
    inputs = {str(p.relative_to(root_path) if p.is_relative_to(root_path) else p): file_digest(p)
              for p in stage_inputs(stage, params, root_path)}
    key = {"stage": name, "params": params_slice(params, stage.params), "inputs": inputs, "code": code_version()}
    if stage.tracks:  # it writes to a tracking server: another server is another result
        key["tracking"] = tracking_uri(params.register_.tracking_uri, root_path)
    return f"{name}-" + hashlib.md5(json.dumps(key, sort_keys=True).encode()).hexdigest()


def run_stage(name: str, params_file: str, root: str) -> dict:
    """Run one stage in this process: what `metanlp stage NAME`, dvc.yaml's commands and the flow's tasks do."""
    if name not in stages():
        raise DataError(f"unknown stage {name!r}; choose from {list(stages())}")
    return stages()[name].run(load_params(params_file), Path(root))


def is_transient(task, task_run, state) -> bool:
    """Retry what may pass next time (I/O, a busy database); never bad input, which fails the same way."""
    error = getattr(state, "data", None)
    return not isinstance(error, StageError | DataError | ValidationError | ProjectBusy)


def ensure_raw_data(params_file: Path, root: Path) -> None:
    """On a fresh clone the raw corpus is a DVC-tracked folder not yet in the work tree: check it out from
    the project's DVC remote (kept inside the repository, so this works offline)."""
    params = load_params(params_file)
    if all(path.exists() for path in corpus_file(params, root)) or not (root / "data.dvc").exists():
        return
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.pull(targets=[str(root / "data.dvc")])


def record_in_dvc(root: Path) -> str:
    """What `dvc commit` does after stages run outside `dvc repro`: their outputs go to the DVC cache and
    dvc.lock records them, so DVC agrees with this run (`dvc status` up to date; an output equal to what
    dvc.lock names leaves it as it was). Only the pipeline's stages: a raw corpus edited without `dvc add` is
    not versioned behind the user's back. A folder that is not a DVC project is left alone."""
    if not (root / "dvc.yaml").exists() or not (root / ".dvc").is_dir():
        return "not a DVC project: nothing recorded"
    import subprocess
    import sys

    # DVC's command, in the project: its API resolves the run cache against the working directory
    done = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", "dvc.yaml"], cwd=root,
                          capture_output=True, text=True)
    if done.returncode:  # e.g. a `dvc repro` holding DVC's lock: the run's results stand
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return f"outputs not recorded in DVC ({reason[0]}); `dvc commit dvc.yaml` records them"
    return "outputs recorded in dvc.lock and the DVC cache (`dvc status` is up to date)"


def retried(function, **options):
    """`function` as a Prefect task retried with exponential backoff, on transient failures only."""
    from prefect import task
    from prefect.tasks import exponential_backoff

    return task(function, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                retry_jitter_factor=0.5, retry_condition_fn=is_transient, **options)


def build_flow():
    """The flow object (built on call, so importing this module starts nothing)."""
    from prefect import flow

    def cache_key(context, parameters) -> str:
        return stage_cache_key(parameters["name"], parameters["params_file"], parameters["root"])

    stage_task = retried(run_stage, cache_key_fn=cache_key, persist_result=True, result_serializer="json")

    @flow(name="metanlp-train", log_prints=True)
    def train_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
        """Validate the corpus, build the splits, tune, meta-train, evaluate and register a model."""
        root_path = Path(root).resolve()
        params_path = Path(params_file) if Path(params_file).is_absolute() else root_path / params_file
        load_params(params_path)  # a wrong parameter stops the flow before any task
        with project_lock(root_path, "a `metanlp run`"):  # a second run in this project refuses, naming this one
            return run_stages(root_path, params_path)

    def run_stages(root_path: Path, params_path: Path) -> dict:
        ensure_raw_data(params_path, root_path)
        results, pipeline = {}, stages()
        for number, (name, stage) in enumerate(pipeline.items(), start=1):
            missing = not all((root_path / path).exists() for path in stage.done)
            print(f"stage {number} of {len(pipeline)}: {name}")
            state = stage_task.with_options(name=name, refresh_cache=missing or None)(
                name, str(params_path), str(root_path), return_state=True)
            results[name] = state.result()  # raises the stage's error
            if state.name == "Cached":
                print(f"stage {name}: cached (its params, inputs and code are unchanged)")
        results["dvc"] = record_in_dvc(root_path)
        print(f"dvc: {results['dvc']}")
        return results

    return train_flow


def build_scoring_flow():
    """The batch-scoring flow: a file of texts labelled by a model adapted to a support set (the code path of
    `metanlp predict --out`), for scheduled scoring."""
    from prefect import flow

    from metanlp.scoring import score_file

    score_task = retried(score_file, name="score")

    @flow(name="metanlp-score", log_prints=True)
    def score_flow(model: str, support: str, texts: str, out: str, top: int = 3, text_column: str = "text",
                   label_column: str = "label", batch_size: int = 256, tracking_uri: str | None = None) -> dict:
        """Adapt the model (a folder or models:/NAME@ALIAS) to the support set and label every text of `texts`."""
        summary = score_task(model, support, texts, out, top=top, text_column=text_column,
                             label_column=label_column, batch_size=batch_size, tracking_uri=tracking_uri,
                             show_progress=False)
        print(f"scored {summary.texts} texts with model version {summary.model_version} into {summary.out}")
        return summary.as_dict()

    return score_flow


FLOWS = {"train_flow": build_flow, "score_flow": build_scoring_flow}  # module-level names a worker imports


def __getattr__(name: str):
    """`metanlp.pipeline.train_flow` / `score_flow`: the flow a work pool's worker loads (an entry point, so the
    offline and no-telemetry defaults are set here, as the CLI sets them)."""
    if name not in FLOWS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from metanlp.runtime import apply_environment_defaults

    apply_environment_defaults()
    return FLOWS[name]()


def deployment(job: str, name: str, cron: str, timezone: str, parameters: dict, pool: str | None = None):
    """A scheduled deployment of the retraining (`retrain`) or batch-scoring (`score`) flow, served by a
    Prefect runner (`metanlp schedule`), or, with `pool`, run by that work pool's workers."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.types.entrypoint import EntrypointType

    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValueError as err:
        raise DataError(f"--cron {cron!r}: {err}") from err
    flows = {"retrain": (build_flow, "scheduled retraining: the whole metanlp pipeline"),
             "score": (build_scoring_flow, "scheduled batch scoring of a file of texts")}
    if job not in flows:
        raise DataError(f"--job {job!r}: choose from {list(flows)}")
    build, description = flows[job]
    # a worker loads the flow by module path: metanlp installed is enough, no copy of this folder
    on_pool = {} if pool is None else {"work_pool_name": pool, "entrypoint_type": EntrypointType.MODULE_PATH}
    return build().to_deployment(name=name, schedules=[schedule], parameters=parameters, description=description,
                                 **on_pool)


def ensure_work_pool(name: str) -> bool:
    """A process work pool called `name` on the Prefect server (created if missing; True when created).
    A pool of another type is refused: its workers would not run a local process."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True
    if pool.type != "process":
        raise DataError(f"--pool {name!r}: a {pool.type!r} work pool; metanlp deploys to process pools "
                        f"(create one: prefect work-pool create NAME --type process)")
    return False
