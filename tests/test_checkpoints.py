"""Checkpoints the Lightning way: a checkpoint rebuilds its task, network and data by itself."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import config, experiment_runs, fit_in_own_store, run_mlplab
from mlplab.main import main
from mlplab.safety.metadata import load_module
from my_project.models import MLP, Classifier


@pytest.fixture(scope="module")
def xor_checkpoint(tmp_path_factory):
    """A short XOR fit in its own store: (folder, the store's URI, its best checkpoint)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    uri = fit_in_own_store(tmp, "--config", config("xor"))
    return tmp, uri, next(tmp.glob("mlruns/xor/*/checkpoints/best-*.ckpt"))


def test_load_from_checkpoint_rebuilds_the_network(xor_checkpoint):
    _, _, best = xor_checkpoint
    task = Classifier.load_from_checkpoint(best, map_location="cpu")
    assert isinstance(task.net, MLP) and task.net[1].out_features == 4  # hidden_sizes [4, 4]
    generic = load_module(best)  # whichever task class wrote it
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    task.eval()
    with torch.no_grad():
        assert (task.output(task(x)).squeeze(1) > 0.5).long().tolist() == [0, 1, 1, 0]
        torch.testing.assert_close(generic(x), task(x))


@pytest.mark.parametrize("command, metric", [("validate", "val/acc"), ("test", "test/acc")])
def test_validate_and_test_need_only_the_checkpoint(xor_checkpoint, monkeypatch, command, metric):
    tmp, uri, best = xor_checkpoint
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp)
    main([command, "--ckpt_path", str(best)])
    _, runs = experiment_runs(uri, "xor")  # the experiment the checkpoint was trained in
    evaluated = [r for r in runs if r.data.tags.get("mlplab.command") == command]
    assert len(evaluated) == 1 and evaluated[0].data.metrics[metric] == 1.0


def test_predict_needs_only_the_checkpoint(xor_checkpoint, tmp_path, monkeypatch):
    _, uri, best = xor_checkpoint
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    main(["predict", "--ckpt_path", str(best)])
    predicted = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predicted.columns) == ["predicted", "prob_0", "prob_1"]
    assert predicted["predicted"].tolist() == [0, 1, 1, 0]
    assert ((predicted["prob_1"] > 0.5).astype(int) == predicted["predicted"]).all()


def test_a_config_that_does_not_fit_the_checkpoint_is_one_line(xor_checkpoint, tmp_path):
    _, uri, best = xor_checkpoint
    result = run_mlplab("test", "--config", config("digits"), "--ckpt_path", str(best),
                        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "belongs to another model" in result.stderr.strip().splitlines()[-1]


def test_a_checkpoint_without_a_config_asks_for_one(tmp_path):
    task = Classifier(torch.nn.Linear(2, 1), num_features=2, num_classes=2)
    path = Path(tmp_path / "bare.ckpt")
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": {}}, path)
    result = run_mlplab("test", "--ckpt_path", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "add --config" in result.stderr
    assert "Traceback" not in result.stderr
