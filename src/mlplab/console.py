"""What a user reads at start-up: Lightning's lines (the seed, the devices) are held until a
stage runs, so a mistake found before that is the last and only thing said."""

from __future__ import annotations

import logging

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder

from mlplab.errors import UserError

# Lightning's lines that mlplab says in its own words (`RunStatus`, `mlplab.safety.interrupts`)
SAID_BY_MLPLAB = ("Detected KeyboardInterrupt", "Received SIGTERM", "Bypassing SIGTERM")


class StartupLines(logging.Filter):
    """On the handler Lightning puts on its `lightning` logger: informational lines wait."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.holding = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().lstrip().startswith(SAID_BY_MLPLAB):
            return False
        if self.holding and record.levelno < logging.WARNING:
            self.held.append(record)
            return False
        return True


class ReleaseStartupLines(Callback):
    """A stage starts (its data, model and optimiser all set up): the held lines are printed,
    and later ones are not held. Also when a tuner is about to search (its own lines follow
    them), when a stage fails for any reason but a mistake or an interrupt (they help to
    diagnose it), and when a stage that never started ends."""

    def release(self, *args, **kwargs) -> None:
        for handler in logging.getLogger("lightning").handlers:
            for held in [f for f in handler.filters if isinstance(f, StartupLines)]:
                held.holding = False
                for record in held.held:
                    handler.handle(record)
                held.held.clear()

    on_fit_start = on_validation_start = on_test_start = on_predict_start = teardown = release

    def setup(self, trainer, pl_module, stage: str) -> None:
        if any(isinstance(cb, BatchSizeFinder | LearningRateFinder) for cb in trainer.callbacks):
            self.release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, UserError | KeyboardInterrupt):  # mistakes, Ctrl-C, SIGTERM
            self.release()


def hold_startup_lines() -> None:
    """From here to the next stage's start (Lightning's handler exists once it is imported)."""
    for handler in logging.getLogger("lightning").handlers:
        held = [f for f in handler.filters if isinstance(f, StartupLines)]
        if held:
            held[0].holding = True
            held[0].held.clear()
        else:
            handler.addFilter(StartupLines())
