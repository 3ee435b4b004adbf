"""The offline GPU machine's set-up, on this machine: `scripts/gpu/carry.py`'s wheels plus what
that machine ships run mlplab with no index to install from."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, experiment_runs, store_uri

sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
import carry  # noqa: E402


def shipped_only(folder: Path) -> Path:
    """A site folder holding, of this environment's packages, those the GPU machine ships."""
    names = carry.shipped(ROOT / "scripts" / "gpu" / "shipped.txt")
    site = folder / "shipped"
    site.mkdir()
    for dist in importlib.metadata.distributions():
        if carry.normal(dist.metadata["Name"]) not in names:
            continue
        for top in {Path(f).parts[0] for f in dist.files or ()} - {"..", "__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return site


@pytest.mark.slow  # downloads ~36 MiB of wheels
def test_wheel_folder_and_what_the_gpu_machine_ships_train_and_log_offline(tmp_path):
    python = f"{sys.version_info.major}.{sys.version_info.minor}"  # the GPU machine's: 3.12
    made = subprocess.run(
        [sys.executable, ROOT / "scripts" / "gpu" / "carry.py", "--to", tmp_path / "carry",
         "--python", python, "--datasets"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    wheels = sorted((tmp_path / "carry" / "wheels").glob("*.whl"))
    names = {carry.normal(w.name.split("-")[0]) for w in wheels}
    assert {"mlflow", "jsonargparse", "optuna"} <= names and "torch" not in names
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
         tmp_path / "site", *wheels],
        check=True, timeout=600,
    )  # fmt: skip
    # -S: none of this environment's own packages, only the installed wheels and the shipped
    path = os.pathsep.join(map(str, [tmp_path / "site", shipped_only(tmp_path), ROOT / "src"]))
    env = {**os.environ, "PYTHONPATH": path, "MLFLOW_TRACKING_URI": store_uri(tmp_path)}
    fit = subprocess.run(
        [sys.executable, "-S", "-m", "mlplab", "fit", "--config", ROOT / "configs" / "xor.yaml",
         "--trainer.max_epochs", "20"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    _, runs = experiment_runs(store_uri(tmp_path), "xor")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert "test/acc" in runs[0].data.metrics
