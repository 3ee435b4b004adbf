"""A stacked trial as its own MLflow run (`mlplab.speed.stacked`), written whole when its stack
has trained: one create, its params, metrics and tags in batches, its datasets and config, its
status. A hundred trials cost the store a few writes each, not one per epoch."""

from __future__ import annotations

import time

from mlflow.entities import Metric, Param

from mlplab.tracking import provenance
from mlplab.tracking.logger import given_settings, run_params, shapes
from mlplab.tracking.store import redact_uri


def write(
    client, experiment_id: str, trial, record, name: str, tags: dict, inputs=(),
    status: str = "FINISHED", experiment: str = "", uri: str = "",
) -> str:
    """The run of `trial` (a `mlplab.speed.stacked.Trial`) with its `record`, ended with
    `status` (a pruned search trial's is KILLED); its id. With the `experiment`'s name and the
    store's `uri`, a trial that did not fail gets its checkpoints (`log_checkpoints`)."""
    configs = [str(path) for path in trial.config.get("config") or []]
    tags = {**provenance.tags("fit", trial.args, configs), "mlplab.command": "fit", **tags}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    try:
        text = config_text(trial)
        fill(client, run_id, trial, record, inputs, text)
        if experiment and not record.failure and record.epochs:
            log_checkpoints(client, run_id, trial, record, experiment, uri, text)
    except BaseException as err:  # never left RUNNING
        client.set_terminated(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(run_id, status)
    return run_id


def fill(client, run_id: str, trial, record, inputs, text: str) -> None:
    """The run's params, metrics, datasets and config (`text`, its dump)."""
    params, _ = run_params(trial.parser, trial.config, given_settings(trial.args))
    params.update({"trainer.world_size": 1, "trainer.nodes_used": 1, **shapes(trial.datamodule)})
    listed = [Param(k, str(v)[:250]) for k, v in params.items()]  # as Lightning's logger cuts
    now = int(time.time() * 1000)
    logged = {(key, step): value for key, value, step in record.metrics}  # `epoch` once a step
    metrics = [Metric(key, value, now, step) for (key, step), value in logged.items()]
    client.log_batch(run_id, metrics=metrics, params=listed)  # MLflow splits it at its limits
    if inputs:
        client.log_inputs(run_id, datasets=list(inputs))
    client.log_text(run_id, text, "config.yaml")


def config_text(trial) -> str:
    """The trial's config as its fit saves it (a password in the store's URI left out)."""
    config = trial.config.clone()
    if config.get("tracking_uri"):
        config.tracking_uri = redact_uri(config.tracking_uri)
    # checked when it was parsed: jsonargparse's validation is most of a dump's 0.2 s
    return trial.parser.dump(config, skip_none=False, skip_validation=True)


def log_checkpoints(
    client, run_id: str, trial, record, experiment: str, uri: str, text: str
) -> None:
    """The trial's `last.ckpt` (it resumes alone) and best weights' checkpoint, in the run's
    folder and among its artifacts (`checkpoints/`), as a fit keeps them."""
    from mlplab.speed import stacked_checkpoints
    from mlplab.tracking.store import experiment_dir

    directory = experiment_dir(experiment, uri) / run_id / "checkpoints"
    for path in stacked_checkpoints.write(trial, record, run_id, directory, text):
        client.log_artifact(run_id, str(path), "checkpoints")


def log_model(run_id: str, trial, record, experiment: str, uri: str) -> str | None:
    """The trial's logged model, in its run, from its tested (best) weights at their step: what
    a fit logs (`mlplab.tracking.logged_models.log_model`), without the checkpoint files."""
    from mlplab.tracking.logged_models import log_model as log_fit_model
    from mlplab.tracking.logger import MLflowRunLogger

    state = trial.module.state_dict()
    state.update(record.weights)
    trial.module.load_state_dict(state)
    logger = MLflowRunLogger(experiment_name=experiment, tracking_uri=uri, run_id=run_id)
    try:
        model = log_fit_model(logger, trial.module, trial.datamodule, record.best_step)
    except BaseException as err:
        logger.finish(err)
        raise
    logger.finish()
    return model
