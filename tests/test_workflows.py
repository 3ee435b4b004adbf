"""After single runs: sweeps (parent and children, resumed), the runs table, the registry."""

from __future__ import annotations

import csv
import io
import json
import os

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import ROOT, config, experiment_runs, run_in_store, run_mlplab, store_uri
from mlplab.commands.sweep import POINT_TAG
from mlplab.main import main

XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
SWEEP = ["sweep", "--config", config("xor"), "--grid", "model.lr=[0.02,0.05,0.02]",
         "model.net.hidden_sizes=[[4,4],[8]]", "--metric", "val/loss", "--workers", "2",
         "--register_model", "xor-sweep-best", "--trainer.max_epochs=30"]  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    return store_uri(tmp), tmp, run_in_store(tmp, *SWEEP)


def test_sweep_is_a_parent_with_a_child_per_point(sweep):
    uri, _, done = sweep
    assert "mlplab: sweep: model.lr=0.02 given twice in the grid; trained once" in done.stderr
    _, found = experiment_runs(uri, "xor")
    parents = [r for r in found if r.data.tags.get("mlplab.command") == "sweep"]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId")]
    (parent,) = parents
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    points = {json.loads(r.data.tags[POINT_TAG])["model.lr"] for r in children}
    assert points == {0.02, 0.05}
    assert {r.data.params["model.lr"] for r in children} == {"0.02", "0.05"}
    assert {r.data.params["model.net.hidden_sizes"] for r in children} == {"[4, 4]", "[8]"}
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["sweep.grid.model.lr"]) == [0.02, 0.05]
    # where parent and children come from, as MLflow's UI shows it; no bookkeeping params
    commit = parent.data.tags["mlflow.source.git.commit"]
    assert len(commit) == 40 and parent.data.tags["mlflow.source.name"] == "mlplab sweep"
    assert "--grid" in parent.data.tags["mlplab.command_line"]
    for child in children:
        assert child.data.tags["mlflow.source.git.commit"] == commit
        assert child.data.tags["mlflow.source.name"] == "mlplab fit"
        assert not {"run_name", "tracking_uri"} & child.data.params.keys()
    best = min(children, key=lambda r: r.data.metrics["val/loss"])
    assert parent.data.tags["mlplab.best_child"] == best.info.run_id
    assert parent.data.tags["mlplab.best_child_name"] == best.info.run_name  # as the UI lists it
    assert parent.data.metrics["best/val/loss"] == best.data.metrics["val/loss"]
    registered = MlflowClient(uri).get_model_version("xor-sweep-best", "1")
    assert registered.run_id == best.info.run_id


def test_rerunning_a_sweep_skips_finished_children(sweep):
    uri, tmp, _ = sweep
    client, found = experiment_runs(uri, "xor")
    victim = next(r for r in found if r.data.tags.get("mlflow.parentRunId"))
    client.set_terminated(victim.info.run_id, "FAILED")  # as if that child had died
    again = run_mlplab(*SWEEP, cwd=tmp, env={"MLFLOW_TRACKING_URI": uri})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 to run, 3 finished before" in again.stderr
    _, found = experiment_runs(uri, "xor")
    assert len([r for r in found if r.data.tags.get("mlplab.command") == "sweep"]) == 1
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 5  # the failed attempt stays, beside its rerun
    redone = [r for r in children if r.data.tags[POINT_TAG] == victim.data.tags[POINT_TAG]]
    assert sorted(r.info.status for r in redone) == ["FAILED", "FINISHED"]


def test_runs_table_lists_the_sweep_sorted_with_varying_params(sweep, capsys, monkeypatch):
    uri, _, _ = sweep
    main(["runs", "--experiment", "xor", "--tracking_uri", uri, "--sort", "val/loss",
          "--format", "csv"])  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    header = list(rows[0])
    assert header[:4] == ["name", "run_id", "status", "duration_s"]
    assert {"model.lr", "model.net.hidden_sizes", "val/loss", "val/acc", "test/acc"} <= set(header)
    assert "trainer.max_epochs" not in header  # the same for every run: not worth a column
    losses = [float(row["val/loss"]) for row in rows if row["val/loss"]]
    assert losses == sorted(losses) and len(losses) >= 4
    main(["runs", "--experiment", "xor", "--tracking_uri", uri, "--format", "markdown"])
    markdown = capsys.readouterr().out.splitlines()
    assert markdown[0].startswith("| name | run_id |") and markdown[1].startswith("|---|")


def test_runs_names_a_missing_experiment(sweep, capsys):
    uri, _, _ = sweep
    with pytest.raises(SystemExit) as done:
        main(["runs", "--experiment", "nope", "--tracking_uri", uri])
    assert done.value.code == 2
    assert "no experiment 'nope' in the store (it has: " in capsys.readouterr().err


def test_register_model_then_load_it_from_the_registry(store):
    main(["fit", "--config", config("xor"), "--register_model", "xor-net"])
    model = mlflow.pyfunc.load_model("models:/xor-net/1")
    assert (model.predict(XOR).ravel() > 0.5).tolist() == [False, True, True, False]
    version = MlflowClient().get_model_version("xor-net", "1")
    assert version.run_id


def test_seed_optimizer_sweep_file_names_its_grid():
    from mlplab.commands.sweep import load_sweep_file, points

    spec = load_sweep_file(str(ROOT / "configs" / "sweeps" / "mnist_optimizers.yaml"))
    assert len(points(spec["grid"])) == 7 and spec["metric"] == "test/acc"


