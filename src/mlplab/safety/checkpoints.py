"""The checkpoint callbacks the CLI configures (`--checkpoint.*`): the best, and the latest."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint as CheckpointBase
from lightning.pytorch.callbacks import ModelCheckpoint

from mlplab.direction import better
from mlplab.errors import UserError
from mlplab.safety import metadata

# what a `Checkpoint` given no `monitor` ranks by, where the module logs it (mlplab's tasks do)
DEFAULT_MONITOR = "val/loss"


class Checkpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, where `save_last` means the latest state.

    Lightning 2.6 writes `last.ckpt` only beside a new top-k checkpoint, so with a top-1
    monitored checkpoint "last" is the best, not the newest. Here `save_last=True` adds a
    `LatestCheckpoint` (the CLI puts `latest` among the callbacks), which rewrites `last.ckpt`
    at every epoch end: `--ckpt_path last` resumes where training was.

    `monitor` left unset is chosen once, at the first save (after the first validation, where
    the fit validates): `val/loss` if the module logs it, else none, Lightning's default (each
    save replaces the previous, so the best is the latest). A `monitor` the module never logs
    ends the fit with one line naming the metrics it does log.

    `mode` left unset follows `monitor`'s name (`mlplab.direction`): `--checkpoint.monitor val/acc`
    keeps the highest accuracy; a `mode` given wins.

    A module that returns its own `ModelCheckpoint` from `configure_callbacks` has it in this
    one's place, as Lightning puts it in the place of its default one (Lightning replaces only
    callbacks of the model's callback's class or a parent class, and this is a subclass);
    `latest` then keeps `last.ckpt` beside the module's checkpoints.

    `within_epoch` says in public whether it saves inside an epoch: the fast path
    (`mlplab.speed.fast_path`) keeps chunks of batches only where nothing needs single batches.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        save_last: bool | None = None,
        save_weights_only: bool = False,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        **kwargs,
    ) -> None:
        top_k = kwargs.get("save_top_k", 1)
        if monitor is None and top_k not in (-1, 0, 1):  # Lightning refuses it without a monitor
            kwargs["save_top_k"] = 1  # until the monitor is chosen (`choose_monitor`)
        super().__init__(
            dirpath=dirpath,
            monitor=monitor,
            mode=mode or (better(monitor) if monitor else "min"),
            save_last=False,
            save_weights_only=save_weights_only,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end,
            **kwargs,
        )
        self.save_top_k = top_k
        self.given_monitor, self.given_mode = monitor, mode
        self.chosen = monitor is not None  # whether `monitor` is settled
        self.validated = False  # whether a validation of the fit (not the sanity check) ended
        self.within_epoch = bool(every_n_train_steps) or train_time_interval is not None
        self.latest = LatestCheckpoint(self, every_n_train_steps) if save_last else None

    @property
    def state_key(self) -> str:
        """Lightning files the callback's state under a key made of its settings, `monitor`
        among them: here the monitor as given, so a resumed fit finds the state of a fit whose
        monitor was chosen (`load_state_dict` takes the choice back)."""
        if self.given_monitor is not None or self.monitor is None:
            return super().state_key
        chosen, self.monitor, self.mode = (self.monitor, self.mode), None, self.given_mode or "min"
        try:
            return super().state_key
        finally:
            self.monitor, self.mode = chosen

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mlplab_monitor_chosen": self.chosen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.chosen and state_dict.get("mlplab_monitor_chosen"):
            self.set_monitor(state_dict.get("monitor"))
        super().load_state_dict(state_dict)

    def set_monitor(self, monitor: str | None) -> None:
        """Settle `monitor` (and `mode`, unless given); before any checkpoint is ranked."""
        self.monitor, self.chosen = monitor, True
        if monitor is not None:
            self.mode = self.given_mode or better(monitor)
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)

    def choose_monitor(self, trainer: Trainer, final: bool) -> bool:
        """Whether `monitor` is settled: `val/loss` as soon as the module has logged it; none
        once it has had its chance to (`final`). A `save_top_k` over 1 needs a metric to rank."""
        if self.chosen:
            return True
        if DEFAULT_MONITOR in trainer.callback_metrics:
            self.set_monitor(DEFAULT_MONITOR)
        elif not final:
            return False
        elif self.save_top_k not in (-1, 0, 1):
            raise UserError(
                f"--checkpoint.save_top_k {self.save_top_k} ranks checkpoints by a metric, and "
                f"the module logs no {DEFAULT_MONITOR!r}; it logs {logged(trainer)}. Give "
                "--checkpoint.monitor, or keep save_top_k 1 (the latest) or -1 (every one)"
            )
        else:
            self.set_monitor(None)
        return True

    def validation_pending(self, trainer: Trainer) -> bool:
        """Whether a validation that may log the monitored metric is still to come."""
        if self.validated or not trainer.enable_validation:
            return False
        batches = trainer.num_val_batches
        return not batches or sum(batches) > 0  # not yet counted, or some to run

    def missing(self, trainer: Trainer) -> str:
        return (
            f"--checkpoint.monitor {self.monitor}: the module logs no {self.monitor!r}; it logs "
            f"{logged(trainer)}. Monitor one of those, or leave --checkpoint.monitor out to keep "
            "the latest checkpoint"
        )

    def check_logged(self, trainer: Trainer) -> None:
        """Once a validation has run, the monitored metric is logged, or one line names what is
        (where Lightning's own save raises a MisconfigurationException, with a traceback)."""
        if self.monitor is not None and self.validated and not trainer.fast_dev_run:
            if self.monitor not in trainer.callback_metrics:
                raise UserError(self.missing(trainer))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        declared = declared_checkpoint(trainer, pl_module, self)
        if declared is not None:  # the module's own takes this one's place, first among the
            # checkpoints (`trainer.checkpoint_callback`, whose best `fit` tests and logs)
            trainer.callbacks = [
                declared if callback is self else callback
                for callback in trainer.callbacks
                if callback is not declared
            ]
            if self.latest is not None:
                self.latest.owner = declared
            return
        super().setup(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if self.choose_monitor(trainer, final=not self.validation_pending(trainer)):
            self.check_logged(trainer)
            super().on_train_batch_end(trainer, pl_module, *args)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.choose_monitor(trainer, final=not self.validation_pending(trainer)):
            return
        if (
            self.monitor is not None
            and self.monitor not in trainer.callback_metrics
            and not self.validation_pending(trainer)
            and not trainer.fast_dev_run
        ):  # no validation logs it: Lightning would warn at every epoch and never save
            raise UserError(self.missing(trainer))
        self.check_logged(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.validated = True
            self.choose_monitor(trainer, final=True)
        if self.chosen:  # (a metric of the training epoch is not logged yet: checked there)
            super().on_validation_end(trainer, pl_module)


def logged(trainer: Trainer) -> str:
    """The metrics the module has logged, for a line that names them."""
    names = sorted(trainer.callback_metrics)
    return ", ".join(map(repr, names)) if names else "none (it calls no self.log)"


def declared_checkpoint(
    trainer: Trainer, pl_module: LightningModule, checkpoint: Checkpoint
) -> ModelCheckpoint | None:
    """The `ModelCheckpoint` the module's `configure_callbacks` put among the trainer's
    callbacks, if it returned one."""
    if type(pl_module).configure_callbacks is LightningModule.configure_callbacks:
        return None
    declared = pl_module.configure_callbacks()
    declared = declared if isinstance(declared, Sequence) else [declared]
    kinds = {type(callback) for callback in declared if isinstance(callback, ModelCheckpoint)}
    for callback in trainer.callbacks:
        if type(callback) in kinds and callback is not checkpoint:
            return callback
    return None


class LatestCheckpoint(CheckpointBase):
    """`last.ckpt`: the state after the newest completed epoch (with `every_n_train_steps`, the
    newest such step), written beside the `Checkpoint` it belongs to, atomically (a job killed
    while saving keeps the previous one).

    As a Lightning `Checkpoint` it runs after the module's `on_train_epoch_end`, with the epoch's
    metrics known but not yet written by the logger: it stores them (`unwritten`), so a job
    killed in between resumes with that epoch recorded once (`MLflowRunLogger`).

    Its `owner` is the module's own `ModelCheckpoint` where the module returned one (see
    `Checkpoint`); one that saves its own `last.ckpt` (`save_last`) is left to write it."""

    def __init__(self, owner: ModelCheckpoint, every_n_train_steps: int | None = None) -> None:
        self.owner = owner
        self.every_n_train_steps = every_n_train_steps
        self.within_epoch = bool(every_n_train_steps)
        self.written = ""  # the newest written
        self.at_epoch_end = False

    @property
    def path(self) -> str:
        """The newest `last.ckpt` ("" if none was written yet)."""
        return self.owner.last_model_path if self.owner.save_last else self.written

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.at_epoch_end = True
        try:
            self.save(trainer)
        finally:
            self.at_epoch_end = False

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self.save(trainer)

    def save(self, trainer: Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or self.owner.dirpath is None:
            return
        if self.owner.save_last:  # the module's checkpoint keeps its own
            return
        path = os.path.join(self.owner.dirpath, f"{self.owner.CHECKPOINT_NAME_LAST}.ckpt")
        trainer.save_checkpoint(f"{path}.part", weights_only=self.owner.save_weights_only)
        if trainer.is_global_zero:  # `save_checkpoint` ends with a barrier: the file is whole
            os.replace(f"{path}.part", path)
        self.written = path

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        unwritten = getattr(trainer.logger, "unwritten", None)
        if self.at_epoch_end and unwritten is not None:
            metadata.write_unwritten(checkpoint, unwritten(trainer))


def latest_checkpoint(trainer: Trainer) -> str:
    """The path of the run's newest `last.ckpt` ("" if none was written yet)."""
    for callback in trainer.callbacks:
        if isinstance(callback, LatestCheckpoint):
            return callback.path
    return ""
