"""Classification: the seeds' sigmoid / softmax, linear (square loss) and step outputs."""

from __future__ import annotations

import re
from typing import Literal

import torch
import torchmetrics
from torch import nn

from mlplab.errors import UserError
from my_project.models.task import NetFactory, Task


class Step(nn.Module):
    """A threshold logic unit's output: 1 where the weighted sum is above 0, else 0."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z > 0).to(z.dtype)


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
        """Probabilities for cross-entropy (what AUROC and the like take; accuracy thresholds
        them at 0.5 or takes the largest); hard labels for a linear or step output, which
        torchmetrics would take for logits."""
        outputs = self.output(logits)
        if self.loss_name == "cross_entropy":
            return (outputs.squeeze(1) if self.binary else outputs), y
        labels = (outputs.squeeze(1) > 0.5).long() if self.binary else outputs.argmax(dim=1)
        return labels, y
