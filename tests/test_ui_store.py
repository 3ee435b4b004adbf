"""What `make ui-check` asserts in a browser, through MLflow's client API: a store made by real
`mlplab fit` and `mlplab sweep` commands holds nothing a user would trip over, and the check
names each problem planted in a copy of it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import LoggedModelOutput

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ui_store", ROOT / "scripts" / "ui" / "store.py")
store = importlib.util.module_from_spec(spec)
spec.loader.exec_module(store)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One xor fit and a 2-point learning-rate sweep, 6 epochs each."""
    folder = tmp_path_factory.mktemp("ui")
    fit = ["--config", "configs/xor.yaml", "--trainer.max_epochs", "6"]
    return folder, store.build(folder, fits=[fit], sweep=["configs/xor.yaml",
                                                           "model.lr=[0.02,0.1]", "6"])


def test_a_store_of_real_commands_has_nothing_to_trip_over(made):
    _, uri = made
    client = mlflow.MlflowClient(uri)
    runs = store.runs(client)
    assert len(runs) == 4  # the fit, the sweep parent and its two children
    assert store.problems(uri) == []
    # the experiment opens on its runs in the UI, not on the GenAI overview
    experiment = client.get_experiment(runs[0].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_each_planted_problem_is_named(made, tmp_path):
    folder, _ = made
    shutil.copy(folder / "mlflow.db", tmp_path / "mlflow.db")
    uri = store.store_uri(tmp_path)
    client = mlflow.MlflowClient(uri)
    runs = store.runs(client)
    parent = next(r for r in runs if "mlplab.best_child_name" in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    fit = next(r for r in runs if r not in children and r is not parent)
    name = fit.info.run_name

    client.log_param(fit.info.run_id, "tracking_uri", uri)
    client.delete_tag(fit.info.run_id, "mlflow.source.git.commit")
    client.log_metric(fit.info.run_id, "test/acc", 0.5, step=0)
    empty = client.create_logged_model(fit.info.experiment_id, name="last")
    client.log_outputs(children[0].info.run_id, [LoggedModelOutput(empty.model_id, 0)])
    client.set_tag(parent.info.run_id, "mlplab.best_child_name", "lr=0.5")
    client.log_param(children[1].info.run_id, "data.batch_size_guess", "4")

    found = "\n".join(store.problems(uri))
    assert f"run {name}: param tracking_uri is bookkeeping" in found
    assert f"run {name}: param tracking_uri holds the store's path" in found
    assert f"run {name}: no mlflow.source.git.commit tag" in found
    assert f"run {name}: test/acc at steps [0, " in found
    assert f"run {children[0].info.run_name}: 2 logged models" in found
    assert f"sweep {parent.info.run_name}: its best child 'lr=0.5' is none of its children" in found
    assert "differ in ['data.batch_size_guess'], not only in the grid's ['model.lr']" in found
    assert len(found.splitlines()) == 7, found
