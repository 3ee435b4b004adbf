"""What a trained module serves: raw inputs in, its predictions out (MLflow models, ONNX)."""

from __future__ import annotations

import copy

import torch
from lightning.pytorch import LightningModule
from torch import nn


class Predictor(nn.Module):
    """`module.predict_step` on a tensor of raw inputs: the task's outputs (probabilities or
    values) where the module defines them, else its forward pass (Lightning's default);
    `predict_step=False`: the forward pass (a `predict_step` that unpacks (x, y) batches)."""

    def __init__(self, module: LightningModule, predict_step: bool = True) -> None:
        super().__init__()
        self.module, self.predict_step = module, predict_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.predict_step(x, 0) if self.predict_step else self.module(x)


def inference_module(module: LightningModule, predict_step: bool = True) -> Predictor:
    """A CPU copy in eval mode, apart from the trainer: what is logged, exported and served.
    The weights are copied; callables the modules hold (optimizer and scheduler factories) are
    shared, as under DDP some hold what cannot be copied (a process group's locks). A method
    of one of the modules (a forward a strategy left on the instance) is copied with it."""
    shared = {
        id(value): value
        for sub in module.modules()
        for value in vars(sub).values()
        if callable(value)
        and not isinstance(value, nn.Module)
        and not isinstance(getattr(value, "__self__", None), nn.Module)
    }
    return copy.deepcopy(Predictor(module, predict_step), shared).cpu().eval()


def working_inference_module(module: LightningModule, example: torch.Tensor) -> Predictor:
    """`inference_module`, by `predict_step` where it takes a tensor of inputs, else by the
    forward pass; the error of the forward pass where neither does."""
    try:
        inference = inference_module(module)
        with torch.no_grad():
            inference(example)
        return inference
    except Exception:  # noqa: BLE001 - a predict_step written for (x, y) batches
        inference = inference_module(module, predict_step=False)
        with torch.no_grad():
            inference(example)
        return inference
