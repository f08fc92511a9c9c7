"""`metanlp serve`: a small ASGI service (FastAPI) for few-shot classification with cached tasks.

    POST   /tasks               support set -> task id (adapted once; the same support again is the same task)
    POST   /tasks/{id}/predict  texts -> label, score and the top k of each
    GET    /tasks/{id}          what the task is
    DELETE /tasks/{id}
    GET    /health              model version, tasks
    GET    /docs                OpenAPI documentation

The model is a metanlp model folder or a registry URI (`models:/NAME@champion`). With a registry alias the
service looks at the alias every `poll_seconds`; when it has moved, new tasks use the new version while
requests in flight and existing tasks keep theirs (every task records its model version). Requests are
bounded (rows, characters per text, body bytes: 413 past them); a malformed request gets a 4xx whose message
names the problem and quotes at most 200 characters of it, never a stack trace.
"""

from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from metanlp.atomic import file_digest
from metanlp.data.load import quote, visible
from metanlp.learners import Learner, load_learner
from metanlp.learners.persistence import WEIGHTS_FILE
from metanlp.tasks import DEFAULT_STRATEGY, STRATEGIES, TaskError, TaskStore


class Example(BaseModel):
    """One labelled support example."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    label: StrictStr

class TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    support: list[Example] = Field(description="labelled examples, at least 2 classes")
    strategy: str = Field(DEFAULT_STRATEGY, description="adaptation strategy: " + "; ".join(
        f"'{name}': {meaning}" for name, meaning in STRATEGIES.items()))
    adapt_seconds: float | None = Field(None, gt=0, description="strategy 'contrastive': wall-clock cap of the "
                                        "encoder tuning, its held-out checks included (default 90; at most the "
                                        "server's limit)")
    adapt_top_layers: StrictInt | None = Field(None, ge=1, description="strategy 'contrastive': tune only the top "
                                               "N encoder layers (default: all; the top 2 was as accurate in half "
                                               "the time on fine-grained intents, README)")
    adapt_batches: Literal["nearest", "random"] | None = Field(
        None, description="strategy 'contrastive': the classes of a batch, at random (default) or one class and "
                          "those nearest it (hard negatives: +1 pp on 181 fine-grained intents, README)")

class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(description="texts to label")
    top_k: int = Field(1, ge=1, description="scores returned per text")


class TooLarge(TaskError):
    status = 413


@dataclass(frozen=True)
class Limits:
    max_rows: int = 1000  # support rows of a task, texts of a predict request
    max_chars: int = 2000  # characters of one text or label
    max_body_bytes: int = 2_000_000
    max_adapt_seconds: float = 300.0  # what one task may ask of the encoder tuning (`adapt_seconds`)


class ModelSource:
    """A metanlp model from a folder, or the version a registry alias points at (looked up again on `refresh`)."""

    def __init__(self, model: str, tracking_uri: str | None = None) -> None:
        self.model, self.tracking_uri = model, tracking_uri
        self.registry = model.startswith("models:/")
        self.learners: dict[str, Learner] = {}
        self.current = ""
        self._lock = threading.Lock()
        self.refresh()

    def _resolve(self) -> tuple[str, Path | None]:
        """(version, folder to load or None when that version is loaded)."""
        if not self.registry:
            if self.learners:
                return self.current, None
            # a folder's version is its weights' digest: tasks saved by another model are never restored on this one
            return f"local-{file_digest(Path(self.model) / WEIGHTS_FILE)[:12]}", Path(self.model)
        import mlflow
        from mlflow import MlflowClient

        name, _, alias = self.model.removeprefix("models:/").partition("@")
        # the registry is the tracking store given here, not whatever the process-wide default is
        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        version = str(client.get_model_version_by_alias(name, alias).version) if alias else str(
            max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
        if version in self.learners:
            return version, None
        import yaml

        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, version), tracking_uri=self.tracking_uri))
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        return version, local / flavor["artifacts"]["model"]["path"]  # the metanlp folder inside the pyfunc

    @property
    def learner(self) -> Learner:
        """The current version's learner."""
        return self.learners[self.current]

    def refresh(self) -> bool:
        """Follow the alias; True when the current version changed."""
        version, folder = self._resolve()
        if folder is not None:
            learner = load_learner(folder)
            with self._lock:
                self.learners[version] = learner
        with self._lock:
            changed, self.current = version != self.current, version
        return changed

    def release(self, keep: set[str]) -> None:
        """Drop loaded versions no task uses any more (the current one always stays)."""
        with self._lock:
            for version in [v for v in self.learners if v != self.current and v not in keep]:
                del self.learners[version]


