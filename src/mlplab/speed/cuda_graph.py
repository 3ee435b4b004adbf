"""`model.cuda_graph`: the fast path's per-batch forward and backward as one CUDA graph replay.

At batch 32 a small MLP on a GPU is bound by kernel launches: each of the ~30 kernels of a
forward and backward pass costs more in Python and the CUDA driver than on the GPU. Captured
once (`torch.cuda.graph`) and replayed for every full batch, they are one launch. Only the
forward pass, loss and backward pass are captured: the optimiser step, gradient clipping,
accumulation and schedulers stay eager in `Task.chunk_step`, through Lightning's own calls, so
steps are still optimiser steps and any optimiser works. The gradients are kept allocated
(`zero_grad(set_to_none=False)`), so the captured backward pass adds into the same tensors that
the eager optimiser reads.

A graph replays fixed memory: when anything it reads is replaced between epochs (a callback
freezing or unfreezing layers, replacing buffers or freeing the gradients), the task captures
again. What a graph cannot replay is refused in one line (`blockers`): a device other than
CUDA, several devices, a precision other than 32-bit (loss scaling and autocast caches act
between kernels), single batches (no chunks to replay over), and backward hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from mlplab.errors import UserError

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, ...]]

BACKWARD_HOOKS = ("on_before_backward", "backward", "on_after_backward")


def blockers(trainer: Trainer, module: LightningModule, chunk: int) -> list[str]:
    """Why this run's per-batch step cannot be a graph replay (empty: it can)."""
    from mlplab.speed.fast_path import (
        blockers as chunks_off,  # it imports the task, which imports this
    )

    found = []
    device = trainer.strategy.root_device
    if device.type != "cuda":
        found.append(f"it needs a CUDA device and this run trains on {device.type}")
    if type(trainer.strategy) is not SingleDeviceStrategy:
        found.append(f"it runs on one device, not under {type(trainer.strategy).__name__}")
    if type(trainer.precision_plugin) is not Precision:
        found.append(f"it captures 32-bit steps, not trainer.precision {trainer.precision}")
    if chunk <= 1:
        found.append("it replays over the fast path's chunks: set data.chunk above 1")
    elif off := chunks_off(trainer, module):
        turn = "turns" if len(off) == 1 else "turn"
        found.append(f"it replays over the fast path's chunks, which {', '.join(off)} {turn} off")
    if any(is_overridden(hook, module, LightningModule) for hook in BACKWARD_HOOKS):
        found.append(f"{type(module).__name__} overrides a backward hook")
    return found


def refuse(trainer: Trainer, module: LightningModule, chunk: int) -> None:
    """The one-line refusal, where `blockers` finds a reason."""
    found = blockers(trainer, module, chunk)
    if found:
        raise UserError(f"model.cuda_graph: {'; '.join(found)} (or set it false)")


def memory_in_use(module: nn.Module) -> tuple:
    """What a captured step reads and writes, by address: parameters, their gradients, buffers,
    and which parameters train and which modules are in training mode (`StepGraph`'s `key`)."""
    params = [(p.data_ptr(), p.requires_grad, p.grad is not None and p.grad.data_ptr())
              for p in module.parameters()]  # fmt: skip
    buffers = [b.data_ptr() for b in module.buffers()]
    return (*params, *buffers, *(m.training for m in module.modules()))


class StepGraph:
    """Calls `step(x, y, weight)` (forward, loss, backward; returns detached tensors) for every
    batch: eagerly for the first `warmup` full batches (on a side stream, as CUDA graphs ask)
    and for any batch of another shape (an epoch's last), then as a replay of the graph
    captured on the next full batch, its inputs copied into the graph's own tensors.

    The warm-up also allocates the gradients: the captured backward pass then adds into them
    (it would otherwise write a gradient of its own that each replay overwrites)."""

    def __init__(self, step: Step, key: Callable[[], tuple], warmup: int = 3) -> None:
        """`key()`: what the captured step depends on (`memory_in_use`, settings baked in);
        when it changes, the graph is stale."""
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (it makes the gradients), got {warmup}")
        self.step, self.key, self.warmup = step, key, warmup
        self.shape: torch.Size | None = None  # the full batch, set by the first batch
        self.calls = 0  # full batches seen
        self.side: torch.cuda.Stream | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured_on: tuple = ()  # `key()` when captured
        self.inputs: tuple[torch.Tensor | None, ...] = ()
        self.outputs: tuple[torch.Tensor, ...] = ()

    def __call__(self, x, y, weight=None) -> tuple[torch.Tensor, ...]:
        if self.shape is None:
            self.shape = x.shape
        if x.shape != self.shape:
            return self.step(x, y, weight)
        self.calls += 1
        if self.calls <= self.warmup:
            return self.on_side_stream(x, y, weight)
        if self.graph is None:
            self.inputs = tuple(t if t is None else t.clone() for t in (x, y, weight))
            self.captured_on = self.key()
            self.capture()
        else:
            for static, t in zip(self.inputs, (x, y, weight), strict=True):
                if static is not None:
                    static.copy_(t)
        self.replay()
        return tuple(t.clone() for t in self.outputs)  # the next replay overwrites them

    def stale(self) -> bool:
        """Whether what the graph reads has been replaced since it was captured."""
        return self.graph is not None and self.key() != self.captured_on

    def on_side_stream(self, x, y, weight) -> tuple[torch.Tensor, ...]:
        self.side = self.side or torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = self.step(x, y, weight)
        torch.cuda.current_stream().wait_stream(self.side)
        return out

    def capture(self) -> None:
        """Record the step's kernels on the graph's inputs (capturing runs none of them)."""
        self.graph = torch.cuda.CUDAGraph()
        failure = None
        try:
            with torch.cuda.graph(self.graph):
                try:
                    self.outputs = self.step(*self.inputs)
                except RuntimeError as err:  # the cause; ending the capture then fails too
                    failure = err
        except RuntimeError as err:
            failure = failure or err
        if failure is not None:  # an operation that waits for the GPU, a shape from data
            reason = str(failure).strip().splitlines()[0]
            raise UserError(
                f"model.cuda_graph: the training step cannot be captured ({reason}); set it false"
            ) from failure

    def replay(self) -> None:
        self.graph.replay()
