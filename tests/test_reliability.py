"""Kills, interrupts, divergence, bad input and concurrent runs, through the real CLI: a clear
one-line message, a non-zero exit, and a store that keeps every run intact."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from functools import partial

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer
from mlflow import MlflowClient

from conftest import config, epochs_logged, experiment_runs, run_in_store, run_mlplab, store_uri
from mlplab.main import main
from mlplab.safety import metadata
from my_project.data import XORDataModule
from my_project.models import MLP, Classifier

# two moons, 40 epochs of 13 batches: long enough to interrupt, short enough for CI
MOONS = ["fit", "--config", config("moons"), "--trainer.max_epochs", "40",
         "--trainer.callbacks", "[]"]  # fmt: skip


def start(args: list[str], cwd, uri: str) -> tuple[subprocess.Popen, object]:
    log = (cwd / "job.log").open("w")
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    job = subprocess.Popen([sys.executable, "-m", "mlplab", *args], cwd=cwd, env=env,
                           stdout=log, stderr=log)  # fmt: skip
    return job, log


def wait_for_epochs(job, cwd, uri: str, experiment: str, epochs: int) -> str:
    """Block until the run has logged `epochs` validation epochs; return its id. The store is
    only opened once a checkpoint shows the job has created it."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert job.poll() is None, (cwd / "job.log").read_text()[-3000:]
        found = list((cwd / "mlruns" / experiment).glob("*/checkpoints/last.ckpt"))
        if found:
            run_id = found[0].parents[1].name
            if len(MlflowClient(uri).get_metric_history(run_id, "val/loss")) >= epochs:
                return run_id
        time.sleep(0.3)
    raise AssertionError("the run did not get going")


