"""`--fast_path.cuda_graph`: each full batch's forward and backward pass as one CUDA graph replay.

At batch 32 a small MLP on a GPU is bound by kernel launches: each of the ~30 kernels of a
forward and backward pass costs more in Python and the CUDA driver than on the GPU. The
module's forward pass, and its backward pass, are captured once with PyTorch's
`torch.cuda.make_graphed_callables` and replayed for every full training batch; the loss, the
metrics, the optimiser step, clipping, accumulation and schedulers stay eager (the fast path's
`training_step`), so steps are still optimiser steps and any optimiser works. The first
`warmup` full batches of a fit are ordinary eager steps on a side stream (as CUDA graphs ask),
and the capture itself runs nothing, so the trained weights are those of eager steps. A batch
of another shape (an epoch's last), evaluation, and a module in eval mode run eagerly.

A graph replays fixed memory: when a parameter is replaced, frozen or unfrozen between epochs
(a fine-tuning callback), the forward pass is captured again. What a graph cannot replay is
refused in one line (`blockers`): a device other than CUDA, several devices, a precision other
than 32-bit (loss scaling and autocast caches act between kernels), single batches, backward
hooks.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from mlplab.errors import UserError

BACKWARD_HOOKS = ("on_before_backward", "backward", "on_after_backward")


def blockers(
    trainer: Trainer, module: LightningModule, chunk: int, chunks_off: list[str]
) -> list[str]:
    """Why this run's batches cannot be graph replays (empty: they can). `chunks_off`: what
    turns the fast path off for this run (`mlplab.speed.fast_path.blockers`)."""
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
    elif chunks_off:
        turn = "turns" if len(chunks_off) == 1 else "turn"
        found.append(
            f"it replays over the fast path's chunks, which {', '.join(chunks_off)} {turn} off"
        )
    if any(is_overridden(hook, module, LightningModule) for hook in BACKWARD_HOOKS):
        found.append(f"{type(module).__name__} overrides a backward hook")
    return found


def refuse(trainer: Trainer, module: LightningModule, chunk: int, chunks_off: list[str]) -> None:
    """The one-line refusal, where `blockers` finds a reason."""
    found = blockers(trainer, module, chunk, chunks_off)
    if found:
        raise UserError(f"fast_path.cuda_graph: {'; '.join(found)} (or set it false)")


def memory_in_use(module: nn.Module) -> tuple:
    """What a captured pass reads, by address: the parameters (and whether they train), the
    buffers, and which modules are in training mode."""
    params = [(p.data_ptr(), p.requires_grad) for p in module.parameters()]
    buffers = [b.data_ptr() for b in module.buffers()]
    return (*params, *buffers, *(m.training for m in module.modules()))


class GraphedForward:
    """Stands in for `module.forward` (an attribute of the instance, until `remove`): eager
    for the first `warmup` full training batches (on a side stream), then a replay of the
    graphs `torch.cuda.make_graphed_callables` captures on the next one."""

    def __init__(self, module: nn.Module, warmup: int = 3) -> None:
        self.module, self.warmup = module, warmup
        self.eager = type(module).forward.__get__(module)
        self.shape: torch.Size | None = None  # the full batch, set by the first batch
        self.calls = 0  # full training batches seen
        self.graphed = None
        self.captured_on: tuple = ()
        self.side: torch.cuda.Stream | None = None
        module.forward = self

    def __call__(self, x, *args, **kwargs):
        training = self.module.training and torch.is_grad_enabled()
        if args or kwargs or not training or not isinstance(x, torch.Tensor):
            return self.eager(x, *args, **kwargs)
        self.shape = self.shape or x.shape
        if x.shape != self.shape:
            return self.eager(x)
        self.calls += 1
        if self.calls <= self.warmup:
            return self.on_side_stream(x)
        if self.graphed is None:
            self.capture(x)
        out = self.graphed(x)  # the graph's own output tensor, which the next replay overwrites
        return out.clone() if isinstance(out, torch.Tensor) else out

    def check(self) -> None:
        """At an epoch's start: capture again if what the graph reads has been replaced."""
        if self.graphed is not None and memory_in_use(self.module) != self.captured_on:
            self.graphed = None

    def on_side_stream(self, x):
        self.side = self.side or torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = self.eager(x)
        torch.cuda.current_stream().wait_stream(self.side)
        return out

    def capture(self, x: torch.Tensor) -> None:
        """Record the forward and backward kernels on a copy of `x` (capturing runs none of
        them: no warm-up iterations, the eager batches before were the warm-up)."""
        del self.module.forward  # the class's own, which the capture calls
        try:
            torch.cuda.make_graphed_callables(self.module, (x.clone(),), num_warmup_iters=0)
        except RuntimeError as err:  # an operation that waits for the GPU, a shape from data
            reason = str(err).strip().splitlines()[0]
            raise UserError(
                f"fast_path.cuda_graph: the forward pass cannot be captured ({reason}); set it "
                "false"
            ) from err
        finally:
            graphed = self.module.__dict__.pop("forward", None)
            self.module.forward = self
        self.graphed, self.captured_on = graphed, memory_in_use(self.module)

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)
