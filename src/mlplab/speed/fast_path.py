"""`data.chunk`: several batches per Lightning step, the same optimiser steps (the fast path).

Lightning's loop costs ~0.5 ms a step here, as much as the MNIST seed MLP's forward and
backward at batch 32. With `chunk: N` an mlplab datamodule hands out N consecutive batches per
Lightning step, and `FastPath` runs the module's own `training_step` once per batch, then the
backward pass, gradient clipping, the optimiser and the schedulers through Lightning's own
calls, as automatic optimisation would: the global step counts optimiser steps, and
`max_steps`, `accumulate_grad_batches`, clipping and the schedulers' interval, frequency and
monitor behave as in plain Lightning. The module never sees a chunk.

`FastPath` decides once per run (`setup`) and the datamodule reads that decision
(`chunk_size`). What chunks cannot keep exact is anything that acts between two batches of one
Lightning step: a callback or module hook run per batch, a trainer option counted in batches, a
profiler, a tuner, a module that optimises by hand. For such a run the datamodule hands out
single batches (plain Lightning) and one line says why: results stay exact, only speed differs.
A `self.log` with `on_step=True` inside `training_step` is logged once per chunk.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    LearningRateFinder,
    ProgressBar,
    StochasticWeightAveraging,
    Timer,
)
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from mlplab.errors import UserError
from mlplab.safety.checkpoints import Checkpoint, LatestCheckpoint
from mlplab.safety.divergence import Divergence
from mlplab.speed import cuda_graph

# hooks that run between the batches of one Lightning step
PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)
BACKWARD_HOOKS = ("on_before_backward", "backward", "on_after_backward")
# modules a fit stepped by chunks: they stay in manual optimisation after it (Lightning reads the
# global step by that flag) until their next fit through `FastPath` decides again
_STEPPED: weakref.WeakSet = weakref.WeakSet()


def _per_batch(obj, parent) -> bool:
    return any(is_overridden(hook, obj, parent) for hook in PER_BATCH_HOOKS)


def _callback_needs_batches(callback: Callback) -> bool:
    if isinstance(callback, FastPath):
        return False
    if isinstance(callback, BatchSizeFinder | LearningRateFinder):
        return True  # their trial fits record every batch
    if isinstance(callback, StochasticWeightAveraging):
        return True  # its batch-norm epoch skips the backward pass of Lightning's own loop
    if isinstance(callback, ProgressBar | Timer):
        return False  # a display, and a time limit checked per chunk (~30 ms apart)
    if isinstance(callback, Divergence):
        return False  # it reads the first batch's loss, which a chunk's step returns
    if isinstance(callback, Checkpoint | LatestCheckpoint):
        return callback.within_epoch
    return _per_batch(callback, Callback)


def blockers(trainer: Trainer, module: LightningModule | None) -> list[str]:
    """What in this run needs single batches (empty: chunks are exact)."""
    found = []
    if trainer.val_check_interval != 1.0 or isinstance(trainer.val_check_interval, int):
        found.append(f"trainer.val_check_interval {trainer.val_check_interval}")
    for stage in ("train", "val", "test", "predict"):
        limit = getattr(trainer, f"limit_{stage}_batches")
        if limit != 1.0 or isinstance(limit, int):
            found.append(f"trainer.limit_{stage}_batches {limit}")
    if not isinstance(trainer.profiler, PassThroughProfiler):
        found.append(type(trainer.profiler).__name__)
    if trainer.precision == "16-mixed" and trainer.gradient_clip_val:
        found.append("gradient clipping under 16-mixed (clipped after unscaling)")
    found += [type(cb).__name__ for cb in trainer.callbacks if _callback_needs_batches(cb)]
    if module is not None and not module.automatic_optimization and module not in _STEPPED:
        found.append(f"{type(module).__name__}, which optimises by hand")
    elif module is not None and _per_batch(module, LightningModule):
        found.append(f"{type(module).__name__}'s per-batch hooks")
    return found


def chunk_size(trainer: Trainer | None) -> int:
    """How many batches a Lightning step takes in this run: `FastPath`'s decision (1 without
    one, or where it turned chunks off)."""
    for callback in trainer.callbacks if trainer is not None else ():
        if isinstance(callback, FastPath):
            return callback.chunk
    return 1


class FastPath(Callback):
    """Runs a chunked datamodule's chunks batch by batch (the CLI adds it to every run).

    `cuda_graph` replays each full batch's forward and backward pass as one CUDA graph
    (`mlplab.speed.cuda_graph`): for small networks on a GPU, bound by kernel launches."""

    def __init__(self, cuda_graph: bool = False) -> None:
        self.cuda_graph = cuda_graph
        self.chunk = 1  # decided in `setup`
        self.module: LightningModule | None = None
        self.graph: cuda_graph.GraphedForward | None = None
        self.batches_seen = 0  # of this epoch, for gradient accumulation
        self.backward = torch.Tensor.backward
        self.epoch_step_due = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and pl_module in _STEPPED:
            _STEPPED.discard(pl_module)
            pl_module.automatic_optimization = True
        wanted = getattr(trainer.datamodule, "chunk", 1) if trainer.datamodule else 1
        found = blockers(trainer, pl_module) if wanted > 1 else []
        if found and stage == "fit":  # evaluation alone only loses its large batches
            rank_zero_info(
                f"mlplab: data.chunk {wanted} is off for this run ({', '.join(found)} needs "
                "single batches): one batch per Lightning step"
            )
        self.chunk = 1 if found else wanted
        if stage == "fit":
            self.refuse_graph(trainer, pl_module, trainer.datamodule)

    def refuse_graph(self, trainer: Trainer, module: LightningModule, datamodule) -> None:
        """With `cuda_graph`, what a graph cannot replay in this run, in one line (the CLI
        asks before the run exists)."""
        if self.cuda_graph:
            chunk = getattr(datamodule, "chunk", 1)
            cuda_graph.refuse(trainer, module, chunk, blockers(trainer, module))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Take over the stepping once Lightning has read the optimizers and schedulers as
        automatic optimisation's (their interval, frequency and monitor)."""
        if self.chunk <= 1:
            return
        self.module = pl_module
        pl_module.automatic_optimization = False
        _STEPPED.add(pl_module)
        # a public attribute of the instance, removed at the end of the fit: Lightning calls
        # `module.training_step`, the module's own runs once per batch
        pl_module.training_step = self.training_step
        # `manual_backward` runs the strategy's and precision plugin's backward work and the
        # backward hooks; with none (one device, 32-bit) a plain `backward()` is the same
        plain = (
            type(trainer.strategy) is SingleDeviceStrategy
            and type(trainer.precision_plugin) is Precision
            and not any(is_overridden(h, pl_module, LightningModule) for h in BACKWARD_HOOKS)
        )
        self.backward = torch.Tensor.backward if plain else pl_module.manual_backward
        if self.cuda_graph:  # a fresh capture for every fit
            self.graph = cuda_graph.GraphedForward(pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.module is not None:
            del pl_module.training_step  # the class's own again
            self.module = None
        if self.graph is not None:
            self.graph.remove()
            self.graph = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.batches_seen = 0
        self.step_epoch_schedulers(trainer)
        if self.graph is not None:
            self.graph.check()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning steps epoch schedulers after the epoch's hooks and checkpoints: here, the
        # next epoch's start or the fit's end
        self.epoch_step_due = self.module is not None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.step_epoch_schedulers(trainer)

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor | None:
        """A chunk, one batch at a time: the module's `training_step`, the backward pass, and
        an optimiser step each `accumulate_grad_batches` batches (and at the epoch's end).
        Returns the first batch's loss (what `on_train_batch_end` gets)."""
        module, trainer = self.module, self.module.trainer
        optimizer = module.optimizers()
        accumulate = trainer.accumulate_grad_batches
        clip = trainer.gradient_clip_val or is_overridden(
            "configure_gradient_clipping", module, LightningModule
        )
        steps_left = trainer.max_steps - trainer.global_step if trainer.max_steps >= 0 else -1
        last = len(batch) - 1 if batch_idx + 1 >= trainer.num_training_batches else -1
        step = type(module).training_step
        first = None
        for i, one in enumerate(batch):
            if steps_left == 0:
                break  # max_steps lands inside this chunk: stop exactly there
            out = step(module, one, batch_idx * self.chunk + i)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            self.batches_seen += 1
            if loss is None:
                continue  # as in Lightning, a step that returns None is skipped
            self.backward(loss / accumulate if accumulate > 1 else loss)
            first = loss.detach() if first is None else first
            if self.batches_seen % accumulate and i != last:
                continue  # as in Lightning, the epoch's last batch steps whatever is left
            if clip:
                module.configure_gradient_clipping(
                    optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm
                )
            optimizer.step()
            optimizer.zero_grad()
            steps_left -= 1
            self.step_schedulers(trainer, "step", trainer.global_step)
        return first

    def step_epoch_schedulers(self, trainer: Trainer) -> None:
        if self.epoch_step_due:
            self.epoch_step_due = False
            self.step_schedulers(trainer, "epoch", trainer.current_epoch)

    def step_schedulers(self, trainer: Trainer, interval: str, count: int) -> None:
        """Step the schedulers of this interval as Lightning would, by their frequency and, for
        ReduceLROnPlateau, their monitor."""
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval or count % config.frequency:
                continue
            if not config.reduce_on_plateau:
                config.scheduler.step()
                continue
            if config.monitor not in trainer.callback_metrics:
                raise UserError(  # a configuration mistake Lightning also refuses
                    f"ReduceLROnPlateau monitors {config.monitor!r}, which is not logged; "
                    f"monitor one of {sorted(trainer.callback_metrics)}"
                )
            config.scheduler.step(trainer.callback_metrics[config.monitor])
