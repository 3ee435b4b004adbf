"""MLflow tracking: the run logger, what each run records (config, params, status, model)."""

from __future__ import annotations

import contextlib
import copy
import random
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mlplab.resume import read_checkpoint
from mlplab.store import (
    check_writable,
    experiment_dir,
    folder_name,
    local_store_root,
    resolve_tracking_uri,
    store_lock,
)


class RunStatus(Callback):
    """Why a run ended early, for `MLflowRunLogger.finalize`: Ctrl-C and SIGTERM mark it KILLED,
    an error FAILED with its message as the `mlplab.failure` tag."""

    def on_exception(self, trainer: Trainer, pl_module, exception: BaseException) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLflowRunLogger):
            return
        if isinstance(exception, KeyboardInterrupt | SIGTERMException):
            logger.failure = ("KILLED", f"interrupted ({type(exception).__name__})")
            if trainer.is_global_zero:
                print(
                    f"mlplab: interrupted: run {logger.run_id} marked KILLED; its last "
                    "end-of-epoch checkpoint is kept: continue with --ckpt_path last",
                    file=sys.stderr,
                )
        else:
            logger.failure = ("FAILED", f"{type(exception).__name__}: {exception}")


class MLflowRunLogger(MLFlowLogger):
    """Lightning's MLflow logger, with a store laid out for people and one write per epoch.

    A local store keeps each run in `<store>/<experiment>/<run_id>/`: `artifacts/` (config,
    figures, the model) and `checkpoints/` (Lightning's `ModelCheckpoint` finds that folder
    through `save_dir`/`name`/`version`). Metrics are logged at the global step (optimiser
    steps), with `epoch` beside them.
    """

    def __init__(
        self,
        experiment_name: str = "default",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        run_id: str | None = None,
        unwritten: dict | None = None,
    ) -> None:
        """`unwritten`: what the checkpoint a fit resumes from recorded as not yet written
        (`LatestCheckpoint`); written on opening the run if the run lacks it."""
        uri = resolve_tracking_uri(tracking_uri)
        root = local_store_root(uri)
        artifact_location = None
        if root is not None:
            check_writable(root)
            artifact_location = experiment_dir(experiment_name, uri).resolve().as_uri()
        with store_lock(root):  # Lightning's logger opens the store here
            super().__init__(
                experiment_name=experiment_name,
                run_name=run_name,
                tracking_uri=uri,
                tags=tags,
                artifact_location=artifact_location,
                run_id=run_id,
            )
        self.tracking_uri = uri
        self.folder = folder_name(experiment_name)
        self.opened = False  # whether the run exists: `experiment` was touched
        self.store_root = root if root is not None else Path("mlruns")
        self.resumed = run_id is not None
        self.named = run_name is not None
        self.unwritten_at_resume = unwritten
        self.failure: tuple[str, str] | None = None  # (status, reason), set by `RunStatus`
        self._pending: dict[str, float] = {}  # metrics not yet written, see `log_metrics`
        self._pending_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self):
        """The client; a resumed run is set back to RUNNING when first touched, a new one gets
        a readable name unique in its experiment."""
        if self.opened:
            return super().experiment
        with unseeded_random():
            client = super().experiment
        self.opened = True
        if self.resumed:
            client.update_run(self.run_id, status="RUNNING")
            self.write_if_missing(client, self.unwritten_at_resume)
        elif not self.named:
            self.make_name_unique(client)
        return client

    def unwritten(self, trainer: Trainer) -> dict:
        """The epoch's metrics at its end, before Lightning hands them over: the validation
        ones waiting here and the training ones the module has just logged."""
        step = trainer.global_step
        metrics = dict(self._pending) if self._pending_step == step else {}
        metrics.update(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        )
        metrics["epoch"] = float(trainer.current_epoch)
        return {"step": step, "metrics": metrics}

    def write_if_missing(self, client, unwritten: dict | None) -> None:
        """A job killed between its checkpoint and its MLflow write: write that epoch now."""
        if not unwritten:
            return
        steps = {m.step for m in client.get_metric_history(self.run_id, "epoch")}
        if unwritten["step"] not in steps:
            super().log_metrics(unwritten["metrics"], step=unwritten["step"])

    def make_name_unique(self, client) -> None:
        """A random name drawn twice in one experiment gets the run id's head appended."""
        run = client.get_run(self.run_id)
        name = run.info.run_name.replace("'", "")
        same = client.search_runs(
            [run.info.experiment_id], f"attributes.run_name = '{name}'", max_results=2
        )
        if len(same) > 1:
            client.update_run(self.run_id, name=f"{name}-{self.run_id[:6]}")

    def finalize(self, status: str = "success") -> None:
        """As Lightning's, but an interrupted run ends KILLED and a failed one says why."""
        reason = None
        if status == "failed" and self.failure is not None and self.opened:
            status, reason = self.failure
        try:
            self._finalize(status, reason)
        except Exception:  # noqa: BLE001
            # Ctrl-C inside an SQLite write leaves its transaction open ("database is locked"):
            # drop the store's connections and write the status on a fresh one
            engine = getattr(getattr(self._mlflow_client._tracking_client, "store", None),
                             "engine", None)  # fmt: skip
            if engine is None:
                raise
            engine.dispose()
            self._finalize(status, reason)

    def _finalize(self, status: str, reason: str | None) -> None:
        if status == "KILLED":  # an interrupted epoch's validation: rerun and recorded on resume
            self._pending = {}
        self.flush()
        if reason is not None:
            self.experiment.set_tag(self.run_id, "mlplab.failure", reason[:5000])
        super().finalize(status)

    @property
    def save_dir(self) -> str:
        return str(self.store_root)

    @property
    def name(self) -> str:
        return self.folder

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One write per epoch: an epoch's validation metrics wait for its training metrics,
        which Lightning logs last (a write to SQLite costs ~8 ms here, whatever its size).
        Anything still waiting is written when the step changes and in `finalize`."""
        if self._pending and step != self._pending_step:
            self.flush()
        self._pending.update(metrics)
        self._pending_step = step
        if any(key.startswith("train/") for key in metrics):
            self.flush()

    def flush(self) -> None:
        if self._pending:
            super().log_metrics(self._pending, step=self._pending_step)
            self._pending = {}  # only once written: a failed write is retried by `finalize`


@contextlib.contextmanager
def unseeded_random():
    """MLflow draws run names from Python's `random`, which `seed_everything` seeded: every run
    of a seed would get one name. Draw them from fresh entropy and give the seeded state back."""
    state = random.getstate()
    random.seed()
    try:
        yield
    finally:
        random.setstate(state)


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
    as a flattened param (Lightning's own callback writes to a `log_dir` MLflow has not got).

    A fit logs its params in `on_fit_start`, after Lightning's `BatchSizeFinder` and
    `LearningRateFinder` (which Lightning calls first) have run, so `data.batch_size` and
    `model.lr` are the values trained with. Every checkpoint carries the config, so
    `mlplab test --ckpt_path X` needs no other.
    """

    params: dict[str, Any] | None = None
    dumped: str | None = None  # the config as YAML, made once (jsonargparse takes ~0.1 s)

    def config_text(self) -> str:
        if self.dumped is None:
            self.dumped = self.parser.dump(self.config, skip_none=False)
        return self.dumped

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLflowRunLogger):
            return
        client, run_id = logger.experiment, logger.run_id
        config = self.config.clone()
        for key in ("config", "tags"):  # the YAML files' paths and the tags: not settings
            config.pop(key, None)
        params = flatten_config(config.as_dict())
        params["trainer.world_size"] = trainer.world_size
        params["trainer.nodes_used"] = trainer.num_nodes
        for shape in ("num_features", "num_classes", "num_targets"):  # linked, so not in the YAML
            if hasattr(trainer.datamodule, shape):
                params[f"data.{shape}"] = getattr(trainer.datamodule, shape)
        name = "config.yaml"
        if logger.resumed:  # params are write-once: keep the first, record each resumption's config
            logged = client.get_run(run_id).data.params
            params = {k: v for k, v in params.items() if k not in logged}
            artifacts = {f.path for f in client.list_artifacts(run_id)}
            name = next(f"config-resume-{i}.yaml" for i in range(1, 10**6)
                        if f"config-resume-{i}.yaml" not in artifacts)  # fmt: skip
        client.log_text(run_id, self.config_text(), name)
        self.params = params
        if stage != "fit":
            self.log_params(trainer, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module) -> None:
        self.log_params(trainer, pl_module)
        if isinstance(trainer.logger, MLflowRunLogger) and trainer.is_global_zero:
            log_datasets(trainer.logger, trainer.datamodule)

    def log_params(self, trainer: Trainer, pl_module) -> None:
        if self.params is None:
            return
        used = {
            "data.batch_size": getattr(trainer.datamodule, "batch_size", None),
            "model.lr": pl_module.hparams.get("lr"),
        }
        tuned = [k for k, v in used.items() if k in self.params and v != self.params[k]]
        self.params.update({k: used[k] for k in tuned})
        logger = trainer.logger
        if tuned:  # a tuner callback changed them; the config has the values it started from
            logger.experiment.set_tag(logger.run_id, "mlplab.tuned", ",".join(tuned))
        logger.log_hyperparams(self.params)
        self.params = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["mlplab_config"] = self.config_text()


