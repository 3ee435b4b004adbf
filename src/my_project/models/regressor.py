"""Regression: a linear output under the square, absolute or Huber loss."""

from __future__ import annotations

from typing import Literal

import torch
import torchmetrics
from torch import nn

from mlplab.errors import UserError
from my_project.models.task import NetFactory, Task


class R2Score(torchmetrics.R2Score):
    """R2 that is NaN, not an exception, when an epoch saw fewer than two samples
    (a `fast_dev_run` with batch size 1, a tiny shard under DDP)."""

    def compute(self) -> torch.Tensor:
        if self.total < 2:
            return torch.tensor(float("nan"), device=self.total.device)
        return super().compute()


class Regressor(Task):
    """Linear output, MSE / MAE / Huber loss; reports MAE, RMSE and R2."""

    def __init__(
        self,
        net: NetFactory,
        num_features: int,
        num_targets: int = 1,
        loss: Literal["mse", "mae", "huber"] = "mse",
        num_classes: int | None = None,  # linked from classification data, which it refuses
        **kwargs,
    ) -> None:
        if num_classes is not None:
            raise UserError(
                f"the data holds classes ({num_classes}), not numeric targets: use "
                "my_project.models.Classifier as the model (for a table, or set data.task: "
                "regression)"
            )
        super().__init__(net, num_features, num_targets, **kwargs)
        self.output = nn.Identity()
        functional = nn.functional
        self.loss_fn = {"mse": functional.mse_loss, "mae": functional.l1_loss,
                        "huber": functional.huber_loss}[loss]  # fmt: skip

    def make_metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {
                "mae": torchmetrics.MeanAbsoluteError(),
                "rmse": torchmetrics.MeanSquaredError(squared=False),
                "r2": R2Score(),
            }
        )

    def loss(self, logits, y, weight=None):  # logits and y (B, num_targets)
        if weight is None:
            return self.loss_fn(logits, y)
        return (self.loss_fn(logits, y, reduction="none").mean(dim=1) * weight).mean()

    def metric_inputs(self, logits, y):
        return (logits.squeeze(1), y.squeeze(1)) if logits.shape[1] == 1 else (logits, y)
