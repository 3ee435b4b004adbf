"""`mlplab search`: an Optuna study of `mlplab fit` runs, pruned, resumable, one MLflow parent.

    mlplab search --config configs/moons.yaml --space configs/searches/moons_space.yaml \
        --metric val/acc --n_trials 20
    mlplab search configs/searches/mnist_optimizers.yaml [--workers 2] [--trainer.max_epochs 5]

A search file holds the options (config, space, metric, ...); a sweep file may carry them in a
`search:` section.

The space is keyed by the CLI's dotted names (see `mlplab.commands.search.space`). Each trial is a
fit with the trial's values as overrides, an MLflow child run of the search's parent run; Optuna's
pruner stops a trial at a validation (its run ends KILLED, tagged `optuna.state` PRUNED).
Trial 0 is the config as written. Options `mlplab search` does not know (`--trainer.max_epochs
5`) go to every trial's fit. Running the same command again continues the study and the
parent run up to `--n_trials` results; a trial lost to a kill or Ctrl-C runs again. The parent
gets the best trial's values (tags `best.<key>`), its metrics (`best/...`), what the trials
spent (`trials/...`), and Optuna's figures.
"""

from mlplab.commands.search.command import main

__all__ = ["main"]
