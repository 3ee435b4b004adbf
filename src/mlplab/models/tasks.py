"""Task LightningModules: each owns a loss, its metrics and the optimizer around one `MLP`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torchmetrics
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from mlplab.errors import TrainingDiverged
from mlplab.models.mlp import MLP

# An optimizer class and its settings; the parameters and `lr` are given at construction, so the
# config has one learning rate (`model.lr`) that survives a change of optimizer.
OptimizerFactory = Callable[[Iterable, float], torch.optim.Optimizer]


# What Lightning's `manual_backward` and `LightningOptimizer.step` add around a plain
# `loss.backward(); optimizer.step()` on one device in 32-bit: these hooks, on every callback.
_STEP_HOOKS = ("on_before_backward", "backward", "on_after_backward", "on_before_optimizer_step")


def direct_steps_are_safe(trainer: Trainer, module: LightningModule) -> bool:
    """Whether the optimiser may be stepped without Lightning's wrappers, changing nothing but
    speed: one process (no DDP reducer to prepare), 32-bit precision (no scaler), no profiler,
    and no callback or module hook listening to the backward pass or the step."""
    listeners = [(module, LightningModule)] + [(cb, Callback) for cb in trainer.callbacks]
    return (
        type(trainer.strategy) is SingleDeviceStrategy
        and type(trainer.precision_plugin) is Precision
        and isinstance(trainer.profiler, PassThroughProfiler)
        and not any(is_overridden(h, obj, parent) for obj, parent in listeners for h in _STEP_HOOKS)
    )


class Standardize(nn.Module):
    """(x - mean) / std with statistics of the training split, set by `MLPTask.setup`.

    Living in the model, the statistics travel in every checkpoint and logged model, so
    predictions take raw features.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - self.mean) / self.std


class _Unchecked:
    """A torchmetrics aggregator that keeps NaN (a diverged loss must show) and checks nothing
    per update (no host sync). torchmetrics' own `nan_strategy="disable"` also drops the
    weights (torchmetrics 1.9.0)."""

    def _cast_and_nan_check_input(self, x, weight=None):
        x = torch.as_tensor(x, dtype=self.dtype, device=self.device)
        return x, None if weight is None else weight.to(self.dtype)


class EpochMean(_Unchecked, torchmetrics.MeanMetric):
    """Sample-weighted mean of an epoch."""


class EpochCount(_Unchecked, torchmetrics.SumMetric):
    """How many samples an epoch's metrics cover, summed over DDP ranks."""


