"""Networks (`nn.Module`s built with `in_features, out_features`) and the tasks that train them."""

from my_project.models.classifier import Classifier
from my_project.models.cnn import ConvNet
from my_project.models.mlp import MLP, count_parameters
from my_project.models.regressor import Regressor
from my_project.models.task import Task
from my_project.models.threshold import ThresholdNet

__all__ = ["MLP", "Classifier", "ConvNet", "Regressor", "Task", "ThresholdNet", "count_parameters"]
