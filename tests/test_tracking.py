from pathlib import Path

import pytest

from conftest import config
from mlplab.tracking.logger import flatten_config
from mlplab.tracking.store import DEFAULT_TRACKING_URI, local_store_root, resolve_tracking_uri


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize(
    "uri, root",
    [
        ("sqlite:///mlruns/mlflow.db", Path("mlruns")),
        ("sqlite:////tmp/store/mlflow.db", Path("/tmp/store")),
        ("file:///tmp/runs", Path("/tmp/runs")),
        ("http://127.0.0.1:5000", None),
    ],
)
def test_local_store_root(uri, root):
    assert local_store_root(uri) == root


def test_flatten_config_folds_class_path_and_init_args():
    config = {
        "model": {
            "class_path": "my_project.models.Classifier",
            "init_args": {
                "lr": 0.1,
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}},
                "lr_scheduler": None,
            },
        },
        "trainer": {"max_epochs": 3, "callbacks": []},
    }
    assert flatten_config(config) == {
        "model": "my_project.models.Classifier",
        "model.lr": 0.1,
        "model.optimizer": "torch.optim.SGD",
        "model.optimizer.momentum": 0.9,
        "trainer.max_epochs": 3,
    }


def test_an_epoch_is_one_metric_write_and_nothing_is_held_back(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mlplab.main import main

    writes = []
    log_batch = MlflowClient.log_batch

    def spy(self, run_id, metrics=(), *args, **kwargs):
        if metrics and not metrics[0].key.startswith("system/"):  # sampled on their own
            writes.append(sorted({m.key for m in metrics}))
        return log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    main(["fit", "--config", config("xor"), "--trainer.max_epochs", "3", "--tracking_uri", uri])
    epoch = ["epoch", "train/acc", "train/loss", "val/acc", "val/loss"]
    # one write per epoch, one for the test; then `log_model`, where MLflow itself copies the
    # last epoch's metrics to the logged model
    assert writes[:4] == [epoch] * 3 + [["test/acc", "test/loss"]]
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("xor").experiment_id)
    for key in epoch[1:]:
        # XOR: 4 optimiser steps an epoch
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [4, 8, 12]
    assert run.data.metrics["test/acc"] >= 0  # written when the test run finalised
    assert not {"val/samples", "test/samples"} & run.data.metrics.keys()  # counts, not curves


def test_runs_of_one_seed_have_different_names_and_the_seeded_stream_is_kept(tmp_path, monkeypatch):
    import random

    from mlflow import MlflowClient

    from mlplab.main import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    draws = []
    for name in ([], [], ["--run_name", "named"]):
        main(["fit", "--config", config("xor"), "--trainer.max_epochs", "1", "--tracking_uri",
              uri, "--seed_everything", "7", "--test_after_fit", "false", *name])  # fmt: skip
        draws.append(random.random())
    client = MlflowClient(uri)
    runs = client.search_runs(client.get_experiment_by_name("xor").experiment_id)
    assert len({run.info.run_name for run in runs}) == 3
    # an unnamed run is named by its config and what the command line changes, then 4 hex digits
    unnamed = sorted(run.info.run_name for run in runs if run.info.run_name != "named")
    for name in unnamed:
        described, suffix = name.rsplit(" ", 1)
        assert described == "xor max_epochs=1 seed_everything=7 test_after_fit=false"
        assert len(suffix) == 4 and int(suffix, 16) >= 0
    # drawing a name took nothing from the seeded stream: it goes on as in a named run
    assert draws[0] == draws[1] == draws[2]


def test_a_random_name_drawn_twice_gets_the_run_id_appended(tmp_path, monkeypatch):
    import random

    from mlplab.tracking.logger import MLflowRunLogger

    seed = random.seed
    monkeypatch.setattr(random, "seed", lambda *args: seed(3))  # the same "fresh" draw twice
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first, second = (MLflowRunLogger("names", tracking_uri=uri) for _ in range(2))
    names = [logger.experiment.get_run(logger.run_id).info.run_name for logger in (first, second)]
    assert names[1] == f"{names[0]}-{second.run_id[:6]}"
