"""The fast path (chunks of batches, one index op per chunk) trains like the textbook one."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from mlplab.data import DigitsDataModule
from mlplab.models import Classifier


class GradNormProbe(Callback):
    """Listens to the backward pass, as a gradient monitor would: needs Lightning's wrappers."""

    def __init__(self) -> None:
        self.calls = 0

    def on_after_backward(self, trainer, pl_module) -> None:
        self.calls += 1


def train(chunk: int, epochs: int = 2, callbacks=()) -> tuple[Classifier, dict]:
    seed_everything(3)
    dm = DigitsDataModule(n_train=300, batch_size=16, chunk=chunk)
    task = Classifier(
        num_features=64, num_classes=10, hidden_sizes=[32], optimizer=torch.optim.SGD, lr=0.01
    )
    trainer = Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(task, dm)
    return task, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_direct_steps_match_lightnings_wrapped_steps_and_yield_to_listeners():
    """One process in 32-bit steps the optimiser directly; a callback listening to the backward
    pass switches back to `manual_backward`, still called once per batch, with the same result."""
    direct, direct_metrics = train(chunk=8)
    probe = GradNormProbe()
    wrapped, wrapped_metrics = train(chunk=8, callbacks=[probe])
    assert direct.direct_steps and not wrapped.direct_steps
    assert probe.calls == 2 * (300 // 16 + 1)
    assert direct.trainer.global_step == wrapped.trainer.global_step == 2 * (300 // 16 + 1)
    for a, b in zip(direct.parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert direct_metrics == wrapped_metrics


def test_chunked_steps_match_one_batch_per_step():
    one, one_metrics = train(chunk=1)
    many, many_metrics = train(chunk=32)
    for a, b in zip(one.parameters(), many.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert one_metrics.keys() == many_metrics.keys()
    for key in one_metrics:
        assert abs(one_metrics[key] - many_metrics[key]) < 1e-5, key


def test_chunked_training_matches_a_plain_pytorch_loop():
    """Same permutation, same batches of 16, same SGD updates as a hand-written loop."""
    trained, _ = train(chunk=8, epochs=1)
    seed_everything(3)
    dm = DigitsDataModule(n_train=300, batch_size=16)
    dm.setup()
    x, y = dm.data["train"]
    reference = Classifier(num_features=64, num_classes=10, hidden_sizes=[32])
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
    for a, b in zip(trained.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_optimizer_steps_are_counted_per_batch_not_per_chunk():
    task, _ = train(chunk=8, epochs=1)
    assert task.trainer.global_step == 300 // 16 + 1  # 19 batches of 16 (the last of 12)


def test_epoch_scheduler_steps_once_per_epoch():
    seed_everything(0)
    dm = DigitsDataModule(n_train=100, batch_size=10, chunk=4)
    task = Classifier(
        num_features=64, num_classes=10, lr=0.1,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )  # fmt: skip
    Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        task, dm
    )
    assert task.optimizers().param_groups[0]["lr"] == 0.1 * 0.5**3


class EpochStartProbe(Callback):
    """What the task's epoch metrics hold when an epoch starts: nothing, if reset."""

    def __init__(self) -> None:
        self.samples_at_start: list[float] = []

    def on_train_epoch_start(self, trainer, task) -> None:
        self.samples_at_start.append(float(task.train_loss.weight))


def test_epoch_metrics_cover_one_epoch_and_are_the_models_own():
    # metric objects are updated per step and logged once per epoch, in the epoch-end hooks
    probe = EpochStartProbe()
    task, metrics = train(chunk=4, epochs=3, callbacks=[probe])
    assert probe.samples_at_start == [0.0, 0.0, 0.0]  # Lightning reset them after each epoch
    dm = task.trainer.datamodule
    x, y = dm.data["val"]
    with torch.no_grad():
        logits = task(x)
    assert metrics["val/samples"] == len(y)  # the last validation alone
    assert abs(metrics["val/acc"] - (logits.argmax(1) == y).float().mean().item()) < 1e-6
    assert abs(metrics["val/loss"] - nn.functional.cross_entropy(logits, y).item()) < 1e-5
    assert {"train/loss", "train/acc"} <= metrics.keys()
