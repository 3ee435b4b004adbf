"""On a CUDA device (`make gpu-check`): every accelerator path of a seed config, run as a user
runs it. Skipped, with the reason, where there is no CUDA device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from conftest import config, experiment_runs, real_data, run_mlplab, store_uri
from mlplab.errors import UserError
from mlplab.speed import cuda_graph
from mlplab.speed.fast_path import FastPath
from my_project.data import DigitsDataModule, MNISTDataModule
from my_project.models import MLP, Classifier
from test_cuda_graph import FROZEN, FreezeFirstLayer
from test_fast_path import FEATURES, assert_same_training, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: make gpu-check"),
]
needs_mnist = pytest.mark.skipif(not real_data(), reason="no MNIST files: set MLPLAB_DATA_DIR")
GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
CPU = ["--trainer.accelerator", "cpu"]
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # a machine without one, as far as torch can tell


def mnist_fit(folder: Path, *args: str, env: dict | None = None):
    """`mlplab fit --config configs/mnist.yaml ARGS` in `folder`'s own store: its one run."""
    folder.mkdir(parents=True, exist_ok=True)
    done = run_mlplab("fit", "--config", config("mnist"), "--trainer.enable_progress_bar",
                      "false", *args, cwd=folder,
                      env={"MLFLOW_TRACKING_URI": store_uri(folder), **(env or {})})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _, runs = experiment_runs(store_uri(folder), "mnist")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return runs[0]


def checkpoints(folder: Path, run) -> Path:
    return folder / "mlruns" / "mnist" / run.info.run_id / "checkpoints"


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> dict:
    """The seed config, seed 0, on the CPU and on the GPU with its data on the device and in
    pinned host memory (the default): (folder, run) by name."""
    runs = {}
    for name, args in {
        "cpu": CPU,
        "on device": [*GPU, "--data.on_device", "true"],
        "pinned": GPU,
    }.items():
        folder = tmp_path_factory.mktemp(name.replace(" ", "_"))
        runs[name] = folder, mnist_fit(folder, *args)
    return runs


@needs_mnist
@pytest.mark.parametrize("name", ["on device", "pinned"])
def test_a_gpu_fit_reaches_the_cpu_runs_test_accuracy(fits, name):
    cpu = fits["cpu"][1].data.metrics["test/acc"]
    assert cpu >= 0.905  # the seed's 0.912
    assert abs(fits[name][1].data.metrics["test/acc"] - cpu) <= 0.005
    assert fits[name][1].data.params["trainer.accelerator"] == "gpu"


@needs_mnist
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fits_train(fits, tmp_path, precision):
    run = mnist_fit(tmp_path, *GPU, "--trainer.precision", precision)
    metrics = run.data.metrics
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    assert metrics["test/acc"] >= fits["cpu"][1].data.metrics["test/acc"] - 0.01


@needs_mnist
def test_ddp_over_nccl_on_one_device_is_one_run(tmp_path):
    run = mnist_fit(tmp_path, *GPU, "--trainer.strategy", "ddp", "--trainer.max_epochs", "3")
    assert run.data.metrics["test/acc"] >= 0.84  # ~0.867 after 3 epochs on the CPU
    assert run.data.params.get("trainer.strategy") == "ddp"


@needs_mnist
@pytest.mark.parametrize("first, then", [("gpu", "cpu"), ("cpu", "gpu")])
def test_a_checkpoint_resumes_on_the_other_device(tmp_path, first, then):
    """A GPU's checkpoint resumes where there is no GPU, and a CPU's on the GPU."""
    devices = {"gpu": (GPU, {}), "cpu": (CPU, NO_GPU)}
    args, env = devices[first]
    mnist_fit(tmp_path, *args, "--trainer.max_epochs", "2", env=env)
    args, env = devices[then]
    run = mnist_fit(tmp_path, *args, "--trainer.max_epochs", "3", "--ckpt_path", "last", env=env)
    client, _ = experiment_runs(store_uri(tmp_path), "mnist")
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert sorted(set(epochs)) == [0, 1, 2]  # the same run, continued on the other device
    assert run.data.metrics["test/acc"] >= 0.85


