"""Parts the tasks are built from: input standardisation and the epoch loss."""

from __future__ import annotations

import torch
import torchmetrics
from torch import nn


class Standardize(nn.Module):
    """(x - mean) / std with the training split's statistics (set in `Task.setup`): in the
    model, so every checkpoint and logged model takes raw features. Images stay images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.flatten(1) - self.mean) / self.std).view_as(x)


class EpochMean(torchmetrics.Metric):
    """Sample-weighted mean of an epoch, its sums added over DDP ranks: exact for uneven shards,
    and NaN stays NaN (a diverged loss must show)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float = 1.0) -> None:
        self.total += value.float() * weight
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight
