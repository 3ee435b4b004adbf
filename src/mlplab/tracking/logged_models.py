"""The fit's model as an MLflow 3 logged model: saved here first, then uploaded by the run's
writer (at once, or from the journal when the tracking server is back), then registered."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from mlplab.safety.metadata import described_outputs
from mlplab.serving import working_inference_module
from mlplab.tracking.store import resolve_tracking_uri


def input_example(datamodule, rows: int = 5) -> torch.Tensor:
    """A few raw training inputs: the logged model's example and the source of its signature.

    From mlplab's in-memory splits, else from the first batch of `train_dataloader()` (of the
    datamodule, or of a module that has its own; the next batches too where it holds fewer than
    `rows`), whatever its form: a tensor; a tuple or list (its first element); a dict (the value
    of `x`, `input`, `inputs` or `image`, else its first tensor). A `ValueError` says what the
    batch holds where no tensor of inputs is found."""
    from collections.abc import Mapping, Sequence

    def inputs(batch):
        if isinstance(batch, torch.Tensor):
            return batch if batch.dim() > 0 else None
        if isinstance(batch, Mapping):
            named = [batch[key] for key in ("x", "input", "inputs", "image") if key in batch]
            for value in [*named, *batch.values()]:
                if (found := inputs(value)) is not None:
                    return found
            return None
        if isinstance(batch, Sequence) and not isinstance(batch, str | bytes) and batch:
            return inputs(batch[0])
        return None

    def described(batch) -> str:
        if batch is None:
            return "none: the training loader is empty"
        if isinstance(batch, Mapping):
            return f"a dict of {', '.join(map(repr, batch))}"
        if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
            kinds = ", ".join(type(item).__name__ for item in batch)
            return f"a {type(batch).__name__} of {kinds or 'nothing'}"
        return f"a {type(batch).__name__}"

    data = getattr(datamodule, "data", None)
    if isinstance(data, dict) and isinstance(data.get("train"), tuple | list):
        if (found := inputs(data["train"][0])) is not None:  # mlplab's splits: (x, y[, w])
            return found[:rows]
    loaders = datamodule.train_dataloader()
    if isinstance(loaders, Mapping):  # several loaders: Lightning combines their batches
        loaders = next(iter(loaders.values()), None)
    elif isinstance(loaders, Sequence):
        loaders = loaders[0] if loaders else None
    batches = iter(loaders) if loaders is not None else iter(())
    batch = next(batches, None)
    found = inputs(batch)
    if found is None:
        raise ValueError(f"no tensor of inputs in a training batch ({described(batch)})")
    parts = [found]
    while sum(len(part) for part in parts) < rows:  # batches of one: the model takes several
        more = inputs(next(batches, None))
        if more is None or more.shape[1:] != found.shape[1:] or more.dtype != found.dtype:
            break
        parts.append(more)
    return torch.cat(parts)[:rows] if len(parts) > 1 else found[:rows]


def log_model(
    logger,
    module,
    datamodule,
    step: int = 0,
    best: str = "",
    latest: str = "",
    register: tuple[str, str | None] | None = None,
) -> str | None:
    """Log the module as an MLflow PyTorch model with signature and input example: raw inputs
    in, its `predict_step`'s outputs out (`mlplab.serving`).

    `step` is the global step of the checkpoint the weights come from (`best`), so the logged
    model carries that epoch's metrics, and the run's test metrics (logged at that step)
    beside them. Only this model is a LoggedModel; the `best` and `latest` checkpoints are
    the run's artifacts under `checkpoints/`, to download from the run's page (and resume or
    test from). `register`: (name, alias) in the Model Registry.

    Returns the model's URI (`models:/<model_id>`; `runs:/<run_id>/model` loads it too), or
    None: the module cannot predict on its own training inputs (said why), or the tracking
    server is away and the model waits in the run's journal.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    try:
        example = input_example(datamodule).cpu().float()
    except Exception as err:  # noqa: BLE001 - whatever the user's loader or batch does
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        if not isinstance(err, ValueError):  # not `input_example`'s own word
            reason = f"no training batch for an example ({type(err).__name__}: {reason})"
        print(f"mlplab: the model was not logged: {reason}", file=sys.stderr)
        return None
    try:
        inference = working_inference_module(module, example)
        with torch.no_grad():
            output = inference(example)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported
        print(
            f"mlplab: the model was not logged: {type(module).__name__}(x) fails on 5 training "
            f"inputs ({type(err).__name__}: {str(err).splitlines()[0][:120]}); give the module "
            "a forward or a predict_step that takes a tensor of raw inputs",
            file=sys.stderr,
        )
        return None
    example, output = example.numpy(), torch.as_tensor(output).numpy()
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    outputs = described_outputs(datamodule, module)
    writer = logger.experiment
    for checkpoint in dict.fromkeys(c for c in (best, latest) if c):  # each file once
        writer.log_artifact(logger.run_id, checkpoint, "checkpoints")
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
    ids MLflow gives the logged model and the run it comes from."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id

    def save_model(self, path: str, mlflow_model, **_) -> None:
        from mlflow.models import Model

        shutil.copytree(self.path, path)
        saved = Model.load(str(self.path))
        for field in ("flavors", "signature", "saved_input_example_info", "mlflow_version",
                      "metadata", "model_size_bytes", "utc_time_created"):  # fmt: skip
            setattr(mlflow_model, field, getattr(saved, field))
        mlflow_model.run_id = self.run_id
        mlflow_model.save(str(Path(path) / "MLmodel"))


