"""Figures as callbacks: list them under `trainer.callbacks` in a config to have them logged.

Each draws with matplotlib's object API (no pyplot, no display needed) and logs a PNG to the
MLflow run under `figures/`. Without an MLflow logger (e.g. `fast_dev_run`) they draw nothing;
a figure the run's data or model cannot give (data not held in memory as an `ArrayDataModule`
holds it, inputs that are not 2-D points, no test split) is skipped with one line saying why.
"""

from __future__ import annotations

import math
import sys

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from mlplab.serving import working_inference_module
from mlplab.tracking.logger import MLflowRunLogger


def _mlflow(trainer: Trainer) -> MLflowRunLogger | None:
    logger = trainer.logger
    return logger if isinstance(logger, MLflowRunLogger) and trainer.is_global_zero else None


def _log(logger: MLflowRunLogger, figure, name: str) -> None:
    logger.experiment.log_figure(logger.run_id, figure, f"figures/{name}.png")


def _split(trainer: Trainer, split: str, figure: str):
    """(features, targets) of a split the datamodule holds in memory, else None and one line."""
    data = getattr(trainer.datamodule, "data", None)
    if isinstance(data, dict) and split in data:
        return data[split][:2]
    print(f"mlplab: no {figure} figure: {type(trainer.datamodule).__name__} holds no {split} "
          "split in memory (an ArrayDataModule's `data`)", file=sys.stderr)  # fmt: skip
    return None


def _class_names(datamodule, n: int) -> list[str]:
    return list(getattr(datamodule, "class_names", [str(i) for i in range(n)]))


class SampleImages(Callback):
    """A grid of training images with their labels, once per run (seeds 002 and 003)."""

    def __init__(self, n: int = 25, seed: int = 213) -> None:
        self.n, self.seed = n, seed

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = _mlflow(trainer)
        shape = getattr(trainer.datamodule, "image_shape", None)
        if logger is None:
            return
        if shape is None:
            print("mlplab: no samples figure: the data has no image_shape", file=sys.stderr)
            return
        if (split := _split(trainer, "train", "samples")) is None:
            return
        from matplotlib.figure import Figure

        x, y = split
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))[: self.n]
        names = _class_names(trainer.datamodule, int(y.max()) + 1)
        side = math.ceil(math.sqrt(len(pick)))
        figure = Figure(figsize=(1.3 * side, 1.5 * side), layout="constrained")
        for ax, i in zip(figure.subplots(side, side).flat, pick.tolist(), strict=False):
            image = x[i].reshape(shape)  # (H, W), or (C, H, W) for colour
            if image.ndim == 3:
                image = image.permute(1, 2, 0).squeeze(2)
            ax.imshow(image.numpy(), cmap="gray_r" if image.ndim == 2 else None)
            ax.set_title(names[int(y[i])], fontsize=9)
        for ax in figure.axes:
            ax.set_axis_off()
        _log(logger, figure, "samples")