def open_model(model: str, tracking_uri: str | None = None, root: Path | None = None) -> ModelSource:
    """A model folder, or `models:/NAME@ALIAS` in the registry at `tracking_uri` (default: MLFLOW_TRACKING_URI,
    then the project's mlflow/ under `root`)."""
    from metanlp.data.load import DataError
    from metanlp.tracking import tracking_uri as resolve_tracking_uri

    if not model.startswith("models:/") and not Path(model).is_dir():
        raise DataError(f"--model {model!r}: neither a model folder nor a models:/NAME@ALIAS URI")
    uri = resolve_tracking_uri(tracking_uri, root or Path.cwd()) if model.startswith("models:/") else None
    return ModelSource(model, uri)


def create_app(source: ModelSource, store: TaskStore, limits: Limits = Limits(), poll_seconds: float = 30.0):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    polling = source.registry and poll_seconds > 0

    @asynccontextmanager
    async def lifespan(app):
        """Follow the registry alias in a thread while the service runs."""
        stop = threading.Event()

        def follow_alias() -> None:
            while not stop.wait(poll_seconds):
                try:
                    source.refresh()
                    source.release(store.versions_in_use())
                except Exception:  # a registry that does not answer now may next time; the service goes on
                    continue

        if polling:
            threading.Thread(target=follow_alias, name="metanlp-alias", daemon=True).start()
        yield
        stop.set()

    app = FastAPI(title="metanlp", description=__doc__, lifespan=lifespan)

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def bound_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return refuse(413, f"request body over {limits.max_body_bytes} bytes")
        return await call_next(request)

    def problem(e: dict) -> str:
        if e.get("type") == "json_invalid":
            return f"body: not valid JSON ({e.get('ctx', {}).get('error', 'decode error')} at character {e['loc'][-1]})"
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        got = f" (got {quote(e['input'])})" if "input" in e and e.get("type") != "missing" else ""
        return f"{where}: {e.get('msg')}{got}"

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return refuse(400, "; ".join(problem(e) for e in err.errors()[:5]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        detail = "body: not valid JSON" if err.detail == "There was an error parsing the body" else str(err.detail)
        return refuse(err.status_code, detail)

    @app.exception_handler(TaskError)
    async def task_error(request: Request, err: TaskError):
        return refuse(err.status, str(err))

    def check_texts(texts: list[str], what: str) -> list[str]:
        if not texts:
            raise TaskError(f"{what}: empty; send at least one")
        if len(texts) > limits.max_rows:
            raise TooLarge(f"{what}: {len(texts)} rows, over the limit of {limits.max_rows}")
        for i, text in enumerate(texts):
            if len(text) > limits.max_chars:
                raise TooLarge(f"{what}[{i}]: {len(text)} characters, over the limit of {limits.max_chars}")
            if not visible(text):  # the loader's rule: zero-width or control characters alone are empty too
                raise TaskError(f"{what}[{i}]: empty text (no visible character)")
        return [t.strip() for t in texts]

    @app.post("/tasks", status_code=201)
    def create_task(request: TaskRequest) -> dict:
        if not request.support:
            raise TaskError("support: empty; send labelled examples of at least 2 classes")
        texts = check_texts([e.text for e in request.support], "support.text")
        labels = check_texts([e.label for e in request.support], "support.label")
        if len(set(labels)) < 2:
            raise TaskError(f"support: one class ({quote(labels[0])}); a classifier needs at least two")
        if request.adapt_seconds is not None and request.adapt_seconds > limits.max_adapt_seconds:
            raise TaskError(f"adapt_seconds: {request.adapt_seconds:g}, over the limit of {limits.max_adapt_seconds:g}")
        version = source.current
        task, cached = store.create(source.learners[version], version, texts, labels, request.strategy,
                                    request.adapt_seconds, request.adapt_top_layers, request.adapt_batches)
        return {**task.describe(), "cached": cached}

    @app.post("/tasks/{identifier}/predict")
    def predict(identifier: str, request: PredictRequest) -> dict:
        texts = check_texts(request.texts, "texts")
        task, classifier = store.classifier(identifier, source.learners, source.current)
        predictions = classifier.predict(texts)
        top = predictions.top(min(request.top_k, len(predictions.classes)))
        return {"task_id": task.id, "model_version": task.model_version,
                "predictions": [{"text": text, "label": label, "score": ranked[0][1],
                                 "top": [{"label": c, "score": s} for c, s in ranked]}
                                for text, label, ranked in zip(texts, predictions.labels, top, strict=True)]}

    @app.get("/tasks/{identifier}")
    def describe(identifier: str) -> dict:
        return store.describe(identifier)

    @app.delete("/tasks/{identifier}", status_code=204, response_class=Response)
    def delete(identifier: str):
        store.delete(identifier)
        return Response(status_code=204)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": source.model, "model_version": source.current, "tasks": len(store),
                "tasks_adapted": store.cached, "loaded_versions": sorted(source.learners)}

    app.state.source, app.state.store, app.state.started = source, store, time.time()
    return app
