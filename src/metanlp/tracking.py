"""Where MLflow records runs and models: an absolute sqlite URI under the project's mlflow/ by default
(never the file store), any tracking URI by params or MLFLOW_TRACKING_URI."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def tracking_uri(configured: str | None, root: Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = (root / "mlflow").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


@contextmanager
def tracking(configured: str | None, root: Path, experiment: str):
    """Point MLflow at the store and the experiment for the block; yields the experiment id.

    MLflow keeps its URI in process-wide state and in MLFLOW_TRACKING_URI; both are restored afterwards,
    so one process can run pipelines of several projects. With a local sqlite store the artifacts go beside
    it (mlflow/artifacts), not to ./mlruns of whatever folder the command ran in.
    """
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri(configured, root)
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            yield found.experiment_id
        else:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
            yield mlflow.create_experiment(experiment, artifact_location=location)
    finally:
        mlflow.set_tracking_uri(previous)
