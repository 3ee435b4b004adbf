"""A small convolutional network for square images given as flat rows (MNIST, Fashion-MNIST)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


class ConvNet(nn.Sequential):
    """Conv-ReLU-MaxPool blocks, then a dense layer with dropout and the output layer.

    Takes what the MLP takes: rows of `in_features` pixels (`in_channels` square images), so
    the datamodules, the logged model's signature and `mlplab predict` stay the same; the rows
    are unflattened inside the network.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        channels: Sequence[int] = (32, 64),
        in_channels: int = 1,
        kernel_size: int = 3,
        hidden: int = 128,
        dropout: float = 0.25,
    ) -> None:
        side = math.isqrt(in_features // in_channels)
        if side * side * in_channels != in_features:
            raise ValueError(
                f"{in_features} features are not {in_channels} square image(s); "
                "set in_channels to the number of channels"
            )
        layers: list[nn.Module] = [nn.Unflatten(1, (in_channels, side, side))]
        width = in_channels
        for size in channels:
            layers += [
                nn.Conv2d(width, size, kernel_size, padding=kernel_size // 2),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            width, side = size, side // 2
        layers += [
            nn.Flatten(),
            nn.Linear(width * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_features),
        ]
        super().__init__(*layers)
