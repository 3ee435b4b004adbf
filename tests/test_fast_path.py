"""The fast path (chunks of batches per Lightning step) trains exactly like plain Lightning."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch import nn

from mlplab.speed.fast_path import FastPath
from my_project.data import DigitsDataModule
from my_project.models import MLP, Classifier


def one_cycle(optimizer):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=80)


def halve(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def train(chunk: int, epochs: int = 2, callbacks=(), task_options=None, cuda_graph=False,
          **trainer_options):  # fmt: skip
    """A fit of digits with batches of 16, `chunk` at a time through `FastPath`."""
    seed_everything(3)
    dm = DigitsDataModule(n_train=300, batch_size=16, chunk=chunk)
    options = {"optimizer": torch.optim.SGD, "lr": 0.01, **(task_options or {})}
    task = Classifier(partial(MLP, hidden_sizes=[32]), num_features=64, num_classes=10, **options)
    trainer = Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*callbacks, FastPath(cuda_graph)],
        **trainer_options,
    )  # fmt: skip
    trainer.fit(task, dm)
    return task, {k: float(v) for k, v in trainer.callback_metrics.items()}


def chunks_taken(task) -> int:
    return next(cb.chunk for cb in task.trainer.callbacks if isinstance(cb, FastPath))


def assert_same_training(a: Classifier, b: Classifier) -> None:
    assert a.trainer.global_step == b.trainer.global_step
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    lr = [t.optimizers().param_groups[0]["lr"] for t in (a, b)]
    assert lr[0] == pytest.approx(lr[1], rel=1e-12)


FEATURES = {
    "plain": ({}, {}),
    "max_steps": ({"max_steps": 10}, {}),
    "accumulate_grad_batches": ({"accumulate_grad_batches": 3}, {}),
    "gradient_clip_norm": ({"gradient_clip_val": 0.05}, {}),
    "gradient_clip_value": ({"gradient_clip_val": 0.001, "gradient_clip_algorithm": "value"}, {}),
    "step_scheduler": ({}, {"lr_scheduler": one_cycle, "lr_scheduler_interval": "step"}),
    "epoch_scheduler_every_2": (
        {"epochs": 4}, {"lr_scheduler": halve, "lr_scheduler_frequency": 2}
    ),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_chunks_train_exactly_as_lightnings_automatic_optimisation(feature):
    """Weights, global step and learning rate after training with chunks of 8 batches equal
    those of plain Lightning (one batch per step, automatic optimisation)."""
    trainer_options, task_options = FEATURES[feature]
    plain, plain_metrics = train(1, task_options=task_options, **trainer_options)
    chunked, chunked_metrics = train(8, task_options=task_options, **trainer_options)
    assert chunks_taken(plain) == 1 and chunks_taken(chunked) == 8
    assert "training_step" not in vars(chunked)  # the module's own again after the fit
    assert_same_training(plain, chunked)
    assert plain_metrics.keys() == chunked_metrics.keys()
    for key in plain_metrics:
        assert chunked_metrics[key] == pytest.approx(plain_metrics[key], abs=1e-5), key


def test_max_steps_counts_optimiser_steps_even_inside_a_chunk():
    task, _ = train(32, max_steps=10)
    assert task.trainer.global_step == 10


def test_accumulation_steps_once_per_three_batches_and_at_the_end_of_each_epoch():
    task, _ = train(8, epochs=2, accumulate_grad_batches=3)
    assert task.trainer.global_step == 2 * 7  # 19 batches an epoch: 6 full groups and 1 left


def test_chunked_training_matches_a_plain_pytorch_loop():
    """Same permutation, same batches of 16, same SGD updates as a hand-written loop."""
    trained, _ = train(chunk=8, epochs=1)
    seed_everything(3)
    dm = DigitsDataModule(n_train=300, batch_size=16)
    dm.setup()
    x, y = dm.data["train"]
    reference = MLP(64, 10, hidden_sizes=[32])
    # a DataLoader iterator draws a base seed from the global generator, then its RandomSampler
    # draws the seed of its permutation
    torch.empty((), dtype=torch.int64).random_()
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01)
    for index in order.split(16):
        loss = nn.functional.cross_entropy(reference(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for a, b in zip(trained.net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


class BatchCounter(Callback):
    """Acts after every training batch, as a gradient monitor or EMA would."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.calls += 1


