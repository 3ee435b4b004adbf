from my_project.models.mlp import MLP, count_parameters
from my_project.models.tasks import Classifier, Regressor, Task

__all__ = ["MLP", "Classifier", "Regressor", "Task", "count_parameters"]
