"""SLURM requeue at a safe point.

Lightning's own auto-requeue does its work inside the signal handler: it finalises the logger and
writes a checkpoint wherever the main thread happens to be. Measured here, that breaks twice:
a signal landing inside an MLflow write re-enters SQLAlchemy and the job dies with a traceback,
and the mid-epoch checkpoint resumes by skipping the rest of that epoch (its validation
included). mlplab's handler only notes the signal; at the next epoch start the run's
end-of-epoch `last.ckpt` becomes Lightning's requeue checkpoint (`hpc_ckpt_<n>.ckpt`, which a
requeued job resumes from by itself) and the job is requeued. SLURM's warning (`--signal
SIGUSR1@SECONDS`) must therefore come at least one epoch before the time limit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mlplab.safety import interrupts
from mlplab.safety.checkpoints import latest_checkpoint
from mlplab.safety.resume import hpc_checkpoint


def slurm_job_id() -> str:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


class SLURMRequeue(Callback):
    """On SLURM's warning signal (noted by `mlplab.safety.interrupts` from start-up on): at the next
    epoch start, keep the last checkpoint for the requeued job and `scontrol requeue` this one
    (use with `SLURMEnvironment(auto_requeue=False)`). A signal that came before the fit
    requeues at its first epoch start; one after it changes nothing (the job finishes)."""

    def __init__(self) -> None:
        self.requeued = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and signal.getsignal(signal.SIGUSR1) is not interrupts.on_requeue_signal:
            signal.signal(signal.SIGUSR1, interrupts.on_requeue_signal)  # not run by `mlplab`

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # every rank got the signal from srun; agree anyway, so rank 0 acts if any rank heard it
        wanted = interrupts.State.requeue_wanted
        if self.requeued or not trainer.strategy.reduce_boolean_decision(wanted, all=False):
            return
        self.requeued = True
        previous = hpc_checkpoint(trainer.default_root_dir)
        number = int(previous.stem.rpartition("_")[2]) + 1 if previous else 1
        hpc_path = os.path.join(trainer.default_root_dir, f"hpc_ckpt_{number}.ckpt")
        last = latest_checkpoint(trainer)
        if trainer.is_global_zero:
            os.makedirs(trainer.default_root_dir, exist_ok=True)
        if last and os.path.isfile(last):
            if trainer.is_global_zero:
                shutil.copyfile(last, hpc_path)
        else:  # no end-of-epoch checkpoint: this is an epoch boundary too
            trainer.save_checkpoint(hpc_path)
        if not trainer.is_global_zero:
            return
        for older in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"):
            if older != Path(hpc_path):  # the requeued job resumes from the newest alone
                older.unlink(missing_ok=True)
        job = slurm_job_id()
        rank_zero_info(f"mlplab: requeueing SLURM job {job}; it resumes from {hpc_path}")
        result = subprocess.run(["scontrol", "requeue", job], check=False)
        if result.returncode != 0:
            rank_zero_warn(f"`scontrol requeue {job}` failed with exit code {result.returncode}")