def log_datasets(logger: MLflowRunLogger, datamodule) -> None:
    """The splits a fit uses as MLflow dataset inputs (name, source, digest, shapes, the split
    as context), so the UI's Datasets column and filter work. Datamodules holding their splits
    in memory (`data`: split -> (features, targets)) have them all; others are not described."""
    data = getattr(datamodule, "data", None)
    if not isinstance(data, dict) or not data:
        return
    import warnings

    import mlflow.data
    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = type(datamodule).__name__.removesuffix("DataModule").lower()
    source = getattr(datamodule, "raw_dir", None)  # image data: the files; else made in code
    inputs = []
    for split, (x, y) in data.items():
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(
                x.cpu().numpy(), targets=y.cpu().numpy(), name=f"{name}-{split}",
                source=str(source) if source is not None else None,
            )  # fmt: skip
        context = InputTag("mlflow.data.context", split)
        inputs.append(DatasetInput(Dataset(**dataset.to_dict()), tags=[context]))
    logger.experiment.log_inputs(logger.run_id, datasets=inputs)


def input_example(datamodule, rows: int = 5) -> torch.Tensor:
    """A few raw training inputs: the logged model's example and the source of its signature."""
    data = getattr(datamodule, "data", None)
    if isinstance(data, dict) and "train" in data:
        return data["train"][0][:rows]
    batch = next(iter(datamodule.train_dataloader()))
    return (batch[0] if isinstance(batch, list | tuple) else batch)[:rows]


