"""mlplab, the platform: the `mlplab` command (LightningCLI wired to MLflow), tracking, run
safety, speed and mlplab's own commands. It never imports a project's package (`my_project`):
configs name the project's classes by `class_path`."""

__version__ = "0.1.0"
