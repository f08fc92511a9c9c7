"""The registered model as an MLflow pyfunc: give it a support set and query texts, get labels and scores.

Input: a DataFrame with columns `text` and `label`; rows with a label are the support set (K examples per
class, any classes), rows with an empty label are the queries. Output: one row per query with `text`, the
predicted `label` and its `score` (softmax probability). The model is logged "from code"
(metanlp/mlflow_model.py), so loading it unpickles nothing; the weights are safetensors + JSON.
"""

from __future__ import annotations

import pandas as pd
from mlflow.pyfunc import PythonModel

from metanlp.data.load import visible

INPUT_COLUMNS = ("text", "label")


def split_request(frame: pd.DataFrame, need_support: bool = True) -> tuple[list[str], list[str], list[str]]:
    """(support texts, support labels, query texts); a malformed request is named precisely."""
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"request: missing column(s) {missing}; send 'text' and 'label' (empty for queries)")
    texts = frame["text"].tolist()
    labels = ["" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v).strip()
              for v in frame["label"].tolist()]
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not visible(text):  # the loader's rule for an empty text
            raise ValueError(f"request row {row}: empty or non-text 'text'")
    support = [(t.strip(), lab) for t, lab in zip(texts, labels, strict=True) if lab]
    queries = [t.strip() for t, lab in zip(texts, labels, strict=True) if not lab]
    if (need_support or support) and len({lab for _, lab in support}) < 2:
        raise ValueError("request: the support set (rows with a label) needs at least 2 classes")
    if not queries:
        raise ValueError("request: no queries (rows with an empty label) to classify")
    return [t for t, _ in support], [lab for _, lab in support], queries


MODEL_VERSION = "pyfunc"  # one loaded pyfunc is one model: its tasks need no other version


def classify(learner, frame: pd.DataFrame, store=None, task: str | None = None, strategy: str = "default",
             adapt_seconds: float | None = None, adapt_top_layers: int | None = None,
             adapt_batches: str | None = None) -> pd.DataFrame:
    """Label the query rows. The support rows make (or find, in `store`) a task adapted by `strategy` (one of
    `metanlp.tasks.STRATEGIES`; `adapt_*`: the budget of a `contrastive` one's tuning);
    or `task` names one made by an earlier request, and the request may then hold queries only."""
    from metanlp.tasks import TaskStore

    store = TaskStore(capacity=1) if store is None else store
    support_texts, support_labels, queries = split_request(frame, need_support=not task)
    if support_texts:
        made, _ = store.create(learner, MODEL_VERSION, support_texts, support_labels, strategy, adapt_seconds,
                               adapt_top_layers, adapt_batches)
        task = made.id
    _, classifier = store.classifier(task, {MODEL_VERSION: learner}, MODEL_VERSION)
    predictions = classifier.predict(queries)
    scores = [ranked[0][1] for ranked in predictions.top(1)]
    return pd.DataFrame({"text": queries, "label": predictions.labels, "score": scores,
                         "task_id": [task] * len(queries)})


class FewShotClassifierModel(PythonModel):
    """Support sets adapted once and kept (bounded LRU of 32 tasks): the same support again, or its task id
    in the request's params (`{"task_id": ...}`) with query rows only, costs only the queries. The params'
    `strategy` chooses how a new task adapts (`metanlp.tasks.STRATEGIES`; "default": the model's own), and
    `adapt_seconds` / `adapt_top_layers` / `adapt_batches` budget a `contrastive` task's tuning."""

    def load_context(self, context) -> None:
        from metanlp.learners import load_learner
        from metanlp.tasks import TaskStore

        self.learner = load_learner(context.artifacts["model"])
        self.store = TaskStore(capacity=32)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from metanlp.data.load import DataError
        from metanlp.tasks import TaskError

        try:  # the caller's mistake: a 400 with our message, not a 500 with a stack trace
            params = params or {}
            return classify(self.learner, model_input, self.store, params.get("task_id") or None,
                            params.get("strategy") or "default", params.get("adapt_seconds"),
                            params.get("adapt_top_layers"), params.get("adapt_batches"))
        except (TaskError, DataError, ValueError) as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err


def example_request() -> pd.DataFrame:
    return pd.DataFrame({
        "text": ["water the tomatoes twice a week", "when should I prune the roses",
                 "book a spin class for tomorrow", "how many squats in a beginner set",
                 "should I prune roses in march", "sign me up for the evening spin class"],
        "label": ["garden_care", "garden_care", "fitness_class", "fitness_class", "", ""]})


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "text"), ColSpec("string", "label")]),
                          outputs=Schema([ColSpec("string", "text"), ColSpec("string", "label"),
                                          ColSpec("double", "score"), ColSpec("string", "task_id")]),
                          params=ParamSchema([ParamSpec("task_id", "string", ""),
                                              ParamSpec("strategy", "string", "default"),
                                              ParamSpec("adapt_seconds", "double", None),
                                              ParamSpec("adapt_top_layers", "long", None),
                                              ParamSpec("adapt_batches", "string", None)]))


def pyfunc_arguments(model_dir) -> dict:
    """What `mlflow.pyfunc.log_model` / `save_model` take to package a metanlp model folder: the model from
    code (metanlp/mlflow_model.py, nothing pickled), the folder as its artifact, signature and example."""
    from importlib import resources

    code = str(resources.files("metanlp") / "mlflow_model.py")
    return {"python_model": code, "artifacts": {"model": str(model_dir)}, "signature": signature(),
            "input_example": example_request(), "pip_requirements": ["metanlp"]}
