"""The Lightning side of a search trial: report the searched metric to Optuna after each
validation and stop the fit when the pruner says so.

`optuna_integration.PyTorchLightningPruningCallback` does the reporting too, but stops a
pruned fit with `trainer.should_stop`: the fit would then end as a success (tested, logged as
a model, FINISHED). Raising `Pruned` instead ends it at once, and the run KILLED
(`mlplab.tracking.logger.RunStatus`), which is what a pruned trial is.
"""

from __future__ import annotations

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger

from mlplab.errors import RunKilled, UserError


class Pruned(RunKilled, optuna.TrialPruned):
    """Optuna pruned the trial: its fit ends, its run KILLED, its trial PRUNED."""


class MetricNotLogged(UserError):
    """The model does not log the search's metric: every trial would fail alike."""


class PruneTrial(Callback):
    """Report `metric` to `trial` at every validation (the step is the validation's number, so
    trials with other batch sizes still compare at the same point), and prune."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.value: float | None = None  # the last validation's: the trial's result
        self.validations = 0
        self.epochs = 0  # training epochs the trial spent
        self.run_id: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(trainer.logger, MLFlowLogger):
            self.run_id = trainer.logger.run_id
            self.trial.set_user_attr("mlflow.run_id", self.run_id)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epochs = trainer.current_epoch + 1

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
            raise MetricNotLogged(
                f"the search's metric {self.metric} is not logged; the model logs "
                f"{', '.join(logged) or 'no val/ metric'}"
            )
        self.value = float(value)
        self.epochs = max(self.epochs, trainer.current_epoch + 1)
        self.trial.report(self.value, self.validations)
        self.validations += 1
        if self.trial.should_prune():
            raise Pruned(
                f"pruned by Optuna after epoch {trainer.current_epoch} "
                f"({self.metric} {self.value:.4f})"
            )
