"""A stacked trial's checkpoints, as its own fit writes them (`mlplab.speed.stacked`).

`last.ckpt` holds what Lightning needs to resume the trial alone, with `mlplab fit --config
... --ckpt_path .../last.ckpt`: its last weights, its optimiser's state in torch.optim's own
format, the loops' progress of a fit that has run its epochs (the fast path's counters where
the data comes in chunks), the checkpoint and divergence callbacks' state and the keys mlplab
adds (`mlplab.safety.metadata`: the run it continues among them). `best-epoch=N.ckpt` is the
same at the best validation (the optimiser's state there is kept with the best weights).

The keys are Lightning's (`Trainer.save_checkpoint`'s): nothing here invents a format.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import lightning
import torch

from mlplab.safety import metadata
from mlplab.safety.checkpoints import Checkpoint
from mlplab.safety.divergence import Divergence


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU, in the row-major layout a network's own tensors have (a stack's may
    be transposed: `Stack.lay_out`); a checkpoint loads onto any device."""
    return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)


def counts(current: int, total: int, keys: tuple[str, ...]) -> dict:
    return {"current": dict.fromkeys(keys, current), "total": dict.fromkeys(keys, total)}


BATCH = ("ready", "started", "processed", "completed")
STEP = ("ready", "completed")
ZERO_GRAD = ("ready", "started", "completed")


def loops(epochs: int, batches: int, steps: int, val_batches: int, chunked: bool,
          validated: bool = True, in_validation: bool = False) -> dict:  # fmt: skip
    """The loops' state of a fit saved at the end of its `epochs`-th epoch with `batches`
    Lightning batches and `steps` optimiser steps an epoch; `chunked`: the fast path stepped
    (`mlplab.speed.fast_path`, manual optimisation's counter); `validated`: that epoch ran its
    validation (where it did not, Lightning has reset the validation loop's total);
    `in_validation`: saved as that validation ended, before the epoch's last counts."""
    ended = epochs - 1 if in_validation else epochs  # the epoch and its last batch, processed
    automatic = (steps, epochs * steps) if not chunked else (0, 0)
    manual = (epochs * steps, epochs * steps) if chunked else (0, 0)
    epoch = {"current": {"ready": epochs, "started": epochs, "processed": ended,
                         "completed": epochs - 1}}  # fmt: skip
    epoch["total"] = dict(epoch["current"])
    idle = {"batch_progress": {**counts(0, 0, BATCH), "is_last_batch": False}, "state_dict": {}}
    return {
        "fit_loop": {
            "state_dict": {},
            "epoch_loop.state_dict": {"_batches_that_stepped": epochs * batches - (epochs - ended)},
            "epoch_loop.batch_progress": {**counts(batches, epochs * batches, BATCH),
                                          "is_last_batch": True},  # fmt: skip
            "epoch_loop.scheduler_progress": counts(0, 0, STEP),
            "epoch_loop.automatic_optimization.state_dict": {},
            "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {
                "step": counts(*automatic, STEP), "zero_grad": counts(*automatic, ZERO_GRAD)
            }},  # fmt: skip
            "epoch_loop.manual_optimization.state_dict": {},
            "epoch_loop.manual_optimization.optim_step_progress": counts(*manual, STEP),
            "epoch_loop.val_loop.state_dict": {},
            "epoch_loop.val_loop.batch_progress": {
                **counts(val_batches, val_batches if validated else 0, BATCH),
                "is_last_batch": val_batches > 0,
            },
            "epoch_progress": epoch,
        },
        "validate_loop": copy.deepcopy(idle),
        "test_loop": copy.deepcopy(idle),
        "predict_loop": {"batch_progress": counts(0, 0, BATCH), "state_dict": {}},
    }


def batch_counts(datamodule) -> tuple[int, int, int, bool]:
    """(Lightning batches an epoch, optimiser steps an epoch, validation batches, chunked) of
    a fit on this in-memory datamodule (`mlplab.data.base`'s loaders)."""
    chunk = max(getattr(datamodule, "chunk", 1), 1)

    def batches(split: str, size: int) -> int:
        n = len(datamodule.data[split][0]) if split in datamodule.data else 0
        whole = datamodule.batch_size <= 0 or datamodule.batch_size >= n
        return 1 if whole and n else math.ceil(n / size) if n else 0

    steps = batches("train", datamodule.batch_size)
    per = datamodule.batch_size * chunk  # the fast path is on wherever chunks are asked for
    return batches("train", per), steps, batches("val", per), chunk > 1


