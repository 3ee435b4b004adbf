"""MLflow tracking: where the store is, how runs are laid out, what each run records."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An explicit URI, else `MLFLOW_TRACKING_URI`, else the project's SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def local_store_root(uri: str) -> Path | None:
    """The folder that holds a local store's database and run folders; None for a server."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative/path.db and sqlite:////absolute/path.db
        path = uri[len("sqlite:///") :]
        return Path(unquote(path)).parent if path and path != ":memory:" else None
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def _folder_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "default"


class MLflowLogger(MLFlowLogger):
    """Lightning's MLflow logger, with a store laid out for people and epochs on the x-axis.

    A local store keeps each run in `<store>/<experiment>/<run_id>/`: `artifacts/` (config,
    figures, the model) and `checkpoints/` (Lightning's `ModelCheckpoint` finds that folder
    through `save_dir`/`name`/`version`). Metrics are logged with the epoch as their step, so
    runs with different batch sizes compare on one axis.
    """

    def __init__(
        self,
        experiment_name: str = "default",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> None:
        uri = resolve_tracking_uri(tracking_uri)
        root = local_store_root(uri)
        artifact_location = None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
            artifact_location = (root / _folder_name(experiment_name)).resolve().as_uri()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            tags=tags,
            artifact_location=artifact_location,
            run_id=run_id,
        )
        self.store_root = root if root is not None else Path("mlruns")

    @property
    def save_dir(self) -> str:
        return str(self.store_root)

    @property
    def name(self) -> str:
        return _folder_name(self._experiment_name)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        super().log_metrics(metrics, step=int(epoch) if epoch is not None else step)


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"model": {"class_path": C, "init_args": {"lr": 1}}}` -> `{"model": C, "model.lr": 1}`.

    LightningCLI's class_path/init_args nesting is folded away so params read like the CLI's
    dotted overrides; empty values are left out.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in ("init_args", "dict_kwargs"):
            flat.update(flatten_config(value, prefix))
            continue
        name = prefix.rstrip(".") if key == "class_path" else f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif value is not None and value != []:
            flat[name] = value
    return flat


class MLflowSaveConfig(SaveConfigCallback):
    """Record the resolved config in the MLflow run: `config.yaml` as an artifact and every value
    as a flattened param (Lightning's own callback writes to a `log_dir` MLflow has not got)."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLflowLogger):
            return
        logger.experiment.log_text(logger.run_id, self.parser.dump(self.config), "config.yaml")
        config = self.config.clone()
        config.pop("config", None)  # the paths of the YAML files, not settings
        params = flatten_config(config.as_dict())
        params["trainer.devices_used"] = trainer.world_size
        for shape in ("num_features", "num_classes", "num_targets"):  # linked, so not in the YAML
            if hasattr(trainer.datamodule, shape):
                params[f"data.{shape}"] = getattr(trainer.datamodule, shape)
        logger.log_hyperparams(params)


def log_model(logger: MLflowLogger, module, input_example: torch.Tensor) -> str:
    """Log `module.inference_module()` as an MLflow PyTorch model with signature and example.

    Returns the model URI (`runs:/<run_id>/model`) that `mlflow.pyfunc.load_model` accepts.
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import infer_signature

    inference = module.inference_module()
    example = input_example[:5].flatten(1).cpu().numpy().astype(np.float32)
    with torch.no_grad():
        output = inference(torch.from_numpy(example)).numpy()
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    mlflow.set_tracking_uri(logger._tracking_uri)
    with mlflow.start_run(run_id=logger.run_id):
        mlflow.pytorch.log_model(
            inference,
            name="model",
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=requirements,
            serialization_format="pt2",  # torch.export: loads and serves without mlplab's code
        )
    return f"runs:/{logger.run_id}/model"
