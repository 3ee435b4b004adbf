"""The checkpoint callback the CLI configures (`--checkpoint.*`)."""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, saying in public whether it acts within an epoch: the fast
    path (`mlplab.fast_path`) keeps chunks of batches only where nothing needs single batches."""

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            **kwargs,
        )
        self.within_epoch = bool(every_n_train_steps) or train_time_interval is not None
