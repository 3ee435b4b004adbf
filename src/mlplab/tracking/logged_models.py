"""The fit's model as an MLflow 3 logged model: saved here first, then uploaded by the run's
writer (at once, or from the journal when the tracking server is back), then registered."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import torch

from mlplab.data.base import described_outputs
from mlplab.safety.trust import read_checkpoint
from mlplab.tracking.store import resolve_tracking_uri


def input_example(datamodule, rows: int = 5) -> torch.Tensor:
    """A few raw training inputs: the logged model's example and the source of its signature."""
    data = getattr(datamodule, "data", None)
    if isinstance(data, dict) and "train" in data:
        return data["train"][0][:rows]
    batch = next(iter(datamodule.train_dataloader()))
    return (batch[0] if isinstance(batch, list | tuple) else batch)[:rows]


def log_model(
    logger,
    module,
    datamodule,
    step: int = 0,
    best: str = "",
    latest: str = "",
    register: tuple[str, str | None] | None = None,
) -> str | None:
    """Log the module as an MLflow PyTorch model with signature and input example: its
    `inference_module()` if it has one (raw inputs in, the task's outputs out), else itself.

    `step` is the global step of the checkpoint the weights come from (`best`), so the logged
    model carries that epoch's metrics, and the run's test metrics beside them. The `latest`
    checkpoint, when it is another file, is recorded as an external logged model (the
    checkpoint is its artifact), so both are found with `mlflow.search_logged_models`.
    `register`: (name, alias) in the Model Registry.

    Returns the model's URI (`models:/<model_id>`; `runs:/<run_id>/model` loads it too), or
    None: the module cannot predict on its own training inputs (said why), or the tracking
    server is away and the model waits in the run's journal.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    if hasattr(module, "inference_module"):
        inference = module.inference_module()
    else:
        inference = copy.deepcopy(module).cpu().eval()
    example = input_example(datamodule).cpu().float()
    try:
        with torch.no_grad():
            output = inference(example)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported
        print(
            f"mlplab: the model was not logged: {type(module).__name__}(x) fails on 5 training "
            f"inputs ({type(err).__name__}: {str(err).splitlines()[0][:120]}); give the module "
            "a forward or an inference_module() that takes its raw inputs",
            file=sys.stderr,
        )
        return None
    example, output = example.numpy(), torch.as_tensor(output).numpy()
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    outputs = described_outputs(datamodule, module)
    writer = logger.experiment
    with writer.staged("model") as path:
        if outputs["encoding"] is None:
            mlflow.pytorch.save_model(
                inference,
                path,
                signature=infer_signature(example, output),
                input_example=example,
                pip_requirements=requirements,
                serialization_format="pt2",  # torch.export: loads and serves without mlplab
                metadata={"mlplab": {k: v for k, v in outputs.items() if v is not None}},
            )
        else:
            save_column_model(inference, example, output, datamodule, path, requirements)
        return writer.log_model(
            path,
            step=step,
            tags={"mlplab.checkpoint": "best", "mlplab.checkpoint_path": best},
            latest=latest if latest != best else "",
            latest_step=read_checkpoint(latest)["global_step"] if latest else 0,
            register=list(register) if register else None,
        )


def save_column_model(inference, example, output, datamodule, path: Path,
                      requirements: list[str]) -> None:  # fmt: skip
    """A table-trained task as `mlplab.data.columns.ColumnModel`: raw named columns in (the
    signature lists them), the class by name and its probabilities, or named targets, out."""
    import tempfile

    import mlflow.pyfunc
    import mlflow.pytorch
    import pandas as pd
    from mlflow.models import infer_signature

    from mlplab.data import columns

    encoding = datamodule.encoding
    rows = datamodule.example
    requirements = [*requirements, f"pandas=={pd.__version__}"]
    with tempfile.TemporaryDirectory() as folder:
        network = Path(folder) / "network"
        mlflow.pytorch.save_model(
            inference, network, signature=infer_signature(example, output),
            input_example=example, pip_requirements=requirements, serialization_format="pt2",
        )  # fmt: skip
        mlflow.pyfunc.save_model(
            path,
            python_model=columns.__file__,  # a model from code: MLflow runs the file to load it
            artifacts={"network": str(network)},
            model_config=encoding.to_dict(),
            signature=infer_signature(rows, encoding.decode(output)),
            input_example=rows,
            pip_requirements=requirements,
        )


class SavedModel:
    """A flavor for `mlflow.models.Model.log` that logs a model saved earlier (`save_model` ran
    before the server was asked, so a journaled run keeps it): copied, its MLmodel given the
    ids MLflow gives the logged model."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save_model(self, path: str, mlflow_model, **_) -> None:
        from mlflow.models import Model

        shutil.copytree(self.path, path)
        saved = Model.load(str(self.path))
        for field in ("flavors", "signature", "saved_input_example_info", "mlflow_version",
                      "metadata", "model_size_bytes", "utc_time_created"):  # fmt: skip
            setattr(mlflow_model, field, getattr(saved, field))
        mlflow_model.save(str(Path(path) / "MLmodel"))


def upload_model(
    tracking_uri: str,
    run_id: str,
    path: Path,
    step: int = 0,
    tags: dict[str, str] | None = None,
    latest: str = "",
    latest_step: int = 0,
    register: list | None = None,
) -> str:
    """Log the model saved at `path` to the run (see `log_model`); returns its URI."""
    import mlflow
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    with mlflow.start_run(run_id=run_id):
        # `step`: MLflow links the run's metrics at this step to the model
        info = Model.log(None, SavedModel(path), name="model", step=step, tags=tags)
        link_metrics(client, run_id, info.model_id, prefix="test/")
        if latest:
            external = mlflow.create_external_model(
                name="last",
                source_run_id=run_id,
                tags={"mlplab.checkpoint": "last", "mlplab.checkpoint_path": latest},
            )
            client.log_outputs(run_id, [LoggedModelOutput(external.model_id, step=latest_step)])
            link_metrics(client, run_id, external.model_id, step=latest_step)
    if register:
        register_model(info.model_uri, register[0], tracking_uri, register[1])
    return info.model_uri


def link_metrics(client, run_id: str, model_id: str, step: int | None = None,
                 prefix: str = "") -> None:  # fmt: skip
    """Attach run metrics to a logged model, as `log_model(step=...)` does: the points at
    `step`, or the newest point of each metric named with `prefix`."""
    from mlflow.entities import Metric

    points = []
    for key in client.get_run(run_id).data.metrics:
        if not key.startswith(prefix):
            continue
        history = client.get_metric_history(run_id, key)
        chosen = [m for m in history if m.step == step] if step is not None else history[-1:]
        points += [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in chosen]
    if points:
        client.log_batch(run_id, metrics=points)


def register_model(
    model_uri: str, name: str, tracking_uri: str | None = None, alias: str | None = None
) -> str:
    """Register a logged model in the Model Registry, pointing `alias` (e.g. `candidate`) at
    the new version; returns `models:/<name>/<version>`."""
    import logging

    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    # MLflow announces each registration on this logger (a name, not an attribute: logging's
    # public API); mlplab prints its own line below
    logging.getLogger("mlflow.tracking._model_registry.client").setLevel(logging.WARNING)
    version = mlflow.register_model(model_uri, name)
    uri = f"models:/{name}/{version.version}"
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
        uri_alias = f" and models:/{name}@{alias}"
    else:
        uri_alias = ""
    print(f"mlplab: registered {model_uri} as {uri}{uri_alias}")
    return uri
