"""When training batches may come in chunks (`data.chunk`), the seed configs' fast path.

Lightning's loop costs ~0.5 ms a step here, as much as the MNIST seed MLP's forward and
backward at batch 32. With `chunk: N` an mlplab datamodule hands the task N consecutive batches
per Lightning step and the task steps the optimiser once per batch (`Task.chunk_step`) through
Lightning's own calls, so the global step still counts optimiser steps and `max_steps`,
accumulation, clipping and step schedulers behave as in plain Lightning.

What chunks cannot keep exact is anything that acts between two batches of one Lightning step:
a callback or module hook that runs per batch, a trainer option counted in batches, a
profiler, a tuner. For such a run the datamodule hands out single batches instead (the plain
Lightning path) and says so in one line: the results stay exact, only the speed differs.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    LearningRateFinder,
    ProgressBar,
    StochasticWeightAveraging,
    Timer,
)
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.model_helpers import is_overridden

from mlplab.safety.checkpoints import Checkpoint, LatestCheckpoint
from my_project.models.tasks import Task

# hooks that run between the batches of one Lightning step
PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)


def _per_batch(obj, parent) -> bool:
    return any(is_overridden(hook, obj, parent) for hook in PER_BATCH_HOOKS)


def _callback_needs_batches(callback: Callback) -> bool:
    if isinstance(callback, BatchSizeFinder | LearningRateFinder):
        return True  # their trial fits record every batch
    if isinstance(callback, StochasticWeightAveraging):
        return True  # its batch-norm epoch skips the backward pass of Lightning's own loop
    if isinstance(callback, ProgressBar | Timer):
        return False  # a display, and a time limit checked per chunk (~30 ms apart)
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
    if module is not None and not isinstance(module, Task):
        found.append(f"{type(module).__name__}, which takes one batch per step")
    elif module is not None and _per_batch(module, LightningModule):
        found.append(f"{type(module).__name__}'s per-batch hooks")
    return found