def history(client, run_id: str, key: str = "val/loss") -> list[int]:
    return epochs_logged(client, run_id, key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    run_in_store(tmp, *MOONS)
    return experiment_runs(store_uri(tmp), "moons")[1][0]


@pytest.mark.parametrize(  # CI runs SIGKILL (`make test` stays under 20 minutes)
    "how", ["SIGKILL", pytest.param("SIGTERM", marks=pytest.mark.slow),
            pytest.param("SIGINT", marks=pytest.mark.slow)]
)  # fmt: skip
def test_interrupted_fit_resumes_into_the_same_run(how, tmp_path, uninterrupted):
    uri = store_uri(tmp_path)
    job, log = start(MOONS, tmp_path, uri)
    run_id = wait_for_epochs(job, tmp_path, uri, "moons", 3)
    job.send_signal(getattr(signal, how))
    job.wait(timeout=120)
    log.close()
    output = (tmp_path / "job.log").read_text()
    client, found = experiment_runs(uri, "moons")  # the store still reads
    (run,) = found
    if how == "SIGKILL":
        assert job.returncode == -signal.SIGKILL
        assert run.info.status == "RUNNING"  # visibly unfinished
    else:
        assert job.returncode != 0
        assert run.info.status == "KILLED", output[-2000:]
        assert f"mlplab: interrupted: run {run_id} marked KILLED" in output
        assert "Traceback" not in output
    before = history(client, run_id)
    last = tmp_path / "mlruns" / "moons" / run_id / "checkpoints" / "last.ckpt"
    resumed_epoch = torch.load(last, weights_only=True)["epoch"] + 1  # saved at its end

    # `last` finds the run's checkpoint; a path to it does the same
    ckpt_path = str(last) if how == "SIGTERM" else "last"
    resumed = run_mlplab(*MOONS, "--ckpt_path", ckpt_path, cwd=tmp_path,
                         env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"mlplab: resuming run {run_id}" in resumed.stderr
    client, found = experiment_runs(uri, "moons")
    assert len(found) == 1, "resuming made a second run"
    (run,) = found
    assert run.info.status == "FINISHED"
    # the checkpoint is the newest completed epoch, and a job killed between writing it and
    # writing that epoch to MLflow has it written on resuming: every epoch exactly once
    assert history(client, run_id) == list(range(40)), (before, resumed_epoch)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "config-resume-1.yaml"} <= artifacts
    # shuffling restarts from a new random state, so not bit-identical: close to a whole run
    for key, tolerance in (("test/acc", 0.02), ("val/acc", 0.02), ("val/loss", 0.05)):
        assert abs(run.data.metrics[key] - uninterrupted.data.metrics[key]) <= tolerance, key


def write_digits_input(folder):
    path = folder / "digits.csv"
    np.savetxt(path, np.random.default_rng(0).uniform(0, 16, (3, 64)), delimiter=",")
    return path


def test_last_is_the_latest_epoch_and_resuming_from_it_logs_each_epoch_once(tmp_path):
    """Lightning 2.6's `save_last` writes last.ckpt only beside a new best: here the
    validation loss rises after its best epoch, so best and last differ."""
    digits = ["fit", "--config", config("digits"), "--model.lr", "0.01", "--test_after_fit",
              "false", "--trainer.callbacks", "[]"]  # fmt: skip
    run_in_store(tmp_path, *digits, "--trainer.max_epochs", "30", "--register_model", "digits")
    client, (run,) = experiment_runs(store_uri(tmp_path), "digits")
    folder = tmp_path / "mlruns" / "digits" / run.info.run_id / "checkpoints"
    (best,) = folder.glob("best-*.ckpt")
    best, last = (torch.load(f, weights_only=True) for f in (best, folder / "last.ckpt"))
    assert best["epoch"] < 29 and last["epoch"] == 29
    assert not list(folder.glob("*.part"))
    # the best is the one logged model, carrying the metrics of its epoch; both checkpoints
    # are the run's artifacts, to download from its page
    mlflow.set_tracking_uri(store_uri(tmp_path))
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           output_format="list")  # fmt: skip
    step = best["global_step"]
    assert model.tags["mlplab.checkpoint"] == "best"
    assert {m.step for m in model.metrics} == {step}
    points = client.get_metric_history(run.info.run_id, "val/loss")
    logged = {m.key: m.value for m in model.metrics}
    assert logged["val/loss"] == next(m.value for m in points if m.step == step)
    saved = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert saved == {"checkpoints/last.ckpt", f"checkpoints/best-epoch={best['epoch']}.ckpt"}
    predicted = run_mlplab("predict", "--model", "models:/digits@candidate", "--input",
                           str(write_digits_input(tmp_path)), cwd=tmp_path,
                           env={"MLFLOW_TRACKING_URI": store_uri(tmp_path)})  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    header, *rows = predicted.stdout.strip().splitlines()
    assert header.startswith("predicted,prob_0,") and len(rows) == 3  # the digit, 10 probabilities
    run_in_store(tmp_path, *digits, "--trainer.max_epochs", "35", "--ckpt_path", "last")
    client, (run,) = experiment_runs(store_uri(tmp_path), "digits")
    assert history(client, run.info.run_id) == list(range(35))
    assert run.info.status == "FINISHED"


