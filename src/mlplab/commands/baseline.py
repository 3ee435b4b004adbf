"""`mlplab baseline --config configs/baselines/NAME.yaml`: a scikit-learn model on an mlplab
datamodule, logged to the network's MLflow experiment under the same metric names.

The YAML names the experiment, the datamodule (as in the network's config) and the estimator
(any scikit-learn class by `class_path`). Features are standardised on the training split when
the datamodule says `standardize: true`. Classifiers report `*/acc` (and `*/loss`, the log loss,
when they give probabilities); regressors `*/mae`, `*/rmse`, `*/r2`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser
from sklearn.base import BaseEstimator, is_classifier, is_regressor

from mlplab.data.base import ArrayDataModule
from mlplab.errors import UserError, parse_cause, say_mistake
from mlplab.tracking import provenance
from mlplab.tracking.logger import flatten_config
from mlplab.tracking.store import ensure_experiment, local_store_root, open_store, store_lock


def scores(estimator, x: np.ndarray, y: np.ndarray, stage: str) -> dict[str, float]:
    from sklearn import metrics

    if is_classifier(estimator):
        result = {f"{stage}/acc": metrics.accuracy_score(y, estimator.predict(x))}
        if hasattr(estimator, "predict_proba"):
            probabilities = estimator.predict_proba(x)
            result[f"{stage}/loss"] = metrics.log_loss(y, probabilities, labels=estimator.classes_)
        return result
    predicted = estimator.predict(x)
    return {
        f"{stage}/mae": metrics.mean_absolute_error(y, predicted),
        f"{stage}/rmse": metrics.root_mean_squared_error(y, predicted),
        f"{stage}/r2": metrics.r2_score(y, predicted),
    }


def class_count(data) -> int | None:
    """How many classes the data has (None: its target is a value)."""
    try:
        return getattr(data, "num_classes", None)
    except AttributeError:  # a table with a regression target
        return None


def run_baseline(config, argv: list[str] | None = None) -> tuple[str, dict[str, float]]:
    """Fit, score and log the estimator; `argv`: the command line, for the run's provenance."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    init = parser().instantiate_classes(config)
    data: ArrayDataModule = init.data
    data.setup()
    splits = {k: (x.flatten(1).numpy(), y.numpy()) for k, (x, y, *_) in data.data.items()}
    # a single regression target as a 1-D vector, as scikit-learn expects
    splits = {k: (x, y.ravel() if y.ndim > 1 and y.shape[1] == 1 else y)
              for k, (x, y) in splits.items()}  # fmt: skip
    estimator = init.estimator
    classes = class_count(data)
    if classes and is_regressor(estimator):  # scikit-learn would fit the class codes as values
        raise UserError(
            f"{type(estimator).__name__} is a regressor, but {type(data).__name__} has "
            f"{classes} classes; choose a classifier (e.g. sklearn.linear_model."
            "LogisticRegression) or data whose target is a value"
        )
    model = make_pipeline(StandardScaler(), estimator) if data.standardize else estimator
    model.fit(*splits["train"])
    results = {}
    for stage, (x, y) in splits.items():
        results.update(scores(model, x, y, stage))

    uri = open_store(config.tracking_uri)
    with store_lock(local_store_root(uri)):
        mlflow.set_tracking_uri(uri)
        ensure_experiment(mlflow.MlflowClient(uri), config.experiment_name, uri)
        mlflow.set_experiment(config.experiment_name)
    params = flatten_config(config.clone().as_dict())
    for key in ("config", "experiment_name", "run_name", "tracking_uri"):
        params.pop(key, None)
    params["model"] = params.pop("estimator")  # the column the networks fill with their task
    args = list(argv or [])
    configs = [str(path) for path in config.get("config") or []]
    tags = {**provenance.tags("baseline", args, configs), "mlplab.command": "baseline"}
    # named by its config (`digits_logreg 3f2a`): it shares the network's experiment
    named = Path(configs[0]).stem if configs else config.experiment_name
    name = config.run_name or provenance.run_name(named, args)
    with mlflow.start_run(run_name=name, tags=tags) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        mlflow.log_metrics(results)
        example = splits["train"][0][:5].astype(np.float32)
        mlflow.sklearn.log_model(
            model, name="model", input_example=example,
            signature=infer_signature(example, model.predict(example)),
        )  # fmt: skip
    return run.info.run_id, results


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="mlplab baseline", description=__doc__, exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--experiment_name", type=str, required=True, help="the network's experiment")
    p.add_argument("--run_name", type=str | None, default=None)
    p.add_argument("--tracking_uri", type=str | None, default=None)
    p.add_subclass_arguments(ArrayDataModule, "data", required=True)
    p.add_subclass_arguments(BaseEstimator, "estimator", required=True)
    return p


def main(argv: list[str]) -> None:
    try:
        config = parser().parse_args(argv)
    except ArgumentError as err:  # jsonargparse's report as one line, not the usage block
        print(say_mistake("mlplab baseline", parse_cause(str(err))), end="", file=sys.stderr)
        sys.exit(2)
    try:
        run_id, results = run_baseline(config, argv)
    except (UserError, ValueError) as err:
        print(f"mlplab baseline: error: {err}", file=sys.stderr)
        sys.exit(2)
    print("mlplab: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
    print(f"mlplab: run {run_id} ({config.experiment_name}), model runs:/{run_id}/model")
