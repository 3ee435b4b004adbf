"""Shared fixtures: every test that trains gets its own MLflow store and working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def config(name: str) -> str:
    return str(ROOT / "configs" / f"{name}.yaml")


def pytest_configure(config):
    """Real MNIST / Fashion-MNIST: `$MLPLAB_DATA_DIR`, else the shared copy beside the repo."""
    shared = ROOT.parent / "shared" / "datasets"
    if "MLPLAB_DATA_DIR" not in os.environ and shared.is_dir():
        os.environ["MLPLAB_DATA_DIR"] = str(shared)


def real_data(folder: str = "MNIST") -> bool:
    root = os.environ.get("MLPLAB_DATA_DIR")
    return bool(root) and (Path(root) / folder / "raw" / "train-images-idx3-ubyte").is_file()
