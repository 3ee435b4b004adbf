"""Which checkpoint a `fit` resumes from, and so which MLflow run it continues.

The run id travels in every checkpoint (`mlplab.safety.metadata`); the logger must know it
before Lightning opens the run, that is before the checkpoint is restored, so it is resolved here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from mlplab.errors import UserError
from mlplab.safety import metadata
from mlplab.safety.trust import read_checkpoint


def check_fits(path: str | Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights have the model's names and shapes, or a one-line error naming
    the first difference (Lightning would fail with a long traceback from `load_state_dict`)."""
    saved = read_checkpoint(path)["state_dict"]
    expected = model.state_dict()
    problems = [
        f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected.keys() & saved.keys()
        if saved[k].shape != expected[k].shape
    ]
    problems += [f"{k} missing from the checkpoint" for k in expected.keys() - saved.keys()]
    problems += [f"{k} is not in the model" for k in saved.keys() - expected.keys()]
    if problems:
        raise UserError(
            f"checkpoint {path} belongs to another model ({sorted(problems)[0]}); "
            "use it with the config it was trained with"
        )


def check_resumable(path: str | Path) -> None:
    """A fit resumes from a checkpoint with its optimiser's state, or one line says so
    (Lightning raises a KeyError deep in its restore)."""
    if "optimizer_states" not in read_checkpoint(path):
        raise UserError(
            f"checkpoint {path} holds weights only (checkpoint.save_weights_only), not the "
            "state a fit resumes from; resume from one a fit wrote without save_weights_only, "
            "or test or predict with this one"
        )


def newest_last_checkpoint(experiment_dir: Path) -> Path:
    """`--ckpt_path last`: the most recently written `last.ckpt` of the experiment's runs."""
    candidates = list(experiment_dir.glob("*/checkpoints/last.ckpt"))
    if not candidates:
        raise UserError(
            f"--ckpt_path last: no run of this experiment has a last.ckpt "
            f"(looked in {experiment_dir}/*/checkpoints/); train it first or give a checkpoint file"
        )
    return max(candidates, key=lambda path: path.stat().st_mtime)


def hpc_checkpoint(default_root_dir: str | Path) -> Path | None:
    """The checkpoint Lightning saved on SLURM's requeue signal (`hpc_ckpt_<n>.ckpt`, highest n),
    which it resumes from by itself when a requeued job starts."""
    found = {}
    for path in Path(default_root_dir).glob("hpc_ckpt_*.ckpt"):
        match = re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name)
        if match:
            found[int(match.group(1))] = path
    return found[max(found)] if found else None


def slurm_root_dir(default_root_dir: str) -> str:
    """Under SLURM, a job's own folder for Lightning's requeue checkpoints: they are resumed by
    whichever job finds them, so they must not sit in the store's shared root."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    name = f"slurm-{job}" + (f"_{task}" if task else "")
    return str(Path(default_root_dir) / name) if job else default_root_dir


def resolve_resume(
    ckpt_path: str | None, experiment_dir: Path, default_root_dir: str, fit: bool = True
) -> tuple[str | None, Path | None]:
    """(the `ckpt_path` to hand to Lightning, the checkpoint file a fit resumes from).

    `last` becomes the newest `last.ckpt` of the experiment (Lightning would look only in the
    new run's empty folder); on SLURM with no `ckpt_path`, a requeued job continues the run its
    requeue checkpoint names.
    """
    if ckpt_path == "last":
        path = newest_last_checkpoint(experiment_dir)
        return str(path), path
    if ckpt_path == "hpc" or (fit and ckpt_path is None and SLURMEnvironment.detect()):
        path = hpc_checkpoint(default_root_dir)
        if path is None:
            if ckpt_path == "hpc":
                raise UserError(f"--ckpt_path hpc: no hpc_ckpt_*.ckpt in {default_root_dir}")
            return None, None
        # Lightning writes it the moment the signal arrives, mid-epoch, and resuming mid-epoch
        # skips the rest of that epoch's work (its validation included). The run's last
        # end-of-epoch checkpoint costs at most one epoch and keeps the history whole.
        run_id = metadata.run_id(path)
        last = experiment_dir / str(run_id) / "checkpoints" / "last.ckpt"
        if run_id is not None and last.is_file():
            return str(last), last
        return ckpt_path, path
    if ckpt_path in (None, "best"):
        return ckpt_path, None
    path = Path(ckpt_path)
    read_checkpoint(path)
    return ckpt_path, path
