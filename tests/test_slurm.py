"""The project's batch script on a real one-node SLURM (Debian's slurm-wlm and munge, started by
`scripts/slurm/local_cluster.sh`), 2 CPU ranks, SLURM's warning signal sent at start-up, mid-fit
and during testing: every job ends COMPLETED with one FINISHED run, its test metrics and model.
`make slurm-check` installs the packages where it can and runs this file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import ROOT, experiment_runs

pytestmark = pytest.mark.slow
CLUSTER = ROOT / "scripts" / "slurm" / "local_cluster.sh"
EPOCHS = 150


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The daemons, up for this file's jobs and stopped after them; jobs run in `work/`."""
    found = subprocess.run([CLUSTER, "available"], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(found.stdout.strip() or found.stderr.strip())
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([CLUSTER, "start", folder / "cluster"], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr[-3000:]
    work = folder / "work"
    (work / "mlruns").mkdir(parents=True)
    for linked in ("configs", "scripts"):
        (work / linked).symlink_to(ROOT / linked)
    env = {**os.environ, "SLURM_CONF": str(folder / "cluster" / "slurm.conf"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlruns/mlflow.db"}  # fmt: skip
    try:
        yield work, env
    finally:
        subprocess.run([CLUSTER, "stop", folder / "cluster"], capture_output=True)


def job_state(job: str, env: dict) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                           env=env).stdout  # fmt: skip
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def epochs_done(uri: str, experiment: str) -> int:
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return -1  # the job makes the store (a client made here would too)
    client, runs = experiment_runs(uri, experiment)
    history = [m.value for r in runs for m in client.get_metric_history(r.info.run_id, "epoch")]
    return int(max(history, default=-1))


# moment -> (when the signal goes, how: to the ranks, or to the batch shell as `B:` sends it)
MOMENTS = {
    "start-up": (lambda epochs: epochs < 0, []),  # the ranks are importing
    "mid-fit": (lambda epochs: epochs >= 20, ["--batch"]),
    "testing": (lambda epochs: epochs >= EPOCHS - 1, []),  # the last epoch is written: testing
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_the_warning_signal_at_any_moment_ends_in_one_finished_run(cluster, moment):
    work, env = cluster
    uri, experiment = env["MLFLOW_TRACKING_URI"], f"slurm-{moment}"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "scripts/slurm/train_cpu.sbatch", "configs/xor.yaml",
         "--trainer.max_epochs", str(EPOCHS), "--trainer.enable_progress_bar", "false",
         "--experiment_name", experiment],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = submitted.stdout.strip().split(";")[0]
    due, how = MOMENTS[moment]
    deadline = time.time() + 300
    while job_state(job, env).get("JobState") != "RUNNING" or not steps_running(job, env):
        assert time.time() < deadline, job_state(job, env)
        time.sleep(0.1)
    time.sleep(1)  # SLURM drops a signal sent before the ranks have started
    while not due(epochs_done(uri, experiment)):
        assert time.time() < deadline and job_state(job, env)["JobState"] == "RUNNING"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", *how, job], env=env, check=True)
    while (state := job_state(job, env))["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED"):
        assert time.time() < deadline, state
        time.sleep(1)
    output = (work / "mlruns" / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", output[-3000:]
    requeued = moment != "testing"  # before or in the fit: kept and requeued, resumed after
    assert state["Restarts"] == ("1" if requeued else "0"), output[-3000:]
    hpc = list((work / "mlruns" / f"slurm-{job}").glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == (1 if requeued else 0)

    _, (run,) = experiment_runs(uri, experiment)
    assert run.info.status == "FINISHED" and "mlplab.failure" not in run.data.tags
    assert run.data.metrics["test/acc"] == 1.0
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    xor = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    assert np.asarray(model.predict(xor)).shape[0] == 4


def steps_running(job: str, env: dict) -> bool:
    steps = subprocess.run(["squeue", "-h", "-s", "-j", job], capture_output=True, text=True,
                           env=env).stdout  # fmt: skip
    return bool(steps.strip())
