"""Run safety: checkpoints read as data (`trust`), resuming the run a checkpoint belongs to,
the checkpoint callbacks, signals and SLURM requeues ending runs with the right status."""