def test_an_epoch_checkpointed_but_not_yet_in_mlflow_is_written_on_resuming(tmp_path):
    """The window a `kill -9` can hit: last.ckpt of epoch 2 written, its metrics not."""
    uri = store_uri(tmp_path)
    run_in_store(tmp_path, *MOONS[:3], "--trainer.max_epochs", "3", "--test_after_fit", "false")
    client, (run,) = experiment_runs(uri, "moons")
    last = tmp_path / "mlruns" / "moons" / run.info.run_id / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    unwritten = checkpoint[metadata.UNWRITTEN]
    assert {"train/loss", "val/loss", "epoch"} <= set(unwritten["metrics"])
    # as if the job had died before its last write: a fresh run holding epochs 0-1 only
    fresh = client.create_run(run.info.experiment_id).info.run_id
    for metric in ("val/loss", "train/loss", "epoch"):
        for point in client.get_metric_history(run.info.run_id, metric):
            if point.step < unwritten["step"]:
                client.log_metric(fresh, metric, point.value, step=point.step)
    checkpoint[metadata.RUN_ID] = fresh
    torch.save(checkpoint, last)
    run_in_store(tmp_path, *MOONS[:3], "--trainer.max_epochs", "5", "--ckpt_path", "last",
                 "--test_after_fit", "false")  # fmt: skip
    assert history(client, fresh) == [0, 1, 2, 3, 4]
    assert history(client, fresh, "train/loss") == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("iris_regression", ["--model.optimizer", "SGD", "--model.lr", "1e6"],
         "train/loss is nan in epoch 0"),
        # finite but absurd: Adam at lr 1e12 ends near 1e13 with chance accuracy
        ("iris_classification", ["--model.optimizer", "Adam", "--model.lr", "1e12"],
         "over 10000x the first batch's"),
    ],
)  # fmt: skip
def test_diverging_training_stops_with_a_reason_and_a_failed_run(tmp_path, name, args, message):
    uri = store_uri(tmp_path)
    result = run_mlplab(
        "fit", "--config", config(name), *args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}
    )
    assert result.returncode == 1
    assert "mlplab: error: training diverged: " in result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    (run,) = experiment_runs(uri, name)[1]
    assert run.info.status == "FAILED"
    assert run.data.tags["mlplab.failure"].startswith("TrainingDiverged: training diverged")
    assert "model" not in {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}


