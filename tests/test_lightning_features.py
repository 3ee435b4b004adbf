"""Standard Lightning features through `mlplab fit`, each checked by its effect.

The digits config (1,000 training images, batch 16: 63 batches an epoch) runs with the fast path
on (`data.chunk: 32`), as the seed configs do; what needs single batches turns it off by itself.
"""

from __future__ import annotations

import csv
import re
import sys

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from conftest import config, experiment_runs, run_mlplab
from mlplab.main import main

STEPS = 63  # optimiser steps per epoch of the digits config


def fit(store: str, *args: str, epochs: int = 2, name: str = "digits"):
    main(["fit", "--config", config(name), "--trainer.max_epochs", str(epochs), *args])
    client, runs = experiment_runs(store, name)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return client, runs[0]


def steps(client: MlflowClient, run, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def last_checkpoint(store: str, run) -> dict:
    folder = store.removeprefix("sqlite:///").rsplit("/", 1)[0]
    path = f"{folder}/digits/{run.info.run_id}/checkpoints/last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)


def test_metrics_are_logged_per_epoch_at_the_optimiser_step(store):
    client, run = fit(store)
    assert steps(client, run, "train/loss") == [STEPS, 2 * STEPS]
    assert steps(client, run, "val/loss") == [STEPS, 2 * STEPS]


def test_gradient_clipping_by_value_holds_the_weights_back(store):
    client, run = fit(store, "--trainer.gradient_clip_val", "1e-9",
                      "--trainer.gradient_clip_algorithm", "value",
                      "--model.optimizer", "torch.optim.SGD", "--model.lr", "0.5")  # fmt: skip
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert run.data.params["trainer.gradient_clip_val"] == "1e-09"
    assert abs(losses[1] - losses[0]) < 1e-3 and run.data.metrics["val/acc"] < 0.3


def test_accumulation_makes_one_optimiser_step_per_four_batches(store):
    client, run = fit(store, "--trainer.accumulate_grad_batches", "4")
    assert steps(client, run, "train/loss") == [16, 32]  # ceil(63 / 4) per epoch


def test_max_steps_stops_at_that_optimiser_step(store):
    client, run = fit(store, "--trainer.max_steps", "10", epochs=5)
    assert steps(client, run, "train/loss") == [10]
    assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")  # still logged


@pytest.mark.parametrize("interval, expected", [("0.5", [31, 62, 94, 125]),
                                                 ("20", [20, 40, 60, 83, 103, 123])])
def test_every_validation_is_its_own_point(store, interval, expected):
    client, run = fit(store, "--trainer.val_check_interval", interval)
    assert steps(client, run, "val/loss") == expected


def test_limits_on_batches_count_batches(store, capsys):
    client, run = fit(store, "--trainer.limit_train_batches", "5",
                      "--trainer.limit_val_batches", "2")  # fmt: skip
    assert steps(client, run, "train/loss") == [5, 10]
    assert re.search(rf"val/samples={2 * 16}\b", capsys.readouterr().out)  # said, not charted
    assert "val/samples" not in run.data.metrics


def test_fast_dev_run_takes_one_step_and_records_nothing(store, caplog):
    main(["fit", "--config", config("digits"), "--trainer.fast_dev_run", "true"])
    assert "Running in `fast_dev_run` mode" in caplog.text
    _, runs = experiment_runs(store, "digits")
    assert all(not r.data.metrics for r in runs)  # Lightning silences loggers in this mode


def test_bf16_mixed_precision_trains_on_cpu(store):
    _, run = fit(store, "--trainer.precision", "bf16-mixed", epochs=5)
    assert run.data.params["trainer.precision"] == "bf16-mixed"
    assert run.data.metrics["val/acc"] > 0.8


def test_early_stopping_stops(store):
    client, run = fit(store, "--trainer.callbacks+=EarlyStopping",
                      "--trainer.callbacks.monitor=val/loss", "--trainer.callbacks.min_delta=10",
                      "--trainer.callbacks.patience=0", epochs=10)  # fmt: skip
    assert len(steps(client, run, "train/loss")) == 2  # never improved by 10: stop after 2


@pytest.mark.parametrize("interval, every, count", [("step", 10, 12), ("epoch", 50, 2)])
def test_learning_rate_monitor_logs_per_step_or_per_epoch(store, interval, every, count):
    client, run = fit(store, "--trainer.callbacks+=LearningRateMonitor",
                      f"--trainer.callbacks.logging_interval={interval}",
                      "--trainer.log_every_n_steps", str(every))  # fmt: skip
    history = client.get_metric_history(run.info.run_id, "lr-Adam")
    assert len(history) == count and {m.value for m in history} == {0.001}


def test_stochastic_weight_averaging_averages(store):
    _, run = fit(store, "--trainer.callbacks+=StochasticWeightAveraging",
                 "--trainer.callbacks.swa_lrs=0.0005", "--trainer.callbacks.swa_epoch_start=1",
                 epochs=3)  # fmt: skip
    swa = next(v for k, v in last_checkpoint(store, run)["callbacks"].items() if "Stochastic" in k)
    assert swa["n_averaged"] >= 1


def test_ema_weight_averaging_averages(store):
    _, run = fit(store, "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging",
                 epochs=2)  # fmt: skip
    state = last_checkpoint(store, run)  # the average as the weights, the latest beside them
    current = state["current_model_state"]
    assert any(not torch.equal(v, current[k]) for k, v in state["state_dict"].items())


def test_throughput_monitor_logs_samples_per_second(store):
    client, run = fit(store, "--trainer.callbacks+=ThroughputMonitor",
                      "--trainer.callbacks.batch_size_fn=mlplab.data.base.batch_size",
                      "--trainer.log_every_n_steps", "10")  # fmt: skip
    names = [k for k in run.data.metrics if "samples_per_sec" in k]
    assert names and run.data.metrics[names[0]] > 0


def test_simple_profiler_reports_the_training_step(store, tmp_path):
    fit(store, "--trainer.profiler=SimpleProfiler", f"--trainer.profiler.dirpath={tmp_path}",
        "--trainer.profiler.filename=profile")  # fmt: skip
    report = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_batch" in report


def test_learning_rate_finder_sets_the_lr_and_the_run_records_it(store):
    _, run = fit(store, "--trainer.callbacks+=LearningRateFinder",
                 "--trainer.callbacks.num_training_steps=30", epochs=1)  # fmt: skip
    assert "model.lr" in run.data.tags["mlplab.tuned"]
    assert float(run.data.params["model.lr"]) != 0.001


def test_batch_size_finder_sets_the_batch_size_and_the_run_records_it(store):
    _, run = fit(store, "--trainer.callbacks+=BatchSizeFinder",
                 "--trainer.callbacks.max_trials=3", epochs=1)  # fmt: skip
    assert run.data.params["data.batch_size"] == "8"  # from its init_val 2, doubled twice
    assert run.data.tags["mlplab.tuned"] == "data.batch_size"


def test_csv_logger_replaces_mlflow(store, tmp_path):
    main(["fit", "--config", config("digits"), "--trainer.max_epochs", "2",
          "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}"])  # fmt: skip
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert sum(1 for r in rows if r.get("val/loss")) == 2
    assert not experiment_runs(store, "digits")[1]


def test_tensorboard_logger_without_tensorboard_is_one_line(tmp_path):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    result = run_mlplab("fit", "--config", config("xor"), "--trainer.logger=TensorBoardLogger",
                        "--trainer.logger.save_dir=tb", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "tensorboard" in lines[0], result.stderr[-2000:]


class TinyNet(nn.Module):
    """A network mlplab does not ship: found by `class_path` like any other."""

    def __init__(self, in_features: int, out_features: int, width: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, width), nn.GELU(), nn.Linear(width, out_features)
        )

    def forward(self, x):
        return self.layers(x)


def test_a_network_defined_here_trains_by_class_path_and_reloads(store):
    client, run = fit(store, f"--model.net={__name__}.TinyNet", "--model.net.width=48", epochs=5)
    assert run.data.params["model.net"] == f"{__name__}.TinyNet"
    assert run.data.metrics["val/acc"] > 0.85
    from my_project.models import Classifier

    folder = store.removeprefix("sqlite:///").rsplit("/", 1)[0]
    best = next((__import__("pathlib").Path(folder) / "digits" / run.info.run_id /
                 "checkpoints").glob("best-*.ckpt"))  # fmt: skip
    task = Classifier.load_from_checkpoint(best)
    assert isinstance(task.net, TinyNet) and task.net.layers[0].out_features == 48
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 64)


class PlainModule(__import__("lightning").pytorch.LightningModule):
    """A LightningModule that is no mlplab task: its own loss, no metrics, no test step."""

    def __init__(self, num_features: int, num_classes: int, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(num_features, num_classes)

    def forward(self, x):
        return self.layer(x).softmax(1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.layer(x), y)
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_any_lightning_module_fits_and_is_logged_as_a_model(store):
    main(["fit", "--config", config("digits"), "--model", f"{__name__}.PlainModule",
          "--trainer.max_epochs", "2"])  # fmt: skip
    _, runs = experiment_runs(store, "digits")
    (run,) = runs
    assert run.data.params["data.num_classes"] == "10" and "val/loss" in run.data.metrics
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.predict(torch.rand(3, 64).numpy()).shape == (3, 10)


def test_help_lists_the_commands_without_importing_torch():
    code = ("import sys; from mlplab.main import main; main(['--help']); "
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules")  # fmt: skip
    result = __import__("subprocess").run([sys.executable, "-c", code], capture_output=True,
                                          text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "fit " in result.stdout and "sweep " in result.stdout
