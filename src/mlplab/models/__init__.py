from mlplab.models.mlp import MLP, count_parameters
from mlplab.models.tasks import Classifier, Regressor, Task

__all__ = ["MLP", "Classifier", "Regressor", "Task", "count_parameters"]
