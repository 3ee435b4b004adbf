"""Task LightningModules: each takes a network and owns its loss, metrics and optimisation.

The network is any `nn.Module` class whose first two arguments are `in_features` and
`out_features` (`MLP` in every seed config, another by `class_path`). The task builds it with
the widths the data and the task call for (the CLI links `num_features` and `num_classes` /
`num_targets` from the datamodule), so no config writes a shape.
"""

from __future__ import annotations

import abc
import copy
import math
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torchmetrics
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from mlplab.data.base import described_outputs
from mlplab.errors import TrainingDiverged, UserError
from mlplab.safety import trust
from mlplab.speed import cuda_graph

# An optimizer class and its settings; the parameters and `lr` are given at construction, so the
# config has one learning rate (`model.lr`) that survives a change of optimizer and that
# Lightning's `LearningRateFinder` can set.
OptimizerFactory = Callable[[Iterable, float], torch.optim.Optimizer]
# A network class and its settings, built with (in_features, out_features): in YAML a
# `class_path` and `init_args` like any other, its widths left out.
NetFactory = Callable[[int, int], nn.Module]


class Standardize(nn.Module):
    """(x - mean) / std with statistics of the training split, set by `Task.setup`.

    Living in the model, the statistics travel in every checkpoint and logged model, so
    predictions take raw features. The input keeps its shape (images stay images).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.flatten(1) - self.mean) / self.std).view_as(x)


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


class Step(nn.Module):
    """A threshold logic unit's output: 1 where the weighted sum is above 0, else 0."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z > 0).to(z.dtype)


