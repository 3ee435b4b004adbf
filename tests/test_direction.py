"""Which way a metric is better (`mlplab.direction`): the rule, and the checkpoint, sweep and
search that follow it unless told otherwise."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import config, experiment_runs
from mlplab.commands.search.command import settings
from mlplab.direction import better
from mlplab.main import main
from mlplab.safety.checkpoints import Checkpoint
from my_project.models import Classifier, Regressor


@pytest.mark.parametrize(
    "metric, mode",
    [("val/loss", "min"), ("val/mae", "min"), ("test/rmse", "min"), ("train/loss_epoch", "min"),
     ("val/error_rate", "min"), ("best/val/mae", "min"), ("val_loss", "min"),
     ("val/acc", "max"), ("val/f1", "max"), ("val/r2", "max"), ("val/auroc", "max")],
)  # fmt: skip
def test_lower_is_better_for_losses_and_errors_only(metric, mode):
    assert better(metric) == mode


def test_the_rule_agrees_with_torchmetrics_for_what_the_tasks_log():
    tasks = [Classifier(torch.nn.Linear(2, 1), num_features=2, num_classes=2),
             Classifier(torch.nn.Linear(2, 3), num_features=2, num_classes=3),
             Regressor(torch.nn.Linear(3, 1), num_features=3)]  # fmt: skip
    logged = {name: metric for task in tasks for name, metric in task.val_metrics.items()}
    assert set(logged) == {"val/acc", "val/mae", "val/rmse", "val/r2"}
    for name, metric in logged.items():
        assert better(name) == ("max" if metric.higher_is_better else "min"), name


def test_a_checkpoint_mode_left_unset_follows_the_monitor_and_a_given_one_wins():
    assert Checkpoint(monitor="val/acc").mode == "max"
    assert Checkpoint(monitor="val/mae").mode == "min"
    assert Checkpoint(monitor="val/acc", mode="min").mode == "min"


@pytest.mark.parametrize("given, pick", [(None, max), ("min", min)])
def test_fit_keeps_the_checkpoint_best_by_the_monitored_metric(store, given, pick):
    mode = [] if given is None else ["--checkpoint.mode", given]
    main(["fit", "--config", config("digits"), "--trainer.max_epochs", "3",
          "--checkpoint.monitor", "val/acc", *mode, "--log_system_metrics", "false"])  # fmt: skip
    client, (run,) = experiment_runs(store, "digits")
    accuracies = [m.value for m in client.get_metric_history(run.info.run_id, "val/acc")]
    assert len(accuracies) == 3 and len(set(accuracies)) > 1
    last = torch.load(f"mlruns/digits/{run.info.run_id}/checkpoints/last.ckpt",
                      map_location="cpu", weights_only=True)  # fmt: skip
    (state,) = [s for s in last["callbacks"].values() if "best_model_score" in s]
    assert state["best_model_score"].item() == pytest.approx(pick(accuracies))


def test_sweep_by_an_error_picks_the_lowest(store):
    main(["sweep", "--config", config("iris_regression"), "--grid", "model.lr=[0.0001,0.01]",
          "--metric", "val/mae", "--trainer.max_epochs=2"])  # fmt: skip
    _, found = experiment_runs(store, "iris_regression")
    (parent,) = [r for r in found if r.data.tags.get("mlplab.command") == "sweep"]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId")]
    maes = sorted(r.data.metrics["val/mae"] for r in children)
    assert len(maes) == 2 and maes[0] < maes[1]
    best = min(children, key=lambda r: r.data.metrics["val/mae"])
    assert parent.data.tags["mlplab.best_child"] == best.info.run_id


@pytest.mark.parametrize("metric, given, direction",
                         [("val/mae", [], "minimize"), ("val/acc", [], "maximize"),
                          ("val/mae", ["--direction", "maximize"], "maximize")])  # fmt: skip
def test_search_directs_the_study_by_the_rule_unless_told(tmp_path, metric, given, direction):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"model.lr": {"low": 1.0e-4, "high": 0.1, "log": True}}))
    argv = ["--config", config("iris_regression"), "--space", str(space), "--metric", metric]
    setup, _ = settings([*argv, *given])
    assert setup.direction == direction