def test_baselines_land_beside_the_networks_under_the_same_names(store, capsys):
    main(["fit", "--config", config("digits"), "--trainer.max_epochs", "3",
          "--run_name", "network"])  # fmt: skip
    main(["baseline", "--config", str(ROOT / "configs" / "baselines" / "digits_logreg.yaml")])
    client, found = experiment_runs(store, "digits")
    runs = {r.info.run_name: r for r in found}
    network, baseline = runs["network"], runs["logistic-regression"]
    assert baseline.data.tags["mlplab.command"] == "baseline"
    # where it comes from, as a fit records it
    assert baseline.data.tags["mlflow.source.name"] == "mlplab baseline"
    assert baseline.data.tags["mlplab.configs"].endswith("digits_logreg.yaml")
    assert baseline.data.tags["mlflow.source.git.commit"] == network.data.tags[
        "mlflow.source.git.commit"]  # fmt: skip
    assert baseline.data.params["model"] == "sklearn.linear_model.LogisticRegression"
    assert set(baseline.data.metrics) <= set(network.data.metrics)  # same names, comparable
    assert 1 - baseline.data.metrics["val/acc"] <= 0.08  # seed 000: held-out error 0.074
    model = mlflow.pyfunc.load_model(f"runs:/{baseline.info.run_id}/model")
    images = np.random.default_rng(0).uniform(0, 16, (3, 64)).astype(np.float32)
    assert model.predict(images).shape == (3,)
    capsys.readouterr()
    main(["runs", "--experiment", "digits", "--format", "csv"])
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {row["name"] for row in table} == {"network", "logistic-regression"}
    assert all(row["val/acc"] for row in table)


def test_perceptron_baseline_has_accuracy_but_no_loss(store):
    main(["baseline", "--config", str(ROOT / "configs" / "baselines" / "iris_perceptron.yaml")])
    _, (run,) = experiment_runs(store, "iris_classification")
    assert run.data.metrics["val/acc"] >= 0.8
    assert "val/loss" not in run.data.metrics  # a perceptron gives no probabilities


def test_a_regressor_on_class_targets_is_refused_before_a_run(store, capsys):
    """The converse of a classifier on values: R2 of class codes would be a FINISHED lie."""
    with pytest.raises(SystemExit) as done:
        main(["baseline", "--config", str(ROOT / "configs" / "baselines" / "iris_perceptron.yaml"),
              "--estimator", "sklearn.linear_model.LinearRegression"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1, err
    assert "LinearRegression is a regressor, but IrisClassificationDataModule has 3 classes; " \
        "choose a classifier" in err[0]  # fmt: skip
    assert experiment_runs(store, "iris_classification")[1] == []


def test_registered_model_is_served_over_http(tmp_path):
    """`mlflow models serve -m models:/NAME/1` on loopback answers a real POST."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    uri = store_uri(tmp_path)
    run_in_store(tmp_path, "fit", "--config", config("xor"), "--register_model", "xor-served")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bin_dir = str(os.path.dirname(sys.executable))
    server = subprocess.Popen(
        [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", "models:/xor-served/1",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as ping:
                    if ping.status == 200:
                        break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "server not up"
                time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": XOR.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = np.array(json.load(response)["predictions"]).ravel()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert (predictions > 0.5).tolist() == [False, True, True, False]


@pytest.mark.parametrize("name", ["xor", "mnist_batchnorm"])
def test_onnx_export_matches_the_checkpoint(name, tmp_path, capsys):
    """The exported graph (batch norm and standardisation included) runs in ONNX Runtime and
    gives the checkpoint's outputs."""
    from functools import partial

    import onnxruntime
    import torch
    from lightning.pytorch import Trainer

    from mlplab.safety.metadata import CheckpointMetadata
    from mlplab.serving import inference_module
    from my_project.models import MLP, Classifier

    net = partial(MLP, hidden_sizes=[32, 16], batch_norm=name != "xor",
                  input_batch_norm=name != "xor")  # fmt: skip
    task = Classifier(net, num_features=784 if name != "xor" else 2,
                      num_classes=10 if name != "xor" else 2, standardize=True)  # fmt: skip
    task.input_norm.mean.uniform_(0, 1)  # non-trivial statistics everywhere
    for module in task.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[CheckpointMetadata()])  # fmt: skip
    trainer.strategy.connect(task)
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    output = tmp_path / "onnx" / "model.onnx"  # a folder not there yet: made
    main(["export", "--model", str(checkpoint), "--output", str(output)])
    assert "ONNX Runtime matches the checkpoint" in capsys.readouterr().err
    session = onnxruntime.InferenceSession(str(output))
    x = np.random.default_rng(1).standard_normal((5, task.hparams.num_features), np.float32)
    expected = inference_module(task)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], expected,
                               atol=1e-5)  # fmt: skip


def test_an_output_where_nothing_may_be_written_is_one_line_first(tmp_path, monkeypatch, capsys):
    """Said before the checkpoint is even read (tests run as root, who may write anywhere:
    the permission is what `os.access` answers)."""
    from pathlib import Path

    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if Path(path) == locked and mode == os.W_OK else access(path, mode, **kw)))
    with pytest.raises(SystemExit) as done:
        main(["export", "--model", str(tmp_path / "none.ckpt"), "--output",
              str(locked / "m.onnx")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1, err
    assert f"cannot write {locked / 'm.onnx'}: no write permission there" in err[0]


def test_export_names_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["export", "--model", str(tmp_path / "none.ckpt"), "--output", "x.onnx"])
    assert done.value.code == 2 and "does not exist" in capsys.readouterr().err