@pytest.mark.parametrize(
    "blocker, options",
    [
        (BatchCounter(), {}),
        (None, {"val_check_interval": 5}),
        (None, {"limit_train_batches": 3}),
        (None, {"profiler": "simple"}),
        (StochasticWeightAveraging(swa_lrs=0.01), {}),
    ],
    ids=["per-batch callback", "int val_check_interval",
         "limit_train_batches", "profiler", "swa"],  # fmt: skip
)
def test_what_needs_single_batches_turns_chunks_off_and_says_so(blocker, options, caplog):
    callbacks = [blocker] if blocker is not None else []
    task, _ = train(8, epochs=1, callbacks=callbacks, **options)
    assert chunks_taken(task) == 1  # plain Lightning for this run
    assert "data.chunk 8 is off for this run" in caplog.text
    if isinstance(blocker, BatchCounter):
        assert blocker.calls == task.trainer.global_step == 19


class EpochStartProbe(Callback):
    """What the task's epoch metrics hold when an epoch starts: nothing, if reset."""

    def __init__(self) -> None:
        self.samples_at_start: list[float] = []

    def on_train_epoch_start(self, trainer, task) -> None:
        self.samples_at_start.append(float(task.train_loss.weight))


@pytest.mark.parametrize("chunk", [1, 4])
def test_epoch_metrics_cover_one_epoch_and_are_the_models_own(chunk):
    # metric objects are updated per step and logged once per epoch, in the epoch-end hooks
    probe = EpochStartProbe()
    task, metrics = train(chunk=chunk, epochs=3, callbacks=[probe])
    assert probe.samples_at_start == [0.0, 0.0, 0.0]  # Lightning reset them after each epoch
    dm = task.trainer.datamodule
    x, y = dm.data["val"]
    with torch.no_grad():
        logits = task(x)
    assert metrics["val/samples"] == len(y)  # the last validation alone
    assert abs(metrics["val/acc"] - (logits.argmax(1) == y).float().mean().item()) < 1e-6
    assert abs(metrics["val/loss"] - nn.functional.cross_entropy(logits, y).item()) < 1e-5
    assert {"train/loss", "train/acc"} <= metrics.keys()


class OwnStep(Classifier):
    """The most common override: a training step of its own, written for one (x, y) batch."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(len(x))
        return self.loss(self(x), y)


def test_an_overridden_training_step_gets_one_batch_per_call():
    """With chunks on, the module's own `training_step` still gets one batch a call, and the
    optimiser steps once per batch."""
    seed_everything(3)
    task = OwnStep(partial(MLP, hidden_sizes=[8]), num_features=64, num_classes=10)
    task.seen = []
    fast = FastPath()
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[fast])  # fmt: skip
    trainer.fit(task, DigitsDataModule(n_train=300, batch_size=16, chunk=8))
    assert fast.chunk == 8
    assert task.seen == [16] * 18 + [12]  # 300 samples: every batch alone, in order
    assert trainer.global_step == 19


def test_a_seed_config_takes_its_chunks_through_the_cli(tmp_path, monkeypatch):
    """The callbacks the CLI adds (divergence, checkpoints, run status) keep chunks on."""
    from conftest import config
    from mlplab.cli import MLPLabCLI

    monkeypatch.chdir(tmp_path)
    cli = MLPLabCLI(args=["fit", "--config", config("xor"), "--trainer.max_epochs", "2",
                          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    (fast,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, FastPath)]
    assert fast.chunk == 32
    assert cli.trainer.global_step == 2 * 4  # XOR's four points, batches of one
