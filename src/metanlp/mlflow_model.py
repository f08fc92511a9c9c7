"""MLflow "model from code" entry: the file MLflow copies beside the weights and runs to build the model."""

from mlflow.models import set_model

from metanlp.serving import FewShotClassifierModel

set_model(FewShotClassifierModel())