# the split each metric prefix is computed on: its dataset input carries this context tag
SPLITS = {"train/": "train", "val/": "val", "test/": "test"}


def upload_model(
    tracking_uri: str,
    run_id: str,
    path: Path,
    step: int = 0,
    tags: dict[str, str] | None = None,
    register: list | None = None,
    **_,  # a journal written by an earlier mlplab: its `latest` model is a run artifact now
) -> str:
    """Log the model saved at `path` to the run (see `log_model`); returns its URI.

    The logged model gets the run's params and source tags, the run's metrics at `step` (the
    checkpoint's; the test metrics are drawn there too), each linked to the dataset of its
    split, and the run lists it as its output at that step."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    source = {k: v for k, v in run.data.tags.items() if k.startswith("mlflow.source.")}
    model = client.create_logged_model(
        run.info.experiment_id, name="model", source_run_id=run_id,
        tags={**source, **(tags or {})}, params=run.data.params,
    )  # fmt: skip
    link_metrics(client, run, model.model_id, step)
    mlflow.set_tracking_uri(tracking_uri)
    # no run given: `Model.log` would copy the run's metrics at `step` again, without datasets
    info = Model.log(None, SavedModel(path, run_id), name="model", model_id=model.model_id)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    if register:
        register_model(info.model_uri, register[0], tracking_uri, register[1])
    return info.model_uri


def link_metrics(client, run, model_id: str, step: int) -> None:
    """The run's metrics at `step` as the logged model's, each with the dataset of its split
    (the run's dataset input of that `mlflow.data.context`): MLflow keeps dataset links on a
    model's metrics only, not on a run's."""
    from mlflow.entities import Metric

    datasets = {}
    for given in run.inputs.dataset_inputs if run.inputs else []:
        context = {t.key: t.value for t in given.tags}.get("mlflow.data.context")
        datasets[context] = given.dataset
    points = []
    for key in run.data.metrics:
        split = next((s for p, s in SPLITS.items() if key.startswith(p)), None)
        dataset = datasets.get(split)
        for m in client.get_metric_history(run.info.run_id, key):
            if m.step == step:
                points.append(Metric(
                    m.key, m.value, m.timestamp, m.step, model_id=model_id,
                    dataset_name=dataset.name if dataset else None,
                    dataset_digest=dataset.digest if dataset else None,
                ))  # fmt: skip
    client.log_batch(run.info.run_id, metrics=points)  # MLflow splits it at its limits


def register_model(
    model_uri: str, name: str, tracking_uri: str | None = None, alias: str | None = None
) -> str:
    """Register a logged model in the Model Registry, pointing `alias` (e.g. `candidate`) at
    the new version; returns `models:/<name>/<version>`."""
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    version = mlflow.register_model(model_uri, name)
    uri = f"models:/{name}/{version.version}"
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
        uri_alias = f" and models:/{name}@{alias}"
    else:
        uri_alias = ""
    print(f"mlplab: registered {model_uri} as {uri}{uri_alias}")
    return uri