@pytest.fixture(scope="module")
def xor_checkpoint(tmp_path_factory):
    """A real XOR checkpoint, trained for a few steps (what it predicts does not matter)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[metadata.CheckpointMetadata()])  # fmt: skip
    task = Classifier(partial(MLP, hidden_sizes=[4]), num_features=2, num_classes=2)
    trainer.fit(task, XORDataModule())
    path = tmp / "xor.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.optimizer", "NoSuchOptimizer"], "NoSuchOptimizer"),
        (["--model.activation", "swish"], "swish"),
        (["--ckpt_path", "nowhere.ckpt"], "checkpoint nowhere.ckpt does not exist"),
        (["--ckpt_path", "last"], "no run of this experiment has a last.ckpt"),
        (["--ckpt_path", "garbage.ckpt"], "garbage.ckpt is not a readable checkpoint"),
        (["--ckpt_path", "XOR"], "belongs to another model (net.1.weight: checkpoint (4, 2)"),
    ],
)
def test_bad_input_is_one_line_and_touches_no_store(args, message, tmp_path, xor_checkpoint):
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint at all")
    args = [str(xor_checkpoint) if a == "XOR" else a for a in args]
    uri = store_uri(tmp_path)
    result = run_mlplab("fit", "--config", config("iris_classification"), *args, cwd=tmp_path,
                        env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


@pytest.mark.slow  # CI time; test_checkpoints covers a checkpoint that does not fit in-process
def test_validate_with_another_models_checkpoint_is_one_line(tmp_path):
    """A checkpoint written through the CLI carries its model's settings, which Lightning
    merges into the config; the weights still do not fit the digits data."""
    uri = store_uri(tmp_path)
    run_in_store(tmp_path, "fit", "--config", config("xor"), "--trainer.max_epochs", "2")
    (checkpoint,) = (tmp_path / "mlruns" / "xor").glob("*/checkpoints/last.ckpt")
    result = run_mlplab("validate", "--config", config("digits"), "--ckpt_path", str(checkpoint),
                        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
    assert result.returncode == 2
    assert "belongs to another model (net.1.weight: checkpoint (4, 2), model (4, 64))" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_store_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    uri = f"sqlite:///{tmp_path}/a_file/mlruns/mlflow.db"
    result = run_mlplab("fit", "--config", config("xor"), "--tracking_uri", uri, cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot create the MLflow store folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_tracking_server_fails_fast(tmp_path):
    start_time = time.monotonic()
    result = run_mlplab("fit", "--config", config("xor"), cwd=tmp_path,
                        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})  # fmt: skip
    elapsed = time.monotonic() - start_time
    assert result.returncode == 2
    assert "the MLflow tracking server http://127.0.0.1:9 does not answer" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"  # MLflow's own retries take minutes


@pytest.mark.slow  # CI time; the server load test covers concurrency against a server
def test_concurrent_runs_share_one_sqlite_store(tmp_path):
    """Four `mlplab fit` processes start together on a fresh store: all finish, every metric
    of every epoch is recorded."""
    uri = store_uri(tmp_path)
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlplab",
                "fit",
                "--config",
                config("iris_classification"),
                "--run_name",
                f"run-{i}",
                "--seed_everything",
                str(i),
                "--trainer.callbacks",
                "[]",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(4)
    ]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
    client, found = experiment_runs(uri, "iris_classification")
    assert sorted(r.info.run_name for r in found) == [f"run-{i}" for i in range(4)]
    for run in found:
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
            assert history(client, run.info.run_id, key) == list(range(10)), (run, key)


def _malformed_inputs(rng: np.random.Generator):
    """(file name, bytes) pairs: the shapes of input that reach a prediction service."""
    yield "empty.csv", b""
    yield "blank.csv", b"\n\n\n"
    yield "header_only.csv", b"a,b\n"
    yield "ragged.csv", b"0,1\n1,0,1\n0\n"
    yield "strings.csv", b"0,1\nyes,no\n"
    yield "nan.csv", b"0,nan\n1,1\n"
    yield "inf.csv", b"0,inf\n"
    yield "huge.csv", b"1e300,0\n"
    yield "three_columns.csv", b"0,1,2\n"
    yield "one_column.csv", b"1\n0\n"
    yield "binary.csv", bytes(rng.integers(0, 256, 300, dtype=np.uint8))
    yield "semicolons.csv", b"0;1\n1;0\n"
    yield "quoted.csv", b'"0","1"\n"1","0"\n'
    yield "garbage.npy", b"\x93NUMPY garbage"
    for name, array in {
        "scalar.npy": np.array(3.0),
        "empty.npy": np.zeros((0, 2)),
        "strings.npy": np.array([["a", "b"]]),
        "complex.npy": np.ones((2, 2), dtype=complex),
        "cube.npy": np.ones((2, 1, 2)),
        "wide.npy": np.ones((2, 5)),
        "bools.npy": np.array([[True, False]]),
    }.items():
        import io

        buffer = io.BytesIO()
        np.save(buffer, array)
        yield name, buffer.getvalue()
    for i in range(12):  # random small tables of random tokens
        tokens = [b"0", b"1", b"-2.5", b"", b"x", b"nan", b"1e5", b" 3 ", b"0x10"]
        rows = [b",".join(rng.choice(tokens, size=rng.integers(1, 4))) for _ in range(3)]
        yield f"random_{i}.csv", b"\n".join(rows)


def test_predict_never_crashes_on_malformed_input(tmp_path, xor_checkpoint, capsys):
    """Every input either predicts one row per input row or stops with a one-line error."""
    rng = np.random.default_rng(0)
    for name, content in _malformed_inputs(rng):
        path = tmp_path / name
        path.write_bytes(content)
        output = tmp_path / f"{name}.out.csv"
        try:
            main(["predict", "--model", str(xor_checkpoint), "--input", str(path),
                  "--output", str(output)])  # fmt: skip
        except SystemExit as done:
            err = capsys.readouterr().err
            assert done.code == 2, (name, err)
            assert err.startswith("mlplab predict: error: ") and err.count("\n") == 1, (name, err)
            continue
        capsys.readouterr()
        predictions = pd.read_csv(output)
        assert list(predictions.columns) == ["predicted", "prob_0", "prob_1"], name
        assert np.isfinite(predictions[["prob_0", "prob_1"]].to_numpy()).all(), name
        assert 0 < len(predictions) <= content.count(b"\n") + 1, name
    assert torch.load(xor_checkpoint, weights_only=True)["state_dict"]  # left as it was
