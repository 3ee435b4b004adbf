"""What mlplab keeps in a checkpoint beside Lightning's keys: written and read only here.

- `mlplab_task`: the LightningModule's class, so `predict --model` and `export` rebuild it;
- `mlplab_outputs`: what names the outputs (classes, targets, column encoding);
- `mlflow_run_id`: the run a resumed fit continues;
- `mlplab_config`: the config the fit ran (`validate|test|predict --ckpt_path` alone reuse it);
- `mlplab_unwritten`: what a run journal still holds for an absent tracking server.

Every read goes through `mlplab.safety.trust.read_checkpoint` (one `torch.load`, weights only,
names checked); `CheckpointMetadata`, which the CLI adds to every run, writes the first three
and stores the hyper-parameters as plain settings (`trust.plain_hyperparameters`).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger

from mlplab.errors import UserError
from mlplab.safety import trust

TASK = "mlplab_task"
OUTPUTS = "mlplab_outputs"
RUN_ID = "mlflow_run_id"
CONFIG = "mlplab_config"
UNWRITTEN = "mlplab_unwritten"


class CheckpointMetadata(Callback):
    """Writes the module's class, its outputs' names and the MLflow run id into every
    checkpoint, with the hyper-parameters as plain data."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint) -> None:
        logger = trainer.logger
        run_id = logger.run_id if isinstance(logger, MLFlowLogger) else None
        write_fit(checkpoint, pl_module, trainer.datamodule, run_id)


def write_fit(checkpoint: dict, module: LightningModule, datamodule, run_id: str | None) -> None:
    """The module's class, its outputs' names and the run a resumed fit continues; the
    hyper-parameters Lightning put in as plain data."""
    if "hyper_parameters" in checkpoint:
        checkpoint["hyper_parameters"] = trust.plain_hyperparameters(
            checkpoint["hyper_parameters"], type(module)
        )
    checkpoint[TASK] = f"{type(module).__module__}.{type(module).__qualname__}"
    checkpoint[OUTPUTS] = described_outputs(datamodule, module)
    if run_id is not None:
        checkpoint[RUN_ID] = run_id


def described_outputs(datamodule, task=None) -> dict:
    """What names a model's outputs and encodes its inputs, from the data it trained on (a
    classifier's classes are numbered where the data does not name them): kept in checkpoints
    and logged models, so predictions come back as named columns."""
    encoding = getattr(datamodule, "encoding", None)
    class_names = getattr(datamodule, "class_names", None)
    if class_names is None and hasattr(task, "num_classes"):
        class_names = [str(i) for i in range(task.num_classes)]
    return {
        "class_names": class_names,
        "target_names": getattr(datamodule, "target_names", None),
        "encoding": encoding.to_dict() if encoding is not None else None,
    }


def write_config(checkpoint: dict, text: str) -> None:
    checkpoint[CONFIG] = text


def write_unwritten(checkpoint: dict, unwritten) -> None:
    checkpoint[UNWRITTEN] = unwritten


def config(path: str | Path) -> str | None:
    return trust.read_checkpoint(path).get(CONFIG)


def unwritten(path: str | Path):
    return trust.read_checkpoint(path).get(UNWRITTEN)


def run_id(path: str | Path) -> str | None:
    """The MLflow run a checkpoint was written by."""
    return trust.read_checkpoint(path).get(RUN_ID)


def outputs(path: str | Path) -> dict | None:
    return trust.read_checkpoint(path).get(OUTPUTS)


def load_module(path: str | Path, map_location: str = "cpu") -> LightningModule:
    """The LightningModule a checkpoint holds, whichever class it is, in eval mode: read as
    data and its names checked first (`--weights_only false` trusts the file)."""
    trusted = trust.checkpoints_trusted()
    name = trust.read_checkpoint(path, trust=trusted).get(TASK)
    if name is None:
        raise UserError(f"{path} names no module class (not written by `mlplab fit`)")
    module_class = trust.resolve_class(name)
    if not (isinstance(module_class, type) and issubclass(module_class, LightningModule)):
        raise UserError(f"{path} names {name}, not a LightningModule")
    return module_class.load_from_checkpoint(
        path, map_location=map_location, weights_only=not trusted
    ).eval()
