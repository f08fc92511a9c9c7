"""Tasks as first-class objects: the classifier a support set adapts to, kept for many queries.

An application uses a few-shot classifier as one task and many queries, so the adapted classifier is kept in a
bounded LRU cache keyed by the task id: a hash of the model version, the adaptation strategy and the support
texts and labels in order (the same support sent again is the same task, adapted once). With a folder, every
task is also written there: `<id>.json` (its support set and what adapted it) and, when the learner keeps an
adapted state (prototypes, a head, fast weights), `<id>.safetensors`. A restart or an eviction keeps the task:
its classifier is rebuilt from the saved state in milliseconds, or adapted again from the support set when
there is none (or it does not fit the model). Nothing is unpickled. The MLflow pyfunc and `metanlp serve`
share this.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metanlp.atomic import write_file_atomic, write_text_atomic
from metanlp.data.load import DataError, quote
from metanlp.learners import Classifier, Learner

if TYPE_CHECKING:  # annotation only: adaptation is imported when a task tunes the encoder
    from metanlp.adaptation import AdaptBudget

DEFAULT_STRATEGY = "default"
STRATEGIES = {
    DEFAULT_STRATEGY: "what the model was saved to do: the encoder tuning its learner.json names under "
                      "`adaptation` (what the pipeline and `metanlp train` write: contrastive on the top layers, "
                      "nearest-class batches and cap it names), then its own rule; a model without one adapts by its "
                      "own rule alone",
    "untuned": "the model's own rule alone (prototypes, or its inner loop), no encoder tuning: milliseconds",
    "logreg": "a logistic-regression head fitted on the model's embeddings (what SetFit puts on its encoder)",
    "contrastive": "the encoder first fine-tuned contrastively on the support set (SetFit-style, from the model's "
                   "weights; seconds to a minute or two on a CPU, and the task keeps its own encoder copy), then "
                   "the model's own rule, with the budget the request gives (AdaptBudget's defaults otherwise)",
}


class TaskError(ValueError):
    """A request the task store cannot serve; the message says why (the service answers 4xx with it)."""

    status = 400


class UnknownTask(TaskError):
    status = 404


def task_id(model_version: str, strategy: str, texts: list[str], labels: list[str],
            budget: dict[str, float | int | str] | None = None) -> str:
    """`budget`: the tuning budget the task asked for, if any (left out when none, so the ids of tasks that ask
    none stay what they were)."""
    payload = json.dumps([model_version, strategy, texts, labels, *([budget] if budget else [])], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass
class Task:
    id: str
    model_version: str
    strategy: str
    classes: list[str]
    texts: list[str]
    labels: list[str]
    created: float = field(default_factory=time.time)
    adapt_ms: float | None = None
    restored: bool = False  # rebuilt from its saved state, not adapted in this process
    # `contrastive`: the tuning budget the task asked for (None: AdaptBudget's default), kept so that adapting it
    # again after a restart or an eviction tunes as it was tuned
    adapt_seconds: float | None = None
    adapt_top_layers: int | None = None
    adapt_batches: str | None = None

    def budget(self) -> dict[str, float | int | str]:
        return {name: value for name, value in (("adapt_seconds", self.adapt_seconds),
                                                ("adapt_top_layers", self.adapt_top_layers),
                                                ("adapt_batches", self.adapt_batches)) if value is not None}

    def describe(self) -> dict:
        return {"task_id": self.id, "model_version": self.model_version, "strategy": self.strategy,
                "classes": self.classes, "support_size": len(self.texts), "created": self.created,
                "adapt_ms": self.adapt_ms, "restored": self.restored, **self.budget()}


def check_strategy(strategy: str, field: str = "strategy") -> None:
    if strategy not in STRATEGIES:
        raise TaskError(f"{field}: unknown {quote(strategy)}; choose from {sorted(STRATEGIES)}")


def tuning_budget(strategy: str, seconds: float | None, top_layers: int | None, batches: str | None = None,
                  names: tuple[str, str, str] = ("adapt_seconds", "adapt_top_layers", "adapt_batches")
                  ) -> AdaptBudget | None:
    """The `adaptation.AdaptBudget` of a task that sets the cap, the tuned layers and/or the batches of its
    encoder tuning (its defaults for what is None); None when none is set. Refused, naming `names` (how the
    caller calls them), for a strategy that tunes no encoder or a value out of range."""
    given = {"seconds": seconds, "top_layers": top_layers, "contrastive_batches": batches}
    if all(v is None for v in given.values()):
        return None
    if strategy != "contrastive":
        raise TaskError(f"{', '.join(names)}: only strategy 'contrastive' takes them (this one is {quote(strategy)}; "
                        "'default' tunes as the model's learner.json says)")
    from metanlp.adaptation import AdaptBudget, BudgetError

    try:  # the budget checks its values; the message names them as the caller does
        return AdaptBudget(**{k: v for k, v in given.items() if v is not None})
    except BudgetError as err:
        raise TaskError(f"{dict(zip(given, names, strict=True))[err.field]}: {err.reason}") from err


def strategy_learner(learner: Learner, strategy: str, budget: AdaptBudget | None = None) -> Learner:
    """The learner that adapts a task of this strategy on `learner`'s model; `budget` (an
    `adaptation.AdaptBudget`, its defaults when None) bounds the encoder tuning of `contrastive`."""
    check_strategy(strategy)
    if strategy == DEFAULT_STRATEGY and learner.adaptation is not None:
        saved = learner.adaptation  # a budget is refused for "default" (tuning_budget): the model's own applies
        return strategy_learner(learner, saved.strategy,
                                tuning_budget(saved.strategy, saved.seconds, saved.top_layers, saved.batches))
    if strategy in (DEFAULT_STRATEGY, "untuned"):
        return learner
    if strategy == "logreg":
        from metanlp.learners import build_learner

        return build_learner("logreg", learner.encoder, learner.provenance)
    if strategy == "contrastive":
        from metanlp.adaptation import AdaptBudget, DomainAdaptedLearner

        return DomainAdaptedLearner(learner, ["contrastive"], budget or AdaptBudget())
    raise AssertionError(f"strategy {strategy!r} is in STRATEGIES but has no learner here")


def task_learner(learner: Learner, task: Task) -> Learner:
    """The learner that adapts `task` on `learner`'s model: its strategy, with the tuning budget it asked for."""
    return strategy_learner(learner, task.strategy, tuning_budget(task.strategy, task.adapt_seconds,
                                                                  task.adapt_top_layers, task.adapt_batches))


