"""`mlplab server` (`make server`): PostgreSQL (or SQLite) runs, proxied artifacts, loopback;
and a load test against it: 8 fits and a 2-worker sweep at once (`pytest -m slow`). Its
authentication is tests/test_server_auth.py's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import config, epochs_logged, run_mlplab
from mlplab.tracking.server import PostgreSQL, free_port

BACKENDS = [
    pytest.param("postgresql", marks=pytest.mark.skipif(
        PostgreSQL.available() is not None, reason=str(PostgreSQL.available()))),
    pytest.param("sqlite", marks=pytest.mark.slow),  # CI: the outage tests' servers use SQLite
]  # fmt: skip


@pytest.fixture
def server_root():
    """A folder PostgreSQL's own user can reach when the tests run as root (pytest's
    temporary folders are private to their owner)."""
    folder = Path(tempfile.mkdtemp(prefix="mlplab-server-"))
    folder.chmod(0o755)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def start_server(
    root: Path, backend: str, *options: str, env: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """`mlplab server`, its output in a file (a pipe nobody reads would fill and stall it);
    `env`: its whole environment (default: the tests')."""
    port = free_port()
    log = root / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlplab", "server", "--port", str(port), "--root",
             str(root), "--backend", backend, *options],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # the URI is printed once the server answers
        found = re.search(r"^export MLFLOW_TRACKING_URI=(\S+)$", log.read_text(), re.MULTILINE)
        if found:
            assert found.group(1) == f"http://127.0.0.1:{port}"
            return process, found.group(1)
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.3)
    raise AssertionError(f"mlplab server printed no URI:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    assert process.wait(timeout=60) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_records_runs_and_proxies_artifacts(backend, server_root, tmp_path):
    process, uri = start_server(server_root, backend)
    try:
        result = run_mlplab("fit", "--config", config("xor"), "--trainer.max_epochs", "2",
                            cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
        run_id = run.info.run_id
        assert run.info.status == "FINISHED" and epochs_logged(client, run_id) == [0, 1]
        # artifacts and the model went through the server into its folder; the checkpoints
        # stay with the job, and nothing went to a local store
        assert list((server_root / "artifacts").rglob("config.yaml"))
        mlflow.set_tracking_uri(uri)
        assert mlflow.pyfunc.load_model(f"runs:/{run_id}/model").metadata.run_id == run_id
        assert (tmp_path / "mlruns" / "xor" / run_id / "checkpoints" / "last.ckpt").is_file()
        assert not (tmp_path / "mlruns" / "mlflow.db").exists()
    finally:
        stop_server(process)
    database = server_root / ("pgdata" if backend == "postgresql" else "mlflow.db")
    assert database.exists()
    assert not (server_root / "pgdata" / "postmaster.pid").exists()  # stopped with the server


@pytest.mark.slow
def test_load_8_fits_and_a_2_worker_sweep_at_once(server_root, tmp_path):
    """Every run, param and metric row recorded, nothing FAILED (about 3 min on 2 cores)."""
    process, uri = start_server(server_root, "auto")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    epochs = 5
    try:
        jobs = [
            subprocess.Popen([sys.executable, "-m", "mlplab", "fit", "--config", config("xor"),
                              "--trainer.max_epochs", str(epochs), "--seed_everything", str(i),
                              "--trainer.enable_progress_bar", "false"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
            for i in range(8)
        ]  # fmt: skip
        jobs.append(subprocess.Popen(
            [sys.executable, "-m", "mlplab", "sweep", "--config", config("moons"),
             "--grid", "model.lr=[0.01,0.03,0.1,0.3]", "--workers", "2",
             f"--trainer.max_epochs={epochs}"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
        for job in jobs:
            _, err = job.communicate(timeout=900)
            assert job.returncode == 0, err[-3000:]
        client = MlflowClient(uri)
        fits = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
        sweep = client.search_runs([client.get_experiment_by_name("moons").experiment_id])
        assert len(fits) == 8 and len(sweep) == 5  # the parent and 4 children
        assert len({run.info.run_name for run in fits}) == 8
        for run in fits + sweep:
            assert run.info.status == "FINISHED", run.info
        for run in fits + [r for r in sweep if "mlflow.parentRunId" in r.data.tags]:
            assert epochs_logged(client, run.info.run_id) == list(range(epochs))
            assert epochs_logged(client, run.info.run_id, "train/loss") == list(range(epochs))
            assert {"model.lr", "data.batch_size", "trainer.max_epochs"} <= set(run.data.params)
            assert "test/acc" in run.data.metrics
    finally:
        stop_server(process)
