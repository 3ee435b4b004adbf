"""Seed 000's hand-set network for XOR: threshold logic units with given weights, not trained."""

from __future__ import annotations

import torch
from torch import nn


class ThresholdNet(nn.Module):
    """`Y = step(U step(W x))` with `step(z) = 1 if z >= threshold else 0`, as seed 000 writes it
    by hand: `hidden` is W (one row per hidden unit), `output` is U (one row per output). The
    weights are buffers, so they travel in checkpoints but nothing trains them."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: list[list[float]],
        output: list[list[float]],
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        w, u = torch.tensor(hidden, dtype=torch.float32), torch.tensor(output, dtype=torch.float32)
        if w.ndim != 2 or w.shape[1] != in_features:
            raise ValueError(f"hidden must be a {in_features}-column matrix, got {hidden}")
        if u.ndim != 2 or u.shape != (out_features, w.shape[0]):
            raise ValueError(f"output must be {out_features} x {w.shape[0]}, got {output}")
        self.register_buffer("w", w)
        self.register_buffer("u", u)
        self.threshold = threshold

    def step(self, z: torch.Tensor) -> torch.Tensor:
        return (z >= self.threshold).to(z.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(self.step(x.flatten(1) @ self.w.T) @ self.u.T)
