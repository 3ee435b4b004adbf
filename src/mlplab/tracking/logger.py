"""MLflow tracking: the run logger, what each run records (config, params, status, model)."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

# Lightning's exceptions have no other import path (its API reference lists no module for them)
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mlplab.errors import RunKilled
from mlplab.safety import interrupts, metadata
from mlplab.safety.checkpoints import latest_checkpoint
from mlplab.tracking.journal import Journal, RunWriter
from mlplab.tracking.store import (
    ensure_experiment,
    experiment_dir,
    folder_name,
    local_store_root,
    redact_uri,
    resolve_tracking_uri,
    store_lock,
)


class RunStatus(Callback):
    """Why a run ended early, for `MLflowRunLogger.finalize`: Ctrl-C, SIGTERM and `RunKilled`
    (a pruned search trial) mark it KILLED, an error FAILED, with the reason as the
    `mlplab.failure` tag."""

    def on_exception(self, trainer: Trainer, pl_module, exception: BaseException) -> None:
        logger = trainer.logger
        if isinstance(logger, MLflowRunLogger):
            kept = os.path.isfile(latest_checkpoint(trainer) or "")
            logger.failed_with(exception, say=trainer.is_global_zero, resumable=kept)


class MLflowRunLogger(MLFlowLogger):
    """Lightning's MLflow logger, with a store laid out for people, one write per epoch, and
    writes that survive a tracking server's outage.

    Each run has a folder `<store>/<experiment>/<run_id>/` (for a server, under `mlruns/`):
    `checkpoints/` (Lightning's `ModelCheckpoint` finds it through `save_dir`/`name`/`version`),
    and, for a local store, `artifacts/`; for a server, `journal/`, where every write waits
    until the server has it (`mlplab.tracking.journal`). Metrics are logged at the global step
    (optimiser steps), with `epoch` beside them.
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
        if root is not None:  # the store is open already (`mlplab.tracking.store.open_store`)
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
        self.experiment_name = experiment_name
        self.folder = folder_name(experiment_name)
        self.writer: RunWriter | None = None  # set when the run is opened (`experiment`)
        self.opening = False
        self.store_root = root if root is not None else Path("mlruns")
        self.local = root is not None
        self.resumed = run_id is not None
        self.named = run_name is not None
        self.unwritten_at_resume = unwritten
        self.failure: tuple[str, str] | None = None  # (status, reason), set by `RunStatus`
        # `fit` tests and logs the model after Lightning's fit has finalized the run: it stays
        # RUNNING until `finish`, so it is never FINISHED without them
        self.keep_open = False
        self.tested_step: int | None = None  # where test metrics go (`log_metrics`)
        self.ended = False  # its status is written
        self.stopped_on_purpose = False  # `RunKilled`: the last validation stays (it decided)
        self._pending: dict[str, float] = {}  # metrics not yet written, see `log_metrics`
        self._pending_step: int | None = None

    @property
    def opened(self) -> bool:
        """Whether the run exists: `experiment` was touched."""
        return self.writer is not None

    @property
    @rank_zero_experiment
    def experiment(self) -> RunWriter:
        """The run's writer (MLflow's client for reads). A resumed run first sends what its
        journal kept and is set back to RUNNING; a new one gets a readable name unique in its
        experiment."""
        if self.writer is not None:
            return self.writer
        if self.opening:  # Lightning's `run_id` asks for it while the run is being opened
            return super().experiment
        self.opening = True
        try:
            # made whole before a Ctrl-C or SIGTERM arrives, so whoever handles it finds the
            # run to end KILLED (one cut between its creation and its writer stayed RUNNING)
            with interrupts.deferred():
                return self.open_run()
        finally:
            self.opening = False

    def open_run(self) -> RunWriter:
        if not self.resumed:  # Lightning's own creation fails for all but one of a crowd
            from mlflow import MlflowClient

            ensure_experiment(MlflowClient(self.tracking_uri), self.experiment_name,
                              self.tracking_uri)  # fmt: skip
        with unseeded_random():
            client = super().experiment
        journal = None
        if not self.local:
            folder = Path(self.save_dir) / self.name / self.run_id / "journal"
            journal = Journal.open(folder, self.tracking_uri, self.run_id)
        self.writer = RunWriter(client, self.run_id, self.tracking_uri, journal)
        if self.resumed:
            self.writer.drain()
            self.writer.update_run(self.run_id, status="RUNNING")
            if "mlplab.failure" in self.writer.get_run(self.run_id).data.tags:
                self.writer.delete_tag(self.run_id, "mlplab.failure")  # the killed attempt's
            self.write_if_missing(self.unwritten_at_resume)
        elif not self.named:
            self.make_name_unique(client)
        return self.writer

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

    def write_if_missing(self, unwritten: dict | None) -> None:
        """A job killed between its checkpoint and its MLflow write: write that epoch now."""
        if not unwritten or self.writer.away:
            return
        history = self.writer.client.get_metric_history(self.run_id, "epoch")
        if unwritten["step"] not in {m.step for m in history}:
            super().log_metrics(unwritten["metrics"], step=unwritten["step"])

    def make_name_unique(self, client) -> None:
        """A random name drawn twice in one experiment gets the run id's head appended."""
        run = client.get_run(self.run_id)
        name = run.info.run_name.replace("'", "")
        same = client.search_runs(
            [run.info.experiment_id], f"attributes.run_name = '{name}'", max_results=2
        )
        if len(same) > 1:
            self.writer.update_run(self.run_id, name=f"{name}-{self.run_id[:6]}")

    def failed_with(
        self, exception: BaseException, say: bool = True, resumable: bool = True
    ) -> None:
        """The status and reason the run ends with (`finalize("failed")`) after `exception`."""
        if isinstance(exception, RunKilled):
            self.failure = ("KILLED", str(exception))
            self.stopped_on_purpose = True
        elif interrupts.exit_code(exception) is not None:  # Ctrl-C or SIGTERM, as it surfaced
            if isinstance(exception, SystemExit) and not isinstance(exception, SIGTERMException):
                exception = exception.__context__  # Lightning's exit after a Ctrl-C
            self.failure = ("KILLED", f"interrupted ({type(exception).__name__})")
            if say and self.opened:
                then = (
                    "its last end-of-epoch checkpoint is kept: continue with --ckpt_path last"
                    if resumable
                    else "no epoch had ended: run the same command again"
                )
                print(f"mlplab: interrupted: run {self.run_id} marked KILLED; {then}",
                      file=sys.stderr)  # fmt: skip
                interrupts.State.said = True
        else:
            self.failure = ("FAILED", f"{type(exception).__name__}: {exception}")

    def finish(self, exception: BaseException | None = None) -> None:
        """End a run kept open after its fit: FINISHED, or as `exception` says."""
        self.keep_open = False
        if self.ended:  # Lightning ended it (a stage failed or was interrupted)
            return
        if exception is not None:
            self.failed_with(exception)
        self.finalize("success" if exception is None else "failed")

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """As Lightning's, but an interrupted run ends KILLED, a failed one says why, and the
        status goes through the writer (a journaled run keeps it while the server is away)."""
        if not self.opened:
            return
        if self.keep_open and status == "success":
            self.flush()
            return
        reason = None
        if status == "failed" and self.failure is not None:
            status, reason = self.failure
        status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(
            status, status
        )
        try:
            self._finalize(status, reason)
        except Exception:  # noqa: BLE001
            # Ctrl-C inside an SQLite write leaves its transaction open ("database is locked"):
            # drop the store's connections and write the status on a fresh one. MLflow's client
            # has no public way to release them (mlflow/mlflow#2650): its private store's engine
            store = getattr(self.writer.client._tracking_client, "store", None)
            engine = getattr(store, "engine", None)
            if engine is None:
                raise
            engine.dispose()
            self._finalize(status, reason)
        self.writer.settle()

    def _finalize(self, status: str, reason: str | None) -> None:
        if status == "KILLED" and not self.stopped_on_purpose:
            self._pending = {}  # an interrupted epoch's validation: rerun and recorded on resume
        self.flush()
        if reason is not None:
            self.writer.set_tag(self.run_id, "mlplab.failure", reason[:5000])
        self.writer.set_terminated(self.run_id, status)
        self.ended = True

    @property
    def save_dir(self) -> str:
        return str(self.store_root)

    @property
    def name(self) -> str:
        return self.folder

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One write per epoch: an epoch's validation metrics wait for its training metrics,
        which Lightning logs last (a write to SQLite costs ~8 ms here, whatever its size).
        Anything still waiting is written when the step changes and in `finalize`. Test
        metrics go at `tested_step`, where set: the step of the checkpoint tested, so charts
        and the logged model pair them with the weights that made them."""
        if self.tested_step is not None and any(k.startswith("test/") for k in metrics):
            step = self.tested_step
            # Lightning adds its current (last) epoch where a step logs none: not the tested one
            metrics = {k: v for k, v in metrics.items() if k != "epoch"}
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
        if isinstance(value, list) and any(isinstance(item, dict) for item in value):
            value = {str(i): item for i, item in enumerate(value)}  # callbacks.0, callbacks.1
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif value is not None and value != []:
            flat[name] = value
    return flat


def given_settings(args: list[str]) -> set[str]:
    """The settings `args` name, in `flatten_config`'s dotted scheme: its flags
    (`--model.init_args.lr=0.1` -> `model.lr`) and the keys of its config files."""
    import yaml

    given = set()
    for arg in args:
        if not arg.startswith("--"):
            continue
        flag = arg[2:].split("=", 1)[0]
        if flag in ("config", "c"):
            continue
        given.add(".".join(p for p in flag.split(".") if p not in ("init_args", "dict_kwargs")))
    for path in [v for a, v in zip(args, args[1:], strict=False) if a in ("--config", "-c")] + [
        a.split("=", 1)[1] for a in args if a.startswith("--config=")
    ]:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
        except (OSError, yaml.YAMLError):  # the CLI's own parse says what is wrong with it
            loaded = None
        if isinstance(loaded, dict):
            given.update(flatten_config(loaded))
    return given


def class_defaults(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The default of every init argument of each `class_path` in `config` (through `**kwargs`
    to its bases), in `flatten_config`'s dotted scheme."""
    import importlib
    import inspect

    found: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, list):
            value = {str(i): item for i, item in enumerate(value) if isinstance(item, dict)}
            found.update(class_defaults(value, f"{name}."))
        elif isinstance(value, dict) and isinstance(value.get("class_path"), str):
            module, _, attribute = value["class_path"].rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError, ValueError):
                cls = None
            for klass in cls.__mro__ if isinstance(cls, type) else ():
                try:
                    parameters = inspect.signature(klass.__init__).parameters.values()
                except (TypeError, ValueError):
                    break
                for p in parameters:
                    if p.default is not p.empty:
                        found.setdefault(f"{name}.{p.name}", p.default)
                if not any(p.kind is p.VAR_KEYWORD for p in parameters):
                    break
            found.update(class_defaults(value.get("init_args") or {}, f"{name}."))
        elif isinstance(value, dict):
            found.update(class_defaults(value, f"{name}."))
    return found


