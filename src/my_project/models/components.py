"""Parts the tasks are built from: input standardisation, the epoch loss, gathered updates."""

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

    def update(self, value: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        """A value and its weight, or (gathered) a vector of each."""
        self.total += (value.float() * weight).sum()
        self.weight += weight.sum() if isinstance(weight, torch.Tensor) else weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


class Gathered:
    """Metric inputs of many batches gathered on the device and handed to `metrics.update` in
    one call per `size` samples, and at `flush`: torchmetrics' cost per call (~0.1 ms on a CPU)
    is as much as a small network's training step. The same results, sooner."""

    def __init__(self, metrics: torchmetrics.MetricCollection, size: int = 16384) -> None:
        self.metrics, self.size = metrics, size
        self.parts: list[tuple[torch.Tensor, ...]] = []
        self.count = 0

    def update(self, *inputs: torch.Tensor) -> None:
        self.parts.append(inputs)
        self.count += len(inputs[-1])
        if self.count >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.metrics.update(*(torch.cat(part) for part in zip(*self.parts, strict=True)))
        self.parts, self.count = [], 0

