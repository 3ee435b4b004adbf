"""MLflow tracking: where the store is, how runs are laid out, what each run records."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException

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


def check_writable(root: Path) -> None:
    """A local store must be writable; say so before SQLite does it with a traceback."""
    from mlplab.errors import UserError

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the MLflow store folder {root} ({err.strerror}); "
            "choose a writable place with --tracking_uri or MLFLOW_TRACKING_URI"
        ) from None
    database = root / "mlflow.db"
    if not os.access(root, os.W_OK) or (database.exists() and not os.access(database, os.W_OK)):
        raise UserError(
            f"the MLflow store in {root} is not writable; fix its permissions or choose "
            "another store with --tracking_uri or MLFLOW_TRACKING_URI"
        )


def check_reachable(tracking_uri: str | None) -> None:
    """A tracking server must answer now, not after minutes of retries (the CLI caps MLflow's
    HTTP retries and timeout; see `mlplab.cli.main`)."""
    from mlplab.errors import UserError

    uri = resolve_tracking_uri(tracking_uri)
    if urlparse(uri).scheme not in ("http", "https"):
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # connection refused, DNS, timeout, HTTP errors: all say the same
        reason = str(err).splitlines()[0][:200]
        raise UserError(
            f"the MLflow tracking server {uri} does not answer ({reason}); start it, or unset "
            "MLFLOW_TRACKING_URI to use the local store"
        ) from None


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it laid out as `MLflowLogger` lays out a local store
    (`<store>/<experiment>/`), whoever creates it first (fit, sweep or baseline)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = local_store_root(tracking_uri)
    location = experiment_dir(name, tracking_uri).resolve().as_uri() if root else None
    return client.create_experiment(name, artifact_location=location)


class RunStatus(Callback):
    """Why a run ended early, for `MLflowLogger.finalize`: Ctrl-C and SIGTERM mark it KILLED,
    an error FAILED with its message as the `mlplab.failure` tag."""

    def on_exception(self, trainer: Trainer, pl_module, exception: BaseException) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLflowLogger):
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


def experiment_dir(experiment_name: str, tracking_uri: str | None = None) -> Path:
    """Where the runs of an experiment keep their checkpoints: `<store>/<experiment>/`."""
    root = local_store_root(resolve_tracking_uri(tracking_uri))
    return (root if root is not None else Path("mlruns")) / _folder_name(experiment_name)


@contextlib.contextmanager
def store_lock(root: Path | None):
    """Serialise opening a local store: the first client creates the SQLite tables, and
    processes starting together (DDP ranks, parallel runs) must not all try at once."""
    if root is None:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".mlplab.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
        self.store_root = root if root is not None else Path("mlruns")
        self.resumed = run_id is not None
        self.failure: tuple[str, str] | None = None  # (status, reason), set by `RunStatus`
        self._pending: dict[str, float] = {}  # metrics not yet written, see `log_metrics`
        self._pending_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self):
        """The client; a resumed run is set back to RUNNING when first touched."""
        reopening = self.resumed and not self._initialized
        client = super().experiment
        if reopening:
            client.update_run(self._run_id, status="RUNNING")
        return client

    def finalize(self, status: str = "success") -> None:
        """As Lightning's, but an interrupted run ends KILLED and a failed one says why."""
        reason = None
        if status == "failed" and self.failure is not None and self._initialized:
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
        self.flush()
        if reason is not None:
            self.experiment.set_tag(self.run_id, "mlplab.failure", reason[:5000])
        super().finalize(status)

    @property
    def save_dir(self) -> str:
        return str(self.store_root)

    @property
    def name(self) -> str:
        return _folder_name(self._experiment_name)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One write per epoch: an epoch's validation metrics wait for its training metrics,
        which Lightning logs last (a write to SQLite costs ~8 ms here, whatever its size).
        Anything still waiting is written when the step changes and in `finalize`."""
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        step = int(epoch) if epoch is not None else step
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
        client.log_text(run_id, self.parser.dump(self.config), name)
        logger.log_hyperparams(params)


def run_exists(tracking_uri: str | None, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    with store_lock(local_store_root(uri)):
        client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


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


def register_model(model_uri: str, name: str, tracking_uri: str | None = None) -> str:
    """Register a logged model in the Model Registry; returns `models:/<name>/<version>`."""
    import logging

    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    logging.getLogger("mlflow.tracking._model_registry.client").setLevel(logging.WARNING)
    version = mlflow.register_model(model_uri, name)
    uri = f"models:/{name}/{version.version}"
    print(f"mlplab: registered {model_uri} as {uri}")
    return uri