def plain(value: Any) -> Any:
    """A value as YAML holds it (tuples as lists), to compare a default with a setting."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# settings that say where a run goes and how mlplab keeps it, not what it trains: in the
# config artifact, not among the params a comparison reads
BOOKKEEPING = (
    "experiment_name", "run_name", "tracking_uri", "ckpt_path", "weights_only",
    "register_model", "register_alias", "verbose", "trainer.default_root_dir",
    "log_system_metrics", "tags",
)  # fmt: skip


def run_params(parser, config, given: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's params and every setting's value (defaults too), dotted: what the config files
    and the flags set (`given`), and settings that differ from their default; not bookkeeping,
    not a default left untouched (the Trainer's ~30 settings, the network's and optimizer's)."""
    config = config.clone()
    for key in ("config", "tags"):  # the YAML files' paths and the tags: not settings
        config.pop(key, None)
    if config.get("tracking_uri"):
        config.tracking_uri = redact_uri(config.tracking_uri)
    tree = config.as_dict()
    defaults = {**flatten_config(parser.get_defaults().as_dict()), **class_defaults(tree)}
    configured = flatten_config(tree)
    params = {
        k: v
        for k, v in configured.items()
        if k not in BOOKKEEPING
        and (k in given or k not in defaults or plain(defaults[k]) != plain(v))
    }
    return params, configured


