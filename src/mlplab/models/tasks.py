"""Task LightningModules: each owns a loss, its metrics and the optimizer around one `MLP`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torchmetrics
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable
from torch import nn

from mlplab.models.mlp import MLP

# An optimizer class and its settings; the parameters and `lr` are given at construction, so the
# config has one learning rate (`model.lr`) that survives a change of optimizer.
OptimizerFactory = Callable[[Iterable, float], torch.optim.Optimizer]


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
        # one collection per stage (a ModuleDict cannot have a key named "train")
        self.train_metrics = self.make_metrics().clone(prefix="train/")
        self.val_metrics = self.make_metrics().clone(prefix="val/")
        self.test_metrics = self.make_metrics().clone(prefix="test/")

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

    def _log_epoch(self, stage: str, loss: torch.Tensor, n: int) -> None:
        """Epoch means only: Lightning accumulates on the device, no host sync per step."""
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=n)
        self.log_dict(getattr(self, f"{stage}_metrics"), on_step=False, on_epoch=True)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        getattr(self, f"{stage}_metrics").update(*self.metric_inputs(logits, y))
        self._log_epoch(stage, self.loss(logits, y), len(x))

    def training_step(self, batch, batch_idx) -> None:
        """One optimiser step per batch of the chunk: `batch` is (xs, ys), tuples of batches (or
        a plain (x, y) batch, stepped once)."""
        xs, ys = batch
        if isinstance(xs, torch.Tensor):
            xs, ys = (xs,), (ys,)
        optimizer = self.optimizers()
        total, outputs = torch.zeros((), device=self.device), []
        for x, y in zip(xs, ys, strict=True):
            logits = self(x)
            loss = self.loss(logits, y)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
            total += loss.detach() * len(x)
            outputs.append(logits.detach())
        y = torch.cat(ys)
        self.train_metrics.update(*self.metric_inputs(torch.cat(outputs), y))
        self._log_epoch("train", total / len(y), len(y))

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()  # stepped per epoch, after validation
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(self.trainer.callback_metrics[self.monitor])
        elif scheduler is not None:
            scheduler.step()

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

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
            {"acc": torchmetrics.Accuracy(task=task, num_classes=self.num_classes)}
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