class LearningCurves(Callback):
    """Train and validation curves, one panel per metric, read back from the run. Metrics are
    logged at the optimiser step; the x-axis counts epochs from 0 as the metrics and checkpoint
    names do (the end of the first epoch is epoch 0), so validations within an epoch fall
    between its ticks. Counts (`val/samples`) are no curve and get no panel."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = _mlflow(trainer)
        if logger is None:
            return
        from matplotlib.figure import Figure

        # read back from the store, or while the server is away, what this job logged
        histories = logger.experiment.metric_histories(("train/", "val/"))
        panels = sorted({k.split("/", 1)[1] for k in histories} - {"samples"})
        if not panels:
            return
        first = histories.get(f"train/{panels[0]}", [])
        steps_per_epoch = (first[0][0] or 1) if first else 1
        figure = Figure(figsize=(5 * len(panels), 3.8), layout="constrained")
        for ax, metric in zip(
            figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
        ):
            for stage in ("train", "val"):
                history = histories.get(f"{stage}/{metric}")
                if history:
                    epochs = [step / steps_per_epoch - 1 for step, _ in history]
                    ax.plot(epochs, [value for _, value in history], marker=".", label=stage)
            ax.set(xlabel="epoch", ylabel=metric, title=metric)
            ax.grid(alpha=0.3)
            ax.legend()
        _log(logger, figure, "learning_curves")


class ConfusionMatrix(Callback):
    """The confusion matrix of the tested model on the test split (seed 003)."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = _mlflow(trainer)
        datamodule = trainer.datamodule
        if logger is None:
            return
        if not hasattr(pl_module, "num_classes"):
            print("mlplab: no confusion_matrix figure: the model is no classifier (num_classes)",
                  file=sys.stderr)  # fmt: skip
            return
        if (split := _split(trainer, "test", "confusion_matrix")) is None:
            return
        from matplotlib.figure import Figure
        from sklearn.metrics import ConfusionMatrixDisplay

        x, y = split
        training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logits = torch.cat([pl_module(b.to(pl_module.device)) for b in x.split(4096)])
        pl_module.train(training)
        outputs = pl_module.output(logits)  # one unit: above 0.5; several: the largest
        binary = outputs.shape[1] == 1
        predicted = (outputs.squeeze(1) > 0.5).long() if binary else outputs.argmax(1)
        names = _class_names(datamodule, pl_module.num_classes)
        figure = Figure(
            figsize=(1.0 + 0.6 * len(names), 0.6 + 0.6 * len(names)), layout="constrained"
        )
        ax = figure.subplots()
        ConfusionMatrixDisplay.from_predictions(
            y.numpy(), predicted.cpu().numpy(), labels=list(range(len(names))),
            display_labels=names, ax=ax, colorbar=False, xticks_rotation=45,
        )  # fmt: skip
        ax.set_title("test split")
        _log(logger, figure, "confusion_matrix")


class DecisionBoundary(Callback):
    """The trained model's decision regions over the training points, for 2-D inputs (seeds
    000, 001): the 0.5 contour of a binary output, or the arg-max class."""

    def __init__(self, resolution: int = 200, margin: float = 0.5) -> None:
        self.resolution, self.margin = resolution, margin

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = _mlflow(trainer)
        if logger is None:
            return
        if getattr(trainer.datamodule, "num_features", None) != 2:
            print("mlplab: no decision_boundary figure: the inputs are not 2-D points",
                  file=sys.stderr)  # fmt: skip
            return
        if (split := _split(trainer, "train", "decision_boundary")) is None:
            return
        from matplotlib.figure import Figure

        x, y = split
        lo, hi = x.min(0).values - self.margin, x.max(0).values + self.margin
        g0, g1 = torch.meshgrid(
            torch.linspace(lo[0], hi[0], self.resolution),
            torch.linspace(lo[1], hi[1], self.resolution),
            indexing="xy",
        )
        grid = torch.stack([g0.flatten(), g1.flatten()], dim=1)  # (R*R, 2)
        module = working_inference_module(pl_module, grid[:2])  # a copy: raw inputs, outputs
        with torch.no_grad():
            out = module(grid)
        figure = Figure(figsize=(5.5, 4.5), layout="constrained")
        ax = figure.subplots()
        if out.shape[1] == 1:  # binary: the output's 0.5 level is the boundary
            z = out[:, 0].reshape(g0.shape)
            mesh = ax.contourf(g0, g1, z, levels=20, cmap="RdYlGn", alpha=0.6)
            ax.contour(g0, g1, z, levels=[0.5], colors="k")
            figure.colorbar(mesh, ax=ax, label="output")
        else:
            ax.contourf(g0, g1, out.argmax(1).reshape(g0.shape), cmap="tab10", alpha=0.4)
        ax.scatter(
            x[:, 0],
            x[:, 1],
            c=y,
            cmap="RdYlGn" if out.shape[1] == 1 else "tab10",
            edgecolors="k",
            s=25,
        )
        ax.set(xlabel="x1", ylabel="x2", title="decision boundary")
        _log(logger, figure, "decision_boundary")