def shapes(datamodule) -> dict[str, int]:
    """The data's shapes, linked into the model (so not in the YAML), as params."""
    return {f"data.{shape}": getattr(datamodule, shape)
            for shape in ("num_features", "num_classes", "num_targets")
            if hasattr(datamodule, shape)}  # fmt: skip


class MLflowSaveConfig(SaveConfigCallback):
    """Record the resolved config in the MLflow run: `config.yaml` as an artifact and every value
    as a flattened param (Lightning's own callback writes to a `log_dir` MLflow has not got).

    A fit logs its params in `on_fit_start`, after Lightning's `BatchSizeFinder` and
    `LearningRateFinder` (which Lightning calls first) have run, so `data.batch_size` and
    `model.lr` are the values trained with. Every checkpoint carries the config, so
    `mlplab test --ckpt_path X` needs no other.
    """

    params: dict[str, Any] | None = None
    configured: dict[str, Any] | None = None  # every setting's value, defaults too
    dumped: str | None = None  # the config as YAML, made once (jsonargparse takes ~0.1 s)

    def __init__(self, *args, given: set[str] = frozenset(), **kwargs) -> None:
        """`given`: the settings the config files and flags name (`given_settings`)."""
        super().__init__(*args, **kwargs)
        self.given = set(given)

    def config_text(self) -> str:
        if self.dumped is None:
            config = self.config
            uri = config.get("tracking_uri")
            if redact_uri(uri) != uri:  # a password in the URI is kept nowhere
                config = config.clone()
                config.tracking_uri = redact_uri(uri)
            self.dumped = self.parser.dump(config, skip_none=False)
        return self.dumped

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLflowRunLogger):
            return
        client, run_id = logger.experiment, logger.run_id
        params, self.configured = run_params(self.parser, self.config, self.given)
        params["trainer.world_size"] = trainer.world_size
        params["trainer.nodes_used"] = trainer.num_nodes
        params.update(shapes(trainer.datamodule))
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
        configured = self.configured or {}
        tuned = [k for k, v in used.items() if k in configured and v != configured[k]]
        self.params.update({k: used[k] for k in tuned})
        logger = trainer.logger
        if tuned:  # a tuner callback changed them; the config has the values it started from
            logger.experiment.set_tag(logger.run_id, "mlplab.tuned", ",".join(tuned))
        logger.log_hyperparams(self.params)
        self.params = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        metadata.write_config(checkpoint, self.config_text())