class Task(LightningModule, abc.ABC):
    """Supervised training around `net`: subclasses choose the output unit, loss and metrics.

    Training is Lightning's automatic optimisation: `training_step` returns the loss. With an
    mlplab datamodule's `chunk` above 1 (the seed configs' fast path) each training batch holds
    several batches and `training_step` steps the optimiser once per batch itself, honouring
    the Trainer's `max_steps`, `accumulate_grad_batches` and gradient clipping, and the
    scheduler's interval and frequency, so steps stay optimiser steps (see `mlplab.speed`).
    """

    #: the metric `ModelCheckpoint` watches and `fit` reports the best of.
    monitor = "val/loss"

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
        divergence_factor: float | None = 1e4,
        cuda_graph: bool = False,
    ) -> None:
        """`net` is called with (num_features, num_outputs) to build the network (an
        `nn.Module` already built is taken as it is); `standardize` puts the training split's
        per-feature mean and std in front of it, so the model takes raw inputs.

        Training stops as diverged when an epoch's train/loss is NaN, infinite, or above
        `divergence_factor` times the loss of the first training batch (the untrained model's):
        a finite explosion is a failure too (None: only NaN and infinity).

        `cuda_graph` replays the fast path's per-batch forward and backward pass as one CUDA
        graph (`mlplab.speed.cuda_graph`): for small networks on a GPU, bound by kernel launches."""
        super().__init__()
        # num_outputs follows from a subclass's own argument, so it is not a hyperparameter
        with warnings.catch_warnings():  # a net built in Python is dropped just below
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters(ignore=["num_outputs"], logger=False)
        if isinstance(net, nn.Module):
            # built in Python, not from a config: its weights are in the state dict; pass
            # `net=` to `load_from_checkpoint` (from the CLI, `net` is its config and rebuilds)
            self.hparams.pop("net", None)
            self.net = net
        else:
            self.net = net(num_features, num_outputs)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.input_norm = Standardize(num_features) if standardize else nn.Identity()
        # one collection per stage (a ModuleDict cannot have a key named "train")
        self.train_metrics = self.make_metrics().clone(prefix="train/")
        self.val_metrics = self.make_metrics().clone(prefix="val/")
        self.test_metrics = self.make_metrics().clone(prefix="test/")
        # Epoch losses as sample-weighted means whose states are summed over DDP ranks: exact
        # for uneven shards, where Lightning's own `sync_dist` mean floors its integer batch
        # count (Lightning-AI/pytorch-lightning#21838).
        self.train_loss, self.val_loss, self.test_loss = EpochMean(), EpochMean(), EpochMean()
        self.val_samples, self.test_samples = EpochCount(), EpochCount()
        self.batches_seen = 0  # fast path: batches of this epoch, for gradient accumulation
        self.backward_fn = self.manual_backward  # fast path: see `on_train_start`
        self.step_graph: cuda_graph.StepGraph | None = None  # fast path with `cuda_graph`
        self.initial_loss: float | None = None  # see `on_train_epoch_end`

    # --- what a task defines -------------------------------------------------------------------
    output: nn.Module  # logits -> the seed's output unit (probabilities or values)

    @abc.abstractmethod
    def make_metrics(self) -> torchmetrics.MetricCollection: ...

    @abc.abstractmethod
    def loss(
        self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The batch's loss; with `weight` (one per sample) weighed as Keras weighs: each
        sample's loss times its weight, averaged over the batch."""

    @abc.abstractmethod
    def metric_inputs(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the metrics' `update` takes for this batch."""

    def sample_weights(
        self, y: torch.Tensor, weight: torch.Tensor | None, stage: str
    ) -> torch.Tensor | None:
        """The loss weights of a batch: the data's per-sample weights (a table's
        `weight_column`); a classifier multiplies in its class weights when training."""
        return weight

    # --- one step for every stage --------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, outputs)."""
        return self.net(self.input_norm(x))

    def shared_step(self, batch, stage: str) -> torch.Tensor:
        x, y, *weight = batch  # a third tensor: per-sample weights
        logits = self(x)
        loss = self.loss(logits, y, self.sample_weights(y, weight[0] if weight else None, stage))
        if stage == "train" and self.initial_loss is None:
            self.note_initial_loss(loss)
        self.update_metrics(stage, logits.detach(), y, loss.detach())
        return loss

    def training_step(self, batch, batch_idx):
        if not self.automatic_optimization:
            return self.chunk_step(batch, batch_idx)
        return self.shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.shared_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self.output(self(x))

    def update_metrics(self, stage: str, logits: torch.Tensor, y: torch.Tensor, loss) -> None:
        """Accumulate an epoch's metrics on the device: no host sync, no `self.log` per step
        (Lightning's costs ~1 ms a call here); `log_epoch` logs them once."""
        getattr(self, f"{stage}_metrics").update(*self.metric_inputs(logits, y))
        getattr(self, f"{stage}_loss").update(loss, weight=len(y))
        if stage != "train":  # every sample evaluated once, summed over ranks
            getattr(self, f"{stage}_samples").update(len(y))

    def log_epoch(self, stage: str) -> None:
        """Log a stage's metric objects (torchmetrics reduces them over DDP ranks, Lightning
        resets them) at the global step, so that every validation of an epoch is its own
        point and runs compare on one axis of optimiser steps."""
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"))
        self.log_dict(getattr(self, f"{stage}_metrics"))
        if stage != "train":
            self.log(f"{stage}/samples", getattr(self, f"{stage}_samples"))
        if stage != "test":  # a test has no epoch of its own
            self.log("epoch", float(self.current_epoch))
        self.log("step", float(self.global_step))  # Lightning's logger connector takes it as x

    def note_initial_loss(self, loss: torch.Tensor) -> None:
        """The untrained model's loss (averaged over DDP ranks, so all judge alike): the scale
        an exploding loss is measured against."""
        self.initial_loss = float(self.trainer.strategy.reduce(loss.detach(), reduce_op="mean"))

    def on_train_epoch_end(self) -> None:
        loss = self.train_loss.compute()  # the same on every DDP rank: all stop together
        factor, initial = self.hparams.get("divergence_factor"), self.initial_loss
        if not torch.isfinite(loss):
            reason = f"train/loss is {loss.item()}"
        elif factor and initial and loss > factor * initial:
            reason = (
                f"train/loss is {loss.item():.3g}, over {factor:g}x the first batch's {initial:.3g}"
            )
        else:
            reason = None
        if reason is not None:
            raise TrainingDiverged(
                f"training diverged: {reason} in epoch {self.current_epoch} (model.lr is "
                f"{self.hparams.lr}: lower it, or standardize the inputs; "
                "model.divergence_factor sets the limit)"
            )
        self.log_epoch("train")
        if not self.automatic_optimization:
            self.step_schedulers("epoch")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch("test")

    # --- optimisation --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage != "fit":
            return
        # the datamodule decided in its own `setup` (it runs first) whether batches come chunked
        self.automatic_optimization = not getattr(datamodule, "chunked", False)
        if self.hparams.get("cuda_graph"):
            cuda_graph.refuse(self.trainer, self, getattr(datamodule, "chunk", 1))
        if self.hparams.standardize and datamodule is not None:
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
        scheduler = self.scheduler_factory(optimizer)
        if not self.automatic_optimization:  # `chunk_step` steps it by these settings
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.hparams.lr_scheduler_interval,
                "frequency": self.hparams.lr_scheduler_frequency,
                "monitor": self.hparams.lr_scheduler_monitor,
            },
        }

    def on_train_epoch_start(self) -> None:
        self.batches_seen = 0

    def chunk_step(self, batch, batch_idx: int) -> None:
        """The fast path: `batch` is (xs, ys), tuples of consecutive batches; each is one
        micro-step through Lightning's own calls (`LightningOptimizer.step`,
        `configure_gradient_clipping`, `manual_backward` where a strategy or precision plugin
        has work to do in the backward pass), so the global step counts optimiser steps."""
        xs, ys, *ws = batch
        trainer = self.trainer
        optimizer = self.optimizers()
        accumulate = trainer.accumulate_grad_batches
        clip = trainer.gradient_clip_val or is_overridden(
            "configure_gradient_clipping", self, LightningModule
        )
        step_scheduler = self.hparams.lr_scheduler_interval == "step" and self.lr_schedulers()
        steps_left = trainer.max_steps - trainer.global_step if trainer.max_steps >= 0 else -1
        last = len(xs) - 1 if batch_idx + 1 >= trainer.num_training_batches else -1
        if batch_idx == 0 and self.step_graph is not None:
            self.check_step_graph()
        losses, outputs, used = [], [], 0
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if steps_left == 0:
                break  # max_steps lands inside this chunk: stop exactly there
            loss, logits = (self.step_graph or self.micro_step)(x, y, ws[0][i] if ws else None)
            if self.initial_loss is None:
                self.note_initial_loss(loss)
            self.batches_seen += 1
            used += 1
            losses.append(loss)  # detached by the step
            outputs.append(logits)
            if self.batches_seen % accumulate and i != last:
                continue  # as in Lightning, the epoch's last batch steps whatever is left
            if clip:
                self.configure_gradient_clipping(
                    optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm
                )
            optimizer.step()
            # a graph's backward pass adds into the gradient tensors it was captured with
            optimizer.zero_grad(set_to_none=self.step_graph is None)
            steps_left -= 1
            if step_scheduler:
                self.step_schedulers("step")
        if used:
            y = torch.cat(ys[:used])
            sizes = torch.tensor([len(x) for x in xs[:used]], dtype=torch.float32, device=y.device)
            mean = torch.stack(losses) @ sizes / len(y)
            self.update_metrics("train", torch.cat(outputs), y, mean)

    def micro_step(self, x, y, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast path: one batch's forward and backward pass (gradients added to `.grad`);
        the loss and logits, detached. What `cuda_graph` captures."""
        logits = self(x)
        loss = self.loss(logits, y, self.sample_weights(y, weight, "train"))
        accumulate = self.trainer.accumulate_grad_batches
        self.backward_fn(loss / accumulate if accumulate > 1 else loss)
        return loss.detach(), logits.detach()

    def on_train_start(self) -> None:
        # Lightning's `manual_backward` runs the backward hooks (the fast path runs only where
        # no callback has one) and the strategy's and precision plugin's work; with neither
        # (one device, 32-bit) a plain `backward()` is the same and saves ~0.1 ms a step.
        trainer = self.trainer
        plain = (
            type(trainer.strategy) is SingleDeviceStrategy
            and type(trainer.precision_plugin) is Precision
            and not any(
                is_overridden(hook, self, LightningModule)
                for hook in ("on_before_backward", "backward", "on_after_backward")
            )
        )
        self.backward_fn = torch.Tensor.backward if plain else self.manual_backward
        if self.hparams.get("cuda_graph"):  # a fresh capture for every fit
            self.step_graph = self.new_step_graph()

    def new_step_graph(self) -> cuda_graph.StepGraph:
        def key() -> tuple:  # the memory the graph uses, and the one setting it bakes in
            return (*cuda_graph.memory_in_use(self), self.trainer.accumulate_grad_batches)

        return cuda_graph.StepGraph(self.micro_step, key)

    def check_step_graph(self) -> None:
        """At an epoch's start: capture again if what the graph reads has changed (a callback
        froze or unfroze layers, replaced buffers or freed the gradients)."""
        for p in self.parameters():
            if not p.requires_grad:
                p.grad = None  # frozen: no gradient, so no optimiser (Adam, momentum) moves it
        if self.step_graph.stale():
            self.step_graph = self.new_step_graph()

    def on_validation_model_zero_grad(self) -> None:
        """Lightning frees the gradients before validating; a captured graph adds into them."""
        if self.step_graph is None:
            super().on_validation_model_zero_grad()
        else:
            self.zero_grad(set_to_none=False)

    def on_train_end(self) -> None:
        if self.step_graph is not None:  # its memory pool, and the gradients it kept
            self.step_graph = None
            self.zero_grad(set_to_none=True)

    def step_schedulers(self, interval: str) -> None:
        """Fast path: step the scheduler as Lightning would with this interval and frequency."""
        scheduler = self.lr_schedulers()
        if scheduler is None or interval != self.hparams.lr_scheduler_interval:
            return
        count = self.global_step if interval == "step" else self.current_epoch + 1
        if count % self.hparams.lr_scheduler_frequency:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            monitor = self.hparams.lr_scheduler_monitor
            if monitor not in self.trainer.callback_metrics:
                raise UserError(  # a configuration mistake Lightning also refuses
                    f"ReduceLROnPlateau monitors {monitor!r}, which is not logged; set "
                    f"model.lr_scheduler_monitor to one of {sorted(self.trainer.callback_metrics)}"
                )
            scheduler.step(self.trainer.callback_metrics[monitor])
        else:
            scheduler.step()

    # --- checkpoints and serving ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if "hyper_parameters" in checkpoint:  # a checkpoint is data (`mlplab.safety.trust`)
            checkpoint["hyper_parameters"] = trust.plain_hyperparameters(
                checkpoint["hyper_parameters"], type(self)
            )
        checkpoint["mlplab_task"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["mlplab_initial_loss"] = self.initial_loss  # a resumed fit keeps its scale
        try:
            datamodule = self.trainer.datamodule
        except RuntimeError:  # `Trainer.save_checkpoint` outside a fit: no trainer attached
            datamodule = None
        # `mlplab predict --model` names the outputs with these
        checkpoint["mlplab_outputs"] = described_outputs(datamodule, self)
        if isinstance(self.logger, MLFlowLogger) and self.logger.run_id is not None:
            checkpoint["mlflow_run_id"] = self.logger.run_id  # resuming continues this run

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.initial_loss = checkpoint.get("mlplab_initial_loss")

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path, *args, weights_only: bool | None = None, **kwargs
    ):
        """Lightning's, with the checkpoint read as data and its classes checked first
        (`mlplab.safety.trust`); `weights_only=False` is the opt-in for a file you trust."""
        trusted = trust.checkpoints_trusted() if weights_only is None else not weights_only
        trust.read_checkpoint(checkpoint_path, trust=trusted)
        return super().load_from_checkpoint(
            checkpoint_path, *args, weights_only=not trusted, **kwargs
        )

    @staticmethod
    def from_checkpoint(path: str, map_location: str = "cpu") -> Task:
        """The task a checkpoint holds, whichever class it is, in eval mode (for inference).
        `Classifier.load_from_checkpoint(path)` does the same when the class is known."""
        task_class = trust.resolve_class(trust.read_checkpoint(path)["mlplab_task"])
        if not issubclass(task_class, Task):
            raise UserError(f"{path} names {task_class.__qualname__}, not an mlplab task")
        return task_class.load_from_checkpoint(path, map_location=map_location).eval()

    def inference_module(self) -> nn.Sequential:
        """Raw features in, the seed's outputs (probabilities or values) out: what MLflow serves."""
        module = nn.Sequential(self.input_norm, self.net, self.output)
        return copy.deepcopy(module).cpu().eval()


