"""Callbacks the tests put into a fit by `class_path` (with `tests/` on PYTHONPATH)."""

import time

from lightning.pytorch import Callback


class EpochDelay(Callback):
    """Lengthens each training epoch, so a test can act while a fit is under way."""

    def __init__(self, seconds: float = 0.25) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        time.sleep(self.seconds)