def log_datasets(logger: MLflowRunLogger, datamodule) -> None:
    """The splits a fit uses as MLflow dataset inputs (name, source, digest, shapes, the split
    as context), so the UI's Datasets column and filter work. Datamodules holding their splits
    in memory (`data`: split -> (features, targets)) have them all; others are not described."""
    inputs = dataset_inputs(datamodule)
    if inputs:
        logger.experiment.log_inputs(logger.run_id, datasets=inputs)


def dataset_inputs(datamodule) -> list:
    """`log_datasets`'s inputs, one per split (none for data not held in memory)."""
    data = getattr(datamodule, "data", None)
    if not isinstance(data, dict) or not data:
        return []
    import warnings

    import mlflow.data
    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = type(datamodule).__name__.removesuffix("DataModule").lower()
    # the user's file or folder, image data's files; else made in code
    source = getattr(datamodule, "source", None) or getattr(datamodule, "raw_dir", None)
    inputs = []
    for split, (x, y, *_) in data.items():
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(
                x.cpu().numpy(), targets=y.cpu().numpy(), name=f"{name}-{split}",
                source=str(source) if source is not None else None,
            )  # fmt: skip
        context = InputTag("mlflow.data.context", split)
        inputs.append(DatasetInput(Dataset(**dataset.to_dict()), tags=[context]))
    return inputs