class MLPTask(LightningModule):
    """Shared training system: subclasses choose the head, loss and metrics.

    `num_features` (and the subclass's `num_classes` / `num_targets`) and `standardize` are linked
    from the datamodule by the CLI; the rest is the architecture and the optimisation.
    """

    #: the metric `ModelCheckpoint` watches and `fit` reports the best of.
    monitor = "val/loss"

    def __init__(
        self,
        num_features: int,
        num_outputs: int,
        lr: float = 1e-3,
        optimizer: OptimizerFactory = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        standardize: bool = False,
        **net_options,
    ) -> None:
        """`net_options` are `MLP`'s: `hidden_sizes`, `activation`, `batch_norm`, `dropout`, `init`
        and the rest (the CLI lists them with their types, e.g. `--model.hidden_sizes`)."""
        super().__init__()
        # num_outputs follows from a subclass's own argument, so it is not a hyperparameter
        self.save_hyperparameters(ignore=["num_outputs", "optimizer", "lr_scheduler"], logger=False)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.input_norm = Standardize(num_features) if standardize else nn.Identity()
        self.mlp = MLP(num_features, num_outputs, **net_options)
        # Training batches arrive in chunks of several (see `ArrayDataModule.chunk`) and are
        # stepped through in `training_step`: Lightning's per-step overhead is paid per chunk.
        self.automatic_optimization = False
        self.direct_steps = False  # decided in `on_train_start`
        # one collection per stage (a ModuleDict cannot have a key named "train")
        self.train_metrics = self.make_metrics().clone(prefix="train/")
        self.val_metrics = self.make_metrics().clone(prefix="val/")
        self.test_metrics = self.make_metrics().clone(prefix="test/")
        # Epoch losses as sample-weighted means whose states are summed over DDP ranks: exact
        # for uneven shards, where Lightning's own `sync_dist` mean floors its integer batch
        # count (Lightning-AI/pytorch-lightning#21838).
        self.train_loss, self.val_loss, self.test_loss = EpochMean(), EpochMean(), EpochMean()
        self.val_samples, self.test_samples = EpochCount(), EpochCount()

    # --- what a task defines -------------------------------------------------------------------
    output: nn.Module  # logits -> the seed's output unit (probabilities or values)

    def make_metrics(self) -> torchmetrics.MetricCollection:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metric_inputs(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the metrics' `update` takes for this batch."""
        raise NotImplementedError

    # --- shared machinery ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.hparams.standardize and datamodule is not None:
            mean, std = datamodule.feature_stats()
            self.input_norm.mean.copy_(mean)
            self.input_norm.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, num_outputs)."""
        return self.mlp(self.input_norm(x))

    def _update(self, stage: str, outputs: torch.Tensor, y: torch.Tensor, loss: torch.Tensor):
        """Accumulate an epoch's metrics on the device: no host sync, no `self.log` per step
        (Lightning's costs ~1 ms a call here); `_log_epoch` logs them once."""
        getattr(self, f"{stage}_metrics").update(*self.metric_inputs(outputs, y))
        getattr(self, f"{stage}_loss").update(loss, weight=len(y))
        if stage != "train":  # every sample evaluated once, summed over ranks
            getattr(self, f"{stage}_samples").update(len(y))

    def _log_epoch(self, stage: str) -> None:
        """Log a stage's metric objects: torchmetrics reduces their states over DDP ranks in
        `compute`, and Lightning resets them for the next epoch."""
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"))
        self.log_dict(getattr(self, f"{stage}_metrics"))
        if stage != "train":
            self.log(f"{stage}/samples", getattr(self, f"{stage}_samples"))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self._update(stage, logits, y, self.loss(logits, y))

    def training_step(self, batch, batch_idx) -> None:
        """One optimiser step per batch of the chunk: `batch` is (xs, ys), tuples of batches (or
        a plain (x, y) batch, stepped once)."""
        xs, ys = batch
        if isinstance(xs, torch.Tensor):
            xs, ys = (xs,), (ys,)
        optimizer = self.optimizers()
        losses, outputs = [], []
        for x, y in zip(xs, ys, strict=True):
            logits = self(x)
            loss = self.loss(logits, y)
            optimizer.zero_grad(set_to_none=True)
            if self.direct_steps:
                loss.backward()
                optimizer.optimizer.step()
            else:
                self.manual_backward(loss)
                optimizer.step()
            losses.append(loss.detach())
            outputs.append(logits.detach())
        if self.direct_steps:  # what `LightningOptimizer.step` counts: the global step
            self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_by(
                len(xs)
            )
        y = torch.cat(ys)
        sizes = torch.tensor([len(x) for x in xs], dtype=torch.float32, device=y.device)
        self._update("train", torch.cat(outputs), y, torch.stack(losses) @ sizes / len(y))

    def on_train_start(self) -> None:
        # Lightning's wrappers cost ~0.4 ms a step here, as much as the MNIST seed MLP's maths
        self.direct_steps = direct_steps_are_safe(self.trainer, self)

    def on_train_epoch_end(self) -> None:
        loss = self.train_loss.compute()  # the same on every DDP rank: all stop together
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"training diverged: train/loss is {loss.item()} in epoch {self.current_epoch} "
                f"(model.lr is {self.hparams.lr}: lower it, or standardize the inputs)"
            )
        self._log_epoch("train")
        scheduler = self.lr_schedulers()  # stepped per epoch, after validation
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(self.trainer.callback_metrics[self.monitor])
        elif scheduler is not None:
            scheduler.step()

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self.output(self(x))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters(), self.hparams.lr)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mlplab_task"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if isinstance(self.logger, MLFlowLogger) and self.logger.run_id is not None:
            checkpoint["mlflow_run_id"] = self.logger.run_id  # resuming continues this run

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str = "cpu") -> MLPTask:
        """The task a checkpoint holds, whichever subclass it is (for inference: the optimizer
        settings are not restored)."""
        import importlib

        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
        module_name, _, class_name = checkpoint["mlplab_task"].rpartition(".")
        task_class = getattr(importlib.import_module(module_name), class_name)
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
        task = task_class(**hparams)
        task.load_state_dict(checkpoint["state_dict"])
        return task.eval()

    def inference_module(self) -> nn.Sequential:
        """Raw features in, the seed's outputs (probabilities or values) out: what MLflow serves."""
        module = nn.Sequential(self.input_norm, self.mlp, self.output)
        return copy.deepcopy(module).cpu().eval()


