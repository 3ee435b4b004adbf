"""Shared fixtures: every test that trains gets its own MLflow store and working directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlplab.tracking.server import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store, made the default for the CLI; the test runs inside tmp_path."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def run_mlplab(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m mlplab ARGS` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mlplab", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def fit_in_own_store(folder: Path, *args: str) -> str:
    """`mlplab fit ARGS` in-process, in `folder` with its own store (module-scoped fixtures
    share one run); returns the store's URI."""
    from mlplab.main import main

    uri = store_uri(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(folder)
        main(["fit", *args])
    return uri


def store_uri(folder: Path) -> str:
    """The SQLite store of `folder` (as the CLI lays it out under a working directory)."""
    return f"sqlite:///{folder}/mlruns/mlflow.db"


def run_in_store(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m mlplab ARGS` in `folder` with its own store; it must succeed."""
    result = run_mlplab(*args, cwd=folder, env={"MLFLOW_TRACKING_URI": store_uri(folder)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def experiment_runs(uri: str, name: str):
    """(client, the experiment's runs); no runs if the experiment does not exist."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    return client, ([] if found is None else client.search_runs([found.experiment_id]))


def epochs_logged(client, run_id: str, key: str = "val/loss") -> list[int]:
    """The epoch of each point of `key`, sorted: metrics are logged at the optimiser step, and
    the `epoch` metric logged beside them says which epoch a step belongs to."""
    epoch_at = {m.step: int(m.value) for m in client.get_metric_history(run_id, "epoch")}
    return sorted(epoch_at[m.step] for m in client.get_metric_history(run_id, key))


def config(name: str) -> str:
    return str(ROOT / "configs" / f"{name}.yaml")


def pytest_configure(config):
    """Real MNIST / Fashion-MNIST: `$MLPLAB_DATA_DIR`, else the shared copy beside the repo."""
    shared = ROOT.parent / "shared" / "datasets"
    if "MLPLAB_DATA_DIR" not in os.environ and shared.is_dir():
        os.environ["MLPLAB_DATA_DIR"] = str(shared)


def real_data(folder: str = "MNIST") -> bool:
    root = os.environ.get("MLPLAB_DATA_DIR")
    raw = Path(root or ".") / folder / "raw"
    return bool(root) and any(raw.glob("train-images-idx3-ubyte*"))  # gzipped too


class MlflowServer:
    """`mlflow server` on a free loopback port with its own backend store and proxied
    artifacts; `stop()` and `start()` again keep the same port and store (an outage)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
             "--artifacts-destination", str(self.folder / "server-artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


@pytest.fixture
def tracking_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop()


# --- `mlplab` commands forked from one process that imported everything (tests/forkserver.py)
@dataclass
class Done:
    code: int
    stdout: str
    stderr: str

    @property
    def said(self) -> list[str]:
        """Every line the user reads (Lightning's start-up lines included)."""
        return [line for line in self.stderr.splitlines() if line.strip()]


class ForkServer:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forkserver.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, args: list[str], cwd: Path, env: dict | None = None) -> Done:
        out, err = cwd / ".stdout", cwd / ".stderr"
        environment = {**os.environ, **(env or {})}
        request = {"args": args, "cwd": str(cwd), "env": environment,
                   "stdout": str(out), "stderr": str(err)}  # fmt: skip
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        code = json.loads(self.process.stdout.readline())["code"]
        return Done(code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def cli():
    server = ForkServer()
    yield server
    server.close()