def optimizer_state(module, state: dict, steps: int) -> dict:
    """The trial's optimiser as its own fit saves it: the module's `configure_optimizers`'s
    class and settings, its state per parameter taken from the stack's (`state`: name ->
    tensors), `step` where torch.optim counts one. What torch keeps and in which form (a
    momentum buffer of None at momentum 0, a float step) is read from one step of that
    optimiser over copies of the parameters."""
    real = module.configure_optimizers()
    group = {key: value for key, value in real.param_groups[0].items() if key != "params"}
    copies = [torch.zeros_like(p, requires_grad=True) for p in module.parameters()]
    template = type(real)(copies, **group)
    for copied in copies:
        copied.grad = torch.zeros_like(copied)
    template.step()
    names = [name for name, _ in module.named_parameters()]
    saved = template.state_dict()
    for index, name in zip(saved["param_groups"][0]["params"], names, strict=True):
        own = saved["state"].get(index, {})
        saved["state"][index] = {
            key: (torch.tensor(float(steps), dtype=value.dtype) if key == "step"
                  else plain(state[name][key]) if value is not None and key in state.get(name, {})
                  else value)  # fmt: skip
            for key, value in own.items()
        }
    return saved


def write(trial, record, run_id: str, directory: Path, config_text: str) -> list[Path]:
    """Write the trial's best checkpoint and (`checkpoint.save_last`, the default) its
    `last.ckpt` into `directory` (the run's `checkpoints/`), as its fit's `Checkpoint` and
    `LatestCheckpoint` would; their paths."""
    module, datamodule, config = trial.module, trial.datamodule, trial.config
    if not record.weights or not all(w.isfinite().all() for w in record.last.values()
                                     if w.is_floating_point()):  # fmt: skip
        return []  # nothing to resume: no weights it chose, or weights no longer finite
    directory.mkdir(parents=True, exist_ok=True)
    batches, steps, val_batches, chunked = batch_counts(datamodule)
    callback = Checkpoint(**config.checkpoint.as_dict())
    callback.dirpath = str(directory)  # as the fit's logger gives it (relative stays relative)
    callback.set_monitor(record.monitor)  # None: no validation, the latest is the best

    def at(step: int) -> dict:  # the metrics a fit has logged at this step (no test yet)
        return {key: value for key, value, at in record.metrics
                if at == step and not key.startswith("test/")}  # fmt: skip

    best_path = callback.format_checkpoint_name(
        {**at(record.best_step), "epoch": record.best_epoch, "step": record.best_step}
    )
    callback.best_model_path = best_path
    if record.monitor is not None and record.best_value is not None:
        # as Lightning keeps them: the score of the last save (top-1: the best) is current
        score = torch.tensor(record.best_value)
        callback.kth_best_model_path = best_path
        callback.best_model_score = callback.kth_value = callback.current_score = score
        callback.best_k_models = {best_path: score}
    divergence = Divergence(**config.divergence.as_dict())
    divergence.initial = record.initial

    every = config.trainer.get("check_val_every_n_epoch") or 1
    # where the best is saved: at the training epoch's end where every epoch validates, else
    # as the validation ends (`ModelCheckpoint._should_save_on_train_epoch_end`'s rule)
    on_epoch_end = config.checkpoint.get("save_on_train_epoch_end")
    in_validation = not (every == 1 if on_epoch_end is None else on_epoch_end)

    def checkpoint(weights: dict, state: dict, epochs: int, best: bool) -> dict:
        own = module.state_dict()
        own.update({name: plain(weight) for name, weight in weights.items()})
        saved = {
            "epoch": epochs - 1,
            "global_step": epochs * steps,
            "pytorch-lightning_version": lightning.__version__,
            "state_dict": own,
            "loops": loops(epochs, batches, steps, val_batches, chunked, epochs % every == 0,
                           best and in_validation),
            "callbacks": {callback.state_key: callback.state_dict(),
                          divergence.state_key: divergence.state_dict()},
            "optimizer_states": [optimizer_state(module, state, epochs * steps)],
            "lr_schedulers": [],
        }  # fmt: skip
        for owner in (module, datamodule):
            if owner.hparams:
                # Lightning keeps the name `save_hyperparameters` stored the arguments under
                # only here, and writes it from here (`_CheckpointConnector.dump_checkpoint`);
                # no public accessor (the key's meaning: Lightning-AI/pytorch-lightning#9631)
                if hasattr(owner, "_hparams_name"):
                    saved[owner.CHECKPOINT_HYPER_PARAMS_NAME] = owner._hparams_name
                saved[owner.CHECKPOINT_HYPER_PARAMS_KEY] = dict(owner.hparams)
        metadata.write_fit(saved, module, datamodule, run_id)
        metadata.write_config(saved, config_text)
        return saved

    best = checkpoint(record.weights, record.best_state, record.best_epoch + 1, True)
    last = checkpoint(record.last, record.state, record.epochs, False)
    last_step = record.epochs * steps
    metadata.write_unwritten(last, {"metrics": at(last_step), "step": last_step})
    written = {Path(best_path): best}
    if config.checkpoint.save_last:
        written[directory / "last.ckpt"] = last
    for path, saved in written.items():
        torch.save(saved, f"{path}.part")
        os.replace(f"{path}.part", path)  # whole or absent
    return list(written)