class Classifier(MLPTask):
    """Binary (one output unit) when `num_classes == 2`, else one unit per class.

    `loss: cross_entropy` puts the seeds' sigmoid / softmax on the output and trains with
    (binary) cross-entropy on the logits. `loss: mse` is seed 001's linear output unit trained
    with the square loss on the 0/1 (one-hot) targets; its class is the output above 0.5 (binary)
    or the largest output.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        **kwargs,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        super().__init__(num_features, 1 if num_classes == 2 else num_classes, **kwargs)
        self.loss_name = loss
        if loss == "mse":
            self.output = nn.Identity()
        else:
            self.output = nn.Sigmoid() if self.binary else nn.Softmax(dim=1)

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def make_metrics(self) -> torchmetrics.MetricCollection:
        task = "binary" if self.binary else "multiclass"
        return torchmetrics.MetricCollection(
            {
                # inputs are this class's own hard labels: skip torchmetrics' per-update checks
                "acc": torchmetrics.Accuracy(
                    task=task, num_classes=self.num_classes, validate_args=False
                )
            }
        )

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "mse":
            target = (
                y.float().unsqueeze(1)
                if self.binary
                else nn.functional.one_hot(y, self.num_classes).float()
            )
            return nn.functional.mse_loss(logits, target)
        if self.binary:  # logits (B, 1), y (B,) in {0, 1}
            return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), y.float())
        return nn.functional.cross_entropy(logits, y)  # logits (B, C), y (B,) class indices

    def metric_inputs(self, logits, y):
        # hard labels: torchmetrics would take a linear output outside [0, 1] for a logit
        outputs = self.output(logits)
        labels = (outputs.squeeze(1) > 0.5).long() if self.binary else outputs.argmax(dim=1)
        return labels, y


class R2Score(torchmetrics.R2Score):
    """R2 that is NaN, not an exception, when an epoch saw fewer than two samples
    (a `fast_dev_run` with batch size 1, a tiny shard under DDP)."""

    def compute(self) -> torch.Tensor:
        if self.total < 2:
            return torch.tensor(float("nan"), device=self.total.device)
        return super().compute()


class Regressor(MLPTask):
    """Linear output, MSE / MAE / Huber loss; reports MAE, RMSE and R2."""

    def __init__(
        self,
        num_features: int,
        num_targets: int = 1,
        loss: Literal["mse", "mae", "huber"] = "mse",
        **kwargs,
    ) -> None:
        super().__init__(num_features, num_targets, **kwargs)
        self.output = nn.Identity()
        self.loss_fn = {"mse": nn.MSELoss(), "mae": nn.L1Loss(), "huber": nn.HuberLoss()}[loss]

    def make_metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {
                "mae": torchmetrics.MeanAbsoluteError(),
                "rmse": torchmetrics.MeanSquaredError(squared=False),
                "r2": R2Score(),
            }
        )

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, y)  # both (B, num_targets)

    def metric_inputs(self, logits, y):
        return (logits.squeeze(1), y.squeeze(1)) if logits.shape[1] == 1 else (logits, y)
