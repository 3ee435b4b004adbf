"""DDP on CPU processes (gloo) through the real CLI: one MLflow run per job, the same numbers as
one process, every evaluation sample counted once; SLURM's ranks and requeue, simulated."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only as lightning_rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

from conftest import ROOT, config, epochs_logged, experiment_runs, run_mlplab, store_uri
from mlplab.cli import MLPLabCLI
from mlplab.safety.slurm import SLURMRequeue

# Full-batch training is order-free: two ranks averaging the gradients of their halves take
# exactly the steps one process takes on the whole split. 201 evaluation points split 101 + 100:
# the stock DistributedSampler would evaluate 202.
MOONS = [
    "fit", "--config", config("moons"), "--data.batch_size", "0", "--data.n_holdout", "201",
    "--trainer.max_epochs", "30", "--trainer.callbacks", "[]",
]  # fmt: skip
DDP_CPU = ["--config", config("trainer/ddp_cpu")]


def one_run(uri: str, experiment: str):
    client, runs = experiment_runs(uri, experiment)
    assert len(runs) == 1, f"{experiment}: expected exactly one run, found {len(runs)}"
    return client, runs[0]


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    uri = store_uri(tmp)
    env = {"MLFLOW_TRACKING_URI": uri}
    said = {}  # each job's summary line: the sample counts are said there, not charted
    for name, extra in (("single", []), ("ddp", DDP_CPU)):
        result = run_mlplab(*MOONS, *extra, "--experiment_name", name, cwd=tmp, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        said[name] = result.stdout
    return uri, tmp, said


def test_ddp_job_is_exactly_one_finished_run_with_its_world_size(single_and_ddp):
    uri, *_ = single_and_ddp
    _, run = one_run(uri, "ddp")
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.world_size"] == "2"
    assert run.data.params["trainer.nodes_used"] == "1"
    assert run.data.params["trainer.strategy"] == "ddp"


def test_ddp_metrics_match_one_process(single_and_ddp):
    uri, *_ = single_and_ddp
    _, single = one_run(uri, "single")
    client, ddp = one_run(uri, "ddp")
    for key in ("train/loss", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert ddp.data.metrics[key] == pytest.approx(single.data.metrics[key], abs=1e-4), key
    # one value per epoch: no rank but zero logged
    assert epochs_logged(client, ddp.info.run_id) == list(range(30))


def test_ddp_evaluates_every_sample_exactly_once(single_and_ddp):
    _, _, said = single_and_ddp
    for experiment in ("single", "ddp"):
        assert re.search(r"last epoch: .*val/samples=201\b", said[experiment]), experiment
        assert re.search(r"tested checkpoint .*test/samples=201\b", said[experiment]), experiment


def test_ddp_checkpoints_and_model_belong_to_the_run(single_and_ddp):
    uri, tmp, _ = single_and_ddp
    client, run = one_run(uri, "ddp")
    checkpoints = tmp / "mlruns" / "ddp" / run.info.run_id / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.predict(np.array([[0.0, 0.5], [1.0, -0.5]], dtype=np.float32)).shape == (2, 1)
    assert not list((tmp / "mlruns" / "ddp").glob("None*")), "a rank wrote its own folder"


def test_global_batch_keeps_the_batch_when_devices_change(tmp_path):
    """`--data.global_batch true`: batch 64 on 2 devices is 32 per device, 64 per step."""
    uri = store_uri(tmp_path)
    result = run_mlplab(
        "fit", "--config", config("moons"), *DDP_CPU, "--data.global_batch", "true",
        "--data.batch_size", "64", "--trainer.max_epochs", "2", "--trainer.callbacks", "[]",
        "--test_after_fit", "false", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = one_run(uri, "moons")
    # 400 points, 200 per rank, batches of 32: 7 optimiser steps per epoch on every rank
    checkpoint = tmp_path / "mlruns" / "moons" / run.info.run_id / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2 * 7


def test_torchrun_script_launches_ranks_that_log_one_run(tmp_path):
    """scripts/torchrun.sh on CPU: torchrun starts the ranks, Lightning reads its variables."""
    uri = store_uri(tmp_path)
    venv_bin = str(Path(sys.executable).parent)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "torchrun.sh"), config("moons"),
         "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--trainer.callbacks", "[]",
         "--data.batch_size", "0", "--test_after_fit", "false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "GPUS_PER_NODE": "2",
             "MASTER_PORT": "29533", "MLFLOW_TRACKING_URI": uri},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    _, run = one_run(uri, "moons")
    assert run.data.params["trainer.world_size"] == "2"


SLURM = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mlplab", "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
    "SLURM_NODELIST": "node[1-2]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
}  # fmt: skip


@pytest.mark.parametrize("plugins", [[], ["--trainer.plugins", "LightningEnvironment"]],
                         ids=["mlplab's plugin", "a config's own plugin"])  # fmt: skip
def test_simulated_slurm_job_picks_the_ranks_and_its_own_requeue_folder(store, monkeypatch,
                                                                          plugins):  # fmt: skip
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    # the DDP strategy sets the process-wide rank (3 here): put it back for the other tests
    for rank_zero_only in (lightning_rank_zero_only, utils_rank_zero_only):
        monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    cli = MLPLabCLI(
        args=["--config", config("moons"), "--trainer.accelerator", "cpu",
              "--trainer.devices", "2", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp",
              *plugins],
        run=False,
    )  # fmt: skip
    trainer = cli.trainer
    # whatever the plugins, mlplab's requeue acts on the warning (it owns SIGUSR1)
    assert any(isinstance(cb, SLURMRequeue) for cb in trainer.callbacks)
    if plugins:
        return
    env = trainer.strategy.cluster_environment
    assert type(env).__name__ == "SLURMEnvironment" and not env.auto_requeue
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (3, 1, 1)
    assert trainer.world_size == 4
    assert Path(trainer.default_root_dir) == Path("mlruns") / "slurm-4242"


def test_slurm_requeue_resumes_the_same_mlflow_run(tmp_path):
    """SIGUSR1 as SLURM sends it before the time limit: at the next epoch start the job keeps
    its last checkpoint as the requeue checkpoint and calls `scontrol requeue`, here a stub that
    kills the job as SLURM would. The requeued job (same job id) resumes from that checkpoint
    into the same run and finishes it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/requeued"\nkill -9 $PPID\n')
    scontrol.chmod(0o755)
    uri = store_uri(tmp_path)
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri,
        "SLURM_JOB_ID": "777", "SLURM_JOB_NAME": "mlplab", "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_NODELIST": "node1",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    }  # fmt: skip
    command = [sys.executable, "-m", "mlplab", "fit", "--config", config("moons"),
               "--trainer.max_epochs", "60", "--trainer.callbacks", "[]"]  # fmt: skip
    log = tmp_path / "job.log"
    with log.open("w") as out:
        job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=out)
        run_dirs = tmp_path / "mlruns" / "moons"
        deadline = time.monotonic() + 300
        while not list(run_dirs.glob("*/checkpoints/last.ckpt")):  # a few epochs in
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        job.send_signal(signal.SIGUSR1)
        job.wait(timeout=300)
    assert job.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert (bin_dir / "requeued").read_text().split() == ["requeue", "777"]
    assert list((tmp_path / "mlruns" / "slurm-777").glob("hpc_ckpt_*.ckpt"))
    client, run = one_run(uri, "moons")
    before = epochs_logged(client, run.info.run_id)
    last = run_dirs / run.info.run_id / "checkpoints" / "last.ckpt"
    resumed_epoch = torch.load(last, weights_only=True)["epoch"] + 1  # saved at its end

    requeued = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"mlplab: resuming run {run.info.run_id}" in requeued.stderr
    client, run = one_run(uri, "moons")
    assert run.info.status == "FINISHED"
    # the requeue checkpoint is the newest completed epoch: every epoch exactly once
    assert epochs_logged(client, run.info.run_id) == list(range(60)), (before, resumed_epoch)
