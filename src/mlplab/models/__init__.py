from mlplab.models.mlp import MLP, count_parameters
from mlplab.models.tasks import Classifier, MLPTask, Regressor

__all__ = ["MLP", "Classifier", "MLPTask", "Regressor", "count_parameters"]