@needs_mnist
def test_a_gpu_runs_logged_model_predicts_where_there_is_no_gpu(fits):
    folder, run = fits["on device"]
    code = (
        "import json, mlflow, numpy as np, torch; assert not torch.cuda.is_available(); "
        f"model = mlflow.pyfunc.load_model('runs:/{run.info.run_id}/model'); "
        "p = np.asarray(model.predict(np.random.rand(4, 784).astype(np.float32))); "
        "print(json.dumps([list(p.shape), float(p.sum(1).min())]))"
    )
    env = {**os.environ, **NO_GPU, "MLFLOW_TRACKING_URI": store_uri(folder)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shape, total = json.loads(done.stdout.strip().splitlines()[-1])
    assert shape == [4, 10] and abs(total - 1) < 1e-4


@needs_mnist
def test_predict_and_export_from_a_gpu_checkpoint(fits, tmp_path):
    folder, run = fits["on device"]
    (best,) = checkpoints(folder, run).glob("best-*.ckpt")
    predicted = run_mlplab("predict", "--ckpt_path", str(best), cwd=tmp_path,
                           env={"MLFLOW_TRACKING_URI": store_uri(tmp_path)})  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    labels = MNISTDataModule(data_dir=os.environ["MLPLAB_DATA_DIR"])
    labels.setup("test")
    guessed = pd.read_csv(tmp_path / "predictions.csv")["predicted"].to_numpy()
    accuracy = float((guessed == labels.data["test"][1].numpy()).mean())
    assert abs(accuracy - run.data.metrics["test/acc"]) < 1e-3  # the tested checkpoint
    exported = run_mlplab("export", "--model", str(best), "--output", str(tmp_path / "m.onnx"),
                          cwd=tmp_path, env=NO_GPU)  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "ONNX Runtime matches the checkpoint" in exported.stderr


@pytest.fixture
def graphs(monkeypatch) -> list:
    """Every GraphedForward a fit makes, with how many times each captured."""
    made = []

    class Recorded(cuda_graph.GraphedForward):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.captures = 0
            made.append(self)

        def capture(self, x) -> None:
            self.captures += 1
            super().capture(x)

    monkeypatch.setattr(cuda_graph, "GraphedForward", Recorded)
    return made


GRAPH_CASES = {
    **{name: (options, task, ()) for name, (options, task) in FEATURES.items()},
    "class weights": ({}, {"class_weight": "balanced"}, ()),
    "layer frozen after epoch 0": ({"epochs": 3}, FROZEN, (FreezeFirstLayer,)),
}


@pytest.mark.parametrize("case", GRAPH_CASES)
def test_cuda_graph_replays_train_as_the_eager_fast_path(case, graphs):
    """Real graphs: the weights, global step, learning rate and metrics of eager chunks."""
    trainer_options, task_options, callbacks = GRAPH_CASES[case]
    gpu = {"accelerator": "gpu", "devices": 1, **trainer_options}
    eager, eager_metrics = train(
        8, callbacks=[c() for c in callbacks], task_options=task_options, **gpu
    )
    graphed, graphed_metrics = train(
        8, callbacks=[c() for c in callbacks], task_options=task_options, cuda_graph=True, **gpu
    )
    (graph,) = graphs
    assert graph.captures == (2 if callbacks else 1)  # captured again once a layer froze
    assert_same_training(eager, graphed)
    assert graphed_metrics == pytest.approx(eager_metrics, abs=1e-5)


def digits_fit(graph: bool, **net_options) -> dict:
    seed_everything(3)
    net = partial(MLP, hidden_sizes=[64], **net_options)
    task = Classifier(net, num_features=64, num_classes=10, optimizer=torch.optim.SGD, lr=0.05)
    trainer = Trainer(accelerator="gpu", devices=1, max_epochs=5, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[FastPath(cuda_graph=graph)])  # fmt: skip
    trainer.fit(task, DigitsDataModule(batch_size=16, chunk=8, on_device=True))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_cuda_graph_with_batch_norm_replays_its_statistics_and_dropout_trains():
    eager, graphed = digits_fit(False, batch_norm=True), digits_fit(True, batch_norm=True)
    assert graphed == pytest.approx(eager, abs=1e-4)  # running statistics updated by replays
    eager, graphed = digits_fit(False, dropout=0.2), digits_fit(True, dropout=0.2)
    # the graph draws its own dropout masks: the same training in distribution
    assert graphed["val/acc"] > 0.9 and abs(graphed["val/acc"] - eager["val/acc"]) < 0.03


@needs_mnist
def test_the_seed_config_with_cuda_graph_matches_the_eager_gpu_run(fits, tmp_path):
    run = mnist_fit(tmp_path, *GPU, "--data.on_device", "true", "--fast_path.cuda_graph", "true")
    eager = fits["on device"][1].data.metrics
    for key in ("train/loss", "val/loss", "test/acc"):
        assert run.data.metrics[key] == pytest.approx(eager[key], abs=2e-3), key


class Synced(nn.Module):
    """A network that asks the host for a value mid-forward: no graph can hold that."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.linear(x) * (1.0 if x.abs().max().item() >= 0 else 0.0)


def test_a_step_that_cannot_be_captured_is_one_line():
    # last in the file: a failed capture is the one test that could leave CUDA unwell
    task = Classifier(Synced, num_features=64, num_classes=10)
    trainer = Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[FastPath(cuda_graph=True)])  # fmt: skip
    with pytest.raises(UserError, match="fast_path.cuda_graph: the forward pass cannot be captur"):
        trainer.fit(task, DigitsDataModule(batch_size=16, chunk=8, on_device=True))


def test_a_stack_trains_on_the_gpu_as_each_trial_alone():
    """`--stack` on a CUDA device: the stacked trials' weights are their own GPU fits'."""
    from mlplab.speed.stacked import StackedFit, build, device_of
    from test_stacked import BASE, own_fit

    args = [*BASE, *GPU]
    points = [["--seed_everything=1", "--model.lr=0.01"], ["--seed_everything=2",
                                                           "--model.lr=0.003"]]  # fmt: skip
    trials = [build([*args, *point]) for point in points]
    assert device_of(trials[0].config).type == "cuda"
    records = StackedFit(trials).run()
    for point, record in zip(points, records, strict=True):
        alone = own_fit([*args, *point])
        for key, weight in record.last.items():
            assert weight.is_cuda
            torch.testing.assert_close(weight, alone[key].to(weight.device), atol=1e-4, rtol=0)
