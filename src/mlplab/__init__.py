"""mlplab: train and track MLPs with PyTorch Lightning and MLflow."""

__version__ = "0.1.0"