def log_model(
    logger: MLflowRunLogger,
    module,
    datamodule,
    step: int = 0,
    best: str = "",
    latest: str = "",
) -> str | None:
    """Log the module as an MLflow PyTorch model with signature and input example: its
    `inference_module()` if it has one (raw inputs in, the task's outputs out), else itself.

    `step` is the global step of the checkpoint the weights come from (`best`), so the logged
    model carries that epoch's metrics, and the run's test metrics beside them. The `latest`
    checkpoint, when it is another file, is recorded as an external logged model (the
    checkpoint is its artifact), so both are found with `mlflow.search_logged_models`.

    Returns the model's URI (`models:/<model_id>`; `runs:/<run_id>/model` loads it too), or
    None, having said why, when the module cannot predict on its own training inputs.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.entities import LoggedModelOutput
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
    mlflow.set_tracking_uri(logger.tracking_uri)
    client, run_id = logger.experiment, logger.run_id
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            inference,
            name="model",
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=requirements,
            serialization_format="pt2",  # torch.export: loads and serves without mlplab's code
            step=step,  # MLflow links the run's metrics at this step to the model
            tags={"mlplab.checkpoint": "best", "mlplab.checkpoint_path": best},
        )
        link_metrics(client, run_id, info.model_id, prefix="test/")
        if latest and latest != best:
            latest_step = read_checkpoint(latest)["global_step"]
            external = mlflow.create_external_model(
                name="last",
                source_run_id=run_id,
                tags={"mlplab.checkpoint": "last", "mlplab.checkpoint_path": latest},
            )
            client.log_outputs(run_id, [LoggedModelOutput(external.model_id, step=latest_step)])
            link_metrics(client, run_id, external.model_id, step=latest_step)
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
