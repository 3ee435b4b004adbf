"""A fit whose training loss explodes stops as diverged: a failure, not a finished run."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping

from mlplab.errors import TrainingDiverged


class Divergence(EarlyStopping):
    """Ends the fit with `TrainingDiverged` (the run FAILED) when an epoch's `monitor` is NaN,
    infinite, or above `factor` times the loss of the first training batch (the untrained
    model's): a finite explosion is a failure too (`factor` None: only NaN and infinity).

    Lightning's `EarlyStopping(check_finite=True)` ends such a fit as finished; this ends it
    failed. As an `EarlyStopping` it runs after the module's `on_train_epoch_end` has logged
    the epoch's loss. A module that logs no `monitor` is not checked."""

    def __init__(self, monitor: str = "train/loss", factor: float | None = 1e4) -> None:
        super().__init__(monitor=monitor, mode="min", strict=False, check_on_train_epoch_end=True)
        if factor is not None and not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"divergence.factor must be a positive number, got {factor}")
        self.factor = factor
        self.initial: float | None = None  # the first training batch's loss

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.initial is not None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # averaged over DDP ranks, so all judge alike
            self.initial = float(trainer.strategy.reduce(loss.detach(), reduce_op="mean"))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loss = trainer.callback_metrics.get(self.monitor)  # the same on every DDP rank
        if loss is None:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            reason = f"{self.monitor} is {loss}"
        elif self.factor and self.initial and loss > self.factor * self.initial:
            reason = (
                f"{self.monitor} is {loss:.3g}, over {self.factor:g}x the first batch's "
                f"{self.initial:.3g}"
            )
        else:
            return
        lr = pl_module.hparams.get("lr") if hasattr(pl_module, "hparams") else None
        advice = f"model.lr is {lr}: lower it" if lr is not None else "lower the learning rate"
        raise TrainingDiverged(
            f"training diverged: {reason} in epoch {trainer.current_epoch} ({advice}, or "
            "standardize the inputs; divergence.factor sets the limit)"
        )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Checked once an epoch, on the training loss only."""

    def state_dict(self) -> dict:
        return {"initial": self.initial}  # a resumed fit keeps its scale

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial = state_dict.get("initial")