def task_records(folder: Path) -> list[Task]:
    """The task records a store keeps in `folder` (`<id>.json`), oldest first; files that are not task
    records are left alone."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            records.append(Task(**json.loads(path.read_text())))
        except (ValueError, TypeError, json.JSONDecodeError):
            continue  # a file that is not a task record is not ours to load or delete
    return sorted(records, key=lambda task: (task.created, task.id))


class TaskStore:
    """Tasks by id: adapted classifiers in a bounded LRU (`capacity`), task records in `folder` if given."""

    def __init__(self, capacity: int = 64, folder: Path | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"task cache capacity must be at least 1, got {capacity}")
        self.capacity, self.folder = capacity, Path(folder) if folder else None
        self._adapted: OrderedDict[str, tuple[Task, Classifier]] = OrderedDict()
        self._records: dict[str, Task] = {}
        self._lock = threading.Lock()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._records = {task.id: task for task in task_records(self.folder)}

    def __len__(self) -> int:
        return len(self._records) if self.folder else len(self._adapted)

    @property
    def cached(self) -> int:
        return len(self._adapted)

    def create(self, learner: Learner, model_version: str, texts: list[str], labels: list[str],
               strategy: str = DEFAULT_STRATEGY, adapt_seconds: float | None = None,
               adapt_top_layers: int | None = None, adapt_batches: str | None = None) -> tuple[Task, bool]:
        """The task of this support set (adapted now unless it is cached); returns it and whether it was.
        `adapt_seconds`, `adapt_top_layers`, `adapt_batches`: the budget of a `contrastive` task's tuning
        (`tuning_budget`)."""
        task = Task("", model_version, strategy, sorted(set(labels)), list(texts), list(labels),
                    adapt_seconds=adapt_seconds, adapt_top_layers=adapt_top_layers, adapt_batches=adapt_batches)
        learner = task_learner(learner, task)
        task.id = task_id(model_version, strategy, task.texts, task.labels, task.budget())
        with self._lock:
            if task.id in self._adapted:
                self._adapted.move_to_end(task.id)
                return self._adapted[task.id][0], True
        classifier = self._adapt(learner, task)
        with self._lock:
            self._remember(task, classifier)
        return task, False

    def classifier(self, identifier: str, learners: dict[str, Learner], current: str) -> tuple[Task, Classifier]:
        """A task's classifier; a task known only from its record is rebuilt from its saved state, or adapted
        again, with the model version it recorded when that one is loaded, else with the current one (and its
        record says so)."""
        with self._lock:
            if identifier in self._adapted:
                self._adapted.move_to_end(identifier)
                return self._adapted[identifier]
            task = self._records.get(identifier)
        if task is None:
            raise UnknownTask(f"unknown task {identifier[:64]!r}; create it with POST /tasks")
        if task.model_version not in learners:
            task.model_version = current
            if self.folder is not None:
                self._state_path(identifier).unlink(missing_ok=True)  # made by a model no longer loaded
        learner = task_learner(learners[task.model_version], task)
        classifier = self._restore(learner, task)
        if classifier is None:
            classifier = self._adapt(learner, task)
        with self._lock:
            self._remember(task, classifier)
        return task, classifier

    def describe(self, identifier: str) -> dict:
        with self._lock:
            task = self._adapted[identifier][0] if identifier in self._adapted else self._records.get(identifier)
        if task is None:
            raise UnknownTask(f"unknown task {identifier[:64]!r}")
        return task.describe()

    def delete(self, identifier: str) -> None:
        with self._lock:
            found = self._adapted.pop(identifier, None) is not None
            found = self._records.pop(identifier, None) is not None or found
        if not found:
            raise UnknownTask(f"unknown task {identifier[:64]!r}")
        if self.folder is not None:
            (self.folder / f"{identifier}.json").unlink(missing_ok=True)
            self._state_path(identifier).unlink(missing_ok=True)

    def versions_in_use(self) -> set[str]:
        with self._lock:
            return {task.model_version for task, _ in self._adapted.values()}

    def _state_path(self, identifier: str) -> Path:
        assert self.folder is not None, "only a store with a folder keeps states"
        return self.folder / f"{identifier}.safetensors"

    def _adapt(self, learner: Learner, task: Task) -> Classifier:
        started = time.perf_counter()
        classifier = learner.adapt(task.texts, task.labels)
        task.adapt_ms, task.restored = 1000 * (time.perf_counter() - started), False
        if self.folder is not None and classifier.state is not None:
            state = {name: tensor.detach().cpu().contiguous() for name, tensor in classifier.state.items()}
            write_file_atomic(self._state_path(task.id), lambda tmp: save_file(state, str(tmp)))
        return classifier

    def _restore(self, learner: Learner, task: Task) -> Classifier | None:
        """The task's classifier from its saved state; None when there is none or it does not fit the learner
        (a damaged file, another model's state): the caller adapts again."""
        path = self._state_path(task.id) if self.folder is not None else None
        if path is None or not path.is_file():
            return None
        try:
            classifier = learner.restore(task.classes, load_file(str(path)))
        except (NotImplementedError, DataError, SafetensorError, OSError):
            return None
        task.restored = True
        return classifier

    def _remember(self, task: Task, classifier: Classifier) -> None:
        self._adapted[task.id] = (task, classifier)
        self._adapted.move_to_end(task.id)
        while len(self._adapted) > self.capacity:
            self._adapted.popitem(last=False)  # least recently used; its record (if any) stays
        if self.folder is not None:
            self._records[task.id] = task
            write_text_atomic(self.folder / f"{task.id}.json", json.dumps(asdict(task), ensure_ascii=False))
