"""The checkpoint callbacks the CLI configures (`--checkpoint.*`): the best, and the latest."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint as CheckpointBase
from lightning.pytorch.callbacks import ModelCheckpoint

from mlplab.direction import better


class Checkpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, where `save_last` means the latest state.

    Lightning 2.6 writes `last.ckpt` only beside a new top-k checkpoint, so with a top-1
    monitored checkpoint "last" is the best, not the newest. Here `save_last=True` adds a
    `LatestCheckpoint` (the CLI puts `latest` among the callbacks), which rewrites `last.ckpt`
    at every epoch end: `--ckpt_path last` resumes where training was.

    `mode` left unset follows `monitor`'s name (`mlplab.direction`): `--checkpoint.monitor val/acc`
    keeps the highest accuracy; a `mode` given wins.

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
        self.within_epoch = bool(every_n_train_steps) or train_time_interval is not None
        self.latest = LatestCheckpoint(self, every_n_train_steps) if save_last else None


class LatestCheckpoint(CheckpointBase):
    """`last.ckpt`: the state after the newest completed epoch (with `every_n_train_steps`, the
    newest such step), written beside the `Checkpoint` it belongs to, atomically (a job killed
    while saving keeps the previous one).

    As a Lightning `Checkpoint` it runs after the module's `on_train_epoch_end`, with the epoch's
    metrics known but not yet written by the logger: it stores them (`unwritten`), so a job
    killed in between resumes with that epoch recorded once (`MLflowRunLogger`)."""

    def __init__(self, owner: Checkpoint, every_n_train_steps: int | None = None) -> None:
        self.owner = owner
        self.every_n_train_steps = every_n_train_steps
        self.within_epoch = bool(every_n_train_steps)
        self.path = ""  # the newest written
        self.at_epoch_end = False

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
        path = os.path.join(self.owner.dirpath, f"{self.owner.CHECKPOINT_NAME_LAST}.ckpt")
        trainer.save_checkpoint(f"{path}.part", weights_only=self.owner.save_weights_only)
        if trainer.is_global_zero:  # `save_checkpoint` ends with a barrier: the file is whole
            os.replace(f"{path}.part", path)
        self.path = path

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        unwritten = getattr(trainer.logger, "unwritten", None)
        if self.at_epoch_end and unwritten is not None:
            checkpoint["mlplab_unwritten"] = unwritten(trainer)


def latest_checkpoint(trainer: Trainer) -> str:
    """The path of the run's newest `last.ckpt` ("" if none was written yet)."""
    for callback in trainer.callbacks:
        if isinstance(callback, LatestCheckpoint):
            return callback.path
    return ""
