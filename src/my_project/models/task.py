"""The task base: a network trained under one loss, with its metrics and its output unit.

As in lightning-hydra-template's `mnist_module.py`, the task takes the network and the
optimizer (and scheduler) as arguments, shares one step between stages and returns
Lightning's scheduler dict; it knows no logger, checkpoint or speed trick (those are the
platform's callbacks). The network is any `nn.Module` class whose first two arguments are
`in_features` and `out_features`: the task builds it with the widths the data calls for (the
CLI links `num_features` and `num_classes` / `num_targets` from the datamodule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
import torchmetrics
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable
from torch import nn

from mlplab.errors import UserError
from my_project.models.components import EpochMean, Gathered, Standardize

# An optimizer class and its settings; the parameters and `lr` are given at construction, so the
# config has one learning rate (`model.lr`) that survives a change of optimizer and that
# Lightning's `LearningRateFinder` can set.
OptimizerFactory = Callable[[Iterable, float], torch.optim.Optimizer]
# A network class and its settings, built with (in_features, out_features).
NetFactory = Callable[[int, int], nn.Module]


class Task(LightningModule):
    """Supervised training of `net`; a subclass sets `output` and defines `loss`,
    `make_metrics` and `metric_inputs`. `metrics` (torchmetrics by `class_path`) join the
    subclass's own, logged as train/NAME, val/NAME and test/NAME."""

    output: nn.Module  # logits -> the task's outputs (probabilities or values)

    def __init__(
        self,
        net: NetFactory,
        num_features: int,
        num_outputs: int,
        lr: float = 1e-3,
        optimizer: OptimizerFactory = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_frequency: int = 1,
        lr_scheduler_monitor: str = "val/loss",
        standardize: bool = False,
        metrics: Mapping[str, torchmetrics.Metric] | None = None,
    ) -> None:
        """`net` is called with (num_features, num_outputs) (a network already built is taken
        as it is); `standardize` puts the training split's mean and std in front of it."""
        super().__init__()
        # a network or metrics built in Python, not from a config, are no setting (the state
        # dict has the weights; pass them to `load_from_checkpoint`)
        built = ["net"] if isinstance(net, nn.Module) else []
        self.save_hyperparameters(ignore=["num_outputs", *built], logger=False)
        if any(isinstance(m, nn.Module) for m in (self.hparams.get("metrics") or {}).values()):
            self.hparams.pop("metrics")
        if isinstance(net, nn.Module):
            self.net = net
        else:
            self.net = net(num_features, num_outputs)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr}")
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.input_norm = Standardize(num_features) if standardize else nn.Identity()
        chosen = self.make_metrics()
        chosen.add_metrics(dict(metrics or {}))
        # one collection per stage (a ModuleDict cannot have a key named "train")
        self.train_metrics = chosen.clone(prefix="train/")
        self.val_metrics = chosen.clone(prefix="val/")
        self.test_metrics = chosen.clone(prefix="test/")
        self.train_loss, self.val_loss, self.test_loss = EpochMean(), EpochMean(), EpochMean()
        # training updates one call per many batches (`Gathered`)
        self.train_gathered = Gathered(self.train_metrics), Gathered(self.train_loss)
        # every sample evaluated once, summed over DDP ranks
        self.val_samples, self.test_samples = torchmetrics.SumMetric(), torchmetrics.SumMetric()

    def make_metrics(self) -> torchmetrics.MetricCollection:
        raise NotImplementedError(f"{type(self).__name__} defines its metrics")

    def fresh_metrics(self) -> torchmetrics.MetricCollection:
        """Every metric the task logs (its own and `metrics`), unprefixed and empty: what a
        stacked trial updates (`mlplab.speed.stacked`)."""
        fresh = self.val_metrics.clone()
        fresh.prefix = None  # `clone` keeps the old prefix where given none
        fresh.reset()
        return fresh

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None):
        """The batch's loss; with `weight` (one per sample) as Keras weighs: each sample's loss
        times its weight, averaged over the batch."""
        raise NotImplementedError(f"{type(self).__name__} defines its loss")

    def metric_inputs(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the metrics' `update` takes for this batch."""
        return self.output(logits), y

    def sample_weights(self, y, weight: torch.Tensor | None, stage: str) -> torch.Tensor | None:
        """The loss weights of a batch: the data's per-sample weights (a table's
        `weight_column`); a classifier multiplies in its class weights when training."""
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, outputs)."""
        return self.net(self.input_norm(x))

    def model_step(self, batch, stage: str) -> torch.Tensor:
        """One step of any stage: the loss, with the epoch's metrics updated on the device (no
        host sync and no `self.log` per batch; `log_epoch` logs them once an epoch)."""
        x, y, *weight = batch  # a third tensor: per-sample weights
        logits = self(x)
        loss = self.loss(logits, y, self.sample_weights(y, weight[0] if weight else None, stage))
        inputs = self.metric_inputs(logits.detach(), y)
        if stage == "train":
            self.train_gathered[0].update(*inputs)
            self.train_gathered[1].update(loss.detach().reshape(1), loss.new_full((1,), len(y)))
        else:
            getattr(self, f"{stage}_metrics").update(*inputs)
            getattr(self, f"{stage}_loss").update(loss.detach(), weight=len(y))
        if stage != "train":
            getattr(self, f"{stage}_samples").update(len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self.model_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.model_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.model_step(batch, "test")

    def predict_step(self, batch, batch_idx=0):
        return self.output(self(batch[0] if isinstance(batch, list | tuple) else batch))

    def log_epoch(self, stage: str) -> None:
        """The stage's loss and metrics (torchmetrics reduces them over DDP ranks), at the
        global step: every validation is its own point, runs compare on one axis."""
        if stage == "train":
            for gathered in self.train_gathered:
                gathered.flush()
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"))
        self.log_dict(getattr(self, f"{stage}_metrics"))
        if stage != "train":  # a count for the summary line, not a metric to chart
            self.log(f"{stage}/samples", getattr(self, f"{stage}_samples"), logger=False)
        if stage != "test":  # a test has no epoch or step of its own (the tested checkpoint's)
            self.log("epoch", float(self.current_epoch))
            self.log("step", float(self.global_step))  # Lightning's logger connector: the x

    def on_train_epoch_end(self) -> None:
        self.log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch("test")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.hparams.standardize and datamodule is not None:
            mean, std = datamodule.feature_stats()
            self.input_norm.mean.copy_(mean)
            self.input_norm.std.copy_(std)

    def configure_optimizers(self):
        if not any(p.requires_grad for p in self.parameters()):
            raise UserError(
                f"{type(self.net).__name__} has no trainable weights: nothing to fit; evaluate it "
                "as it is with `mlplab test --config ...`"
            )
        optimizer = self.optimizer_factory(self.parameters(), self.hparams.lr)
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.scheduler_factory(optimizer),
                "interval": self.hparams.lr_scheduler_interval,
                "frequency": self.hparams.lr_scheduler_frequency,
                "monitor": self.hparams.lr_scheduler_monitor,
            },
        }
