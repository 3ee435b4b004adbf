"""What a search leaves in its parent run: the best trial, what the trials spent, the study's
figures, and (when asked) the best model in the registry."""

from __future__ import annotations

import json
import warnings

import optuna
from optuna.trial import TrialState

from mlplab.commands.search.study import Search, counted, say

FIGURES = {
    "optimization_history": "plot_optimization_history",
    "intermediate_values": "plot_intermediate_values",  # where pruning cut trials short
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
}


def record_outcome(search: Search, study: optuna.Study) -> bool:
    """Whether any trial completed."""
    client, parent, setup = search.client, search.parent, search.setup
    trials = [t for t in study.get_trials(deepcopy=False) if counted(t)]
    by_state = {state: sum(t.state == state for t in trials) for state in TrialState}
    epochs = sum(t.user_attrs.get("mlplab.epochs", 0) for t in trials)
    step = len(trials)
    for name, value in (
        ("trials/complete", by_state[TrialState.COMPLETE]),
        ("trials/pruned", by_state[TrialState.PRUNED]),
        ("trials/failed", by_state[TrialState.FAIL]),
        ("trials/epochs", epochs),
    ):
        client.log_metric(parent, name, value, step=step)
    client.set_tag(parent, "search.n_trials", str(setup.n_trials))
    summary = (
        f"{len(trials)} trials ({by_state[TrialState.COMPLETE]} complete, "
        f"{by_state[TrialState.PRUNED]} pruned, {by_state[TrialState.FAIL]} failed), "
        f"{epochs} epochs"
    )
    if by_state[TrialState.COMPLETE]:
        best = study.best_trial
        run_id = best.user_attrs.get("mlflow.run_id")  # None: the trials ran with no logger
        client.set_tag(parent, "optuna.best_trial", str(best.number))
        for key, value in best.params.items():
            client.set_tag(
                parent, f"best.{key}", value if isinstance(value, str) else json.dumps(value)
            )
        client.log_metric(parent, f"best/{setup.metric}", best.value, step=step)
        if run_id is not None:
            child = client.get_run(run_id)
            client.set_tag(parent, "mlplab.best_child", run_id)
            client.set_tag(parent, "mlplab.best_child_name", child.info.run_name)  # as listed
            for name, value in child.data.metrics.items():
                if "/" in name and name != setup.metric and not name.startswith("system/"):
                    client.log_metric(parent, f"best/{name}", value, step=step)
        say(f"search {setup.name}: {summary}; best trial {best.number} (run {run_id}): "
            f"{setup.metric} {best.value:.4f} with {best.params}")  # fmt: skip
        log_figures(search, study)
        if setup.register_model and run_id is not None:
            register_best(search, run_id)
    else:
        say(f"search {setup.name}: {summary}; no trial completed")
    failed = bool(trials) and by_state[TrialState.FAIL] == len(trials)
    client.set_terminated(parent, "FAILED" if failed else "FINISHED")
    return bool(by_state[TrialState.COMPLETE])


def register_best(search: Search, run_id: str) -> None:
    """The best trial's model in the registry, unless the alias already points at it (a
    finished search run again)."""
    from mlflow.exceptions import MlflowException

    from mlplab.tracking.logged_models import register_model

    name, alias = search.setup.register_model, search.setup.register_alias
    try:
        if alias and search.client.get_model_version_by_alias(name, alias).run_id == run_id:
            return
    except MlflowException:  # no such model or alias yet
        pass
    register_model(f"runs:/{run_id}/model", name, search.uri, alias)


def log_figures(search: Search, study: optuna.Study) -> None:
    """Optuna's own plots of the study, as PNGs under the parent's `figures/`."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    for name, function in FIGURES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna calls its matplotlib plots experimental
            try:
                axes = getattr(plots, function)(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # too few trials
                say(f"no {name} figure: {err}")
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(9, 5.5)
        figure.tight_layout()
        search.client.log_figure(search.parent, figure, f"figures/{name}.png")
        plt.close(figure)