class Classifier(Task):
    """Binary (one output unit) when `num_classes == 2`, else one unit per class.

    `loss: cross_entropy` puts the seeds' sigmoid / softmax on the output and trains with
    (binary) cross-entropy on the logits. `loss: mse` is seed 001's linear output unit trained
    with the square loss on the 0/1 (one-hot) targets; its class is the output above 0.5 (binary)
    or the largest output. `loss: perceptron` (binary) is seed 004's perceptron: a step output
    unit, trained by the perceptron rule: SGD with learning rate 1 on the perceptron criterion
    `-(2y - 1) z` wherever the unit is wrong or on the boundary (scikit-learn's `Perceptron`).

    `class_weight` (Keras' argument) weighs each training sample's loss by its class: a list in
    the order of the data's classes, or `balanced` (scikit-learn's `n_samples / (n_classes *
    count)` from the training split). Validation and test losses stay unweighted, so they
    compare across weightings.
    """

    def __init__(
        self,
        net: NetFactory,
        num_features: int,
        num_classes: int | None = None,  # linked from the data's
        loss: Literal["cross_entropy", "mse", "perceptron"] = "cross_entropy",
        class_weight: Literal["balanced"] | list[float] | None = None,
        **kwargs,
    ) -> None:
        if num_classes is None:
            raise UserError(
                "the data has no num_classes (regression data?): use my_project.models.Regressor "
                "as the model (for a table, or set data.task: classification)"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if isinstance(class_weight, list) and len(class_weight) != num_classes:
            raise UserError(
                f"model.class_weight has {len(class_weight)} weights but the data has "
                f"{num_classes} classes; give one weight per class, in the data's class order, "
                "or 'balanced'"
            )
        if isinstance(class_weight, list) and min(class_weight) < 0:
            raise UserError(f"model.class_weight {class_weight} has a negative weight")
        if loss == "perceptron" and num_classes != 2:
            raise UserError(f"loss: perceptron is binary, and the data has {num_classes} classes")
        self.num_classes = num_classes
        super().__init__(net, num_features, 1 if num_classes == 2 else num_classes, **kwargs)
        self.loss_name = loss
        if loss == "mse":
            self.output = nn.Identity()
        elif loss == "perceptron":
            self.output = Step()
        else:
            self.output = nn.Sigmoid() if self.binary else nn.Softmax(dim=1)
        if class_weight is not None:  # a buffer: checkpoints and resumed fits keep the weights
            weights = torch.ones(num_classes) if class_weight == "balanced" else class_weight
            self.register_buffer("class_weights", torch.as_tensor(weights, dtype=torch.float32))

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

    def loss(self, logits, y, weight=None):
        reduction = "mean" if weight is None else "none"
        functional = nn.functional
        if self.loss_name == "mse":
            target = (
                y.float().unsqueeze(1) if self.binary else functional.one_hot(y, self.num_classes)
            )
            losses = functional.mse_loss(logits, target.float(), reduction=reduction)
            losses = losses if weight is None else losses.mean(dim=1)
        elif self.loss_name == "perceptron":  # a step on the boundary is wrong too, as in the rule
            margin = (2 * y.float() - 1) * logits.squeeze(1)
            losses = torch.where(margin <= 0, -margin, torch.zeros_like(margin))
            losses = losses.mean() if weight is None else losses
        elif self.binary:  # logits (B, 1), y (B,) in {0, 1}
            losses = functional.binary_cross_entropy_with_logits(
                logits.squeeze(1), y.float(), reduction=reduction
            )
        else:  # logits (B, C), y (B,) class indices
            losses = functional.cross_entropy(logits, y, reduction=reduction)
        return losses if weight is None else (losses * weight).mean()

    def sample_weights(self, y, weight, stage):
        if stage != "train" or not hasattr(self, "class_weights"):
            return weight
        by_class = self.class_weights[y]
        return by_class if weight is None else by_class * weight

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.get("class_weight") == "balanced" and stage == "fit":
            data = getattr(datamodule, "data", None)
            if not isinstance(data, dict) or "train" not in data:
                raise UserError(
                    "model.class_weight: balanced counts the training targets, which only an "
                    "mlplab datamodule holds; give the weights as a list"
                )
            y = data["train"][1]
            counts = torch.bincount(y.cpu(), minlength=self.num_classes).float()
            balanced = len(y) / (self.num_classes * counts.clamp(min=1))
            self.class_weights.copy_(balanced)

    def on_fit_start(self) -> None:
        """The weights in use as params (`model.class_weight.<class>`), `balanced` resolved."""
        if self.logger is None or not hasattr(self, "class_weights"):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "class_names", None) or range(self.num_classes)
        keys = [re.sub(r"[^\w\-. /]", "_", str(name)) for name in names]  # MLflow's key chars
        self.logger.log_hyperparams(
            {f"model.class_weight.{key}": round(float(w), 6)
             for key, w in zip(keys, self.class_weights, strict=True)}
        )  # fmt: skip

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


class Regressor(Task):
    """Linear output, MSE / MAE / Huber loss; reports MAE, RMSE and R2."""

    def __init__(
        self,
        net: NetFactory,
        num_features: int,
        num_targets: int = 1,
        loss: Literal["mse", "mae", "huber"] = "mse",
        **kwargs,
    ) -> None:
        super().__init__(net, num_features, num_targets, **kwargs)
        self.output = nn.Identity()
        functional = nn.functional
        self.loss_fn = {"mse": functional.mse_loss, "mae": functional.l1_loss,
                        "huber": functional.huber_loss}[loss]  # fmt: skip

    def make_metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {
                "mae": torchmetrics.MeanAbsoluteError(),
                "rmse": torchmetrics.MeanSquaredError(squared=False),
                "r2": R2Score(),
            }
        )

    def loss(self, logits, y, weight=None):  # logits and y (B, num_targets)
        if weight is None:
            return self.loss_fn(logits, y)
        return (self.loss_fn(logits, y, reduction="none").mean(dim=1) * weight).mean()

    def metric_inputs(self, logits, y):
        return (logits.squeeze(1), y.squeeze(1)) if logits.shape[1] == 1 else (logits, y)
