"""A command's imports are left out of the cyclic collector's walks (`mlplab.speed.collector`):
frozen once its config is parsed, and the rest as it exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import atexit, gc, sys
from mlplab.main import main
print("before", gc.get_freeze_count(), flush=True)
atexit.register(lambda: print("at exit", gc.get_freeze_count(), flush=True))  # runs after mlplab's
main(sys.argv[1:])
print("after", gc.get_freeze_count(), flush=True)
"""


def test_a_fit_freezes_its_imports_once_parsed_and_the_rest_at_exit(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, "fit", "--config", str(ROOT / "configs" / "xor.yaml"),
         "--trainer.max_epochs=2", "--log_system_metrics=false",
         f"--tracking_uri=sqlite:///{tmp_path}/mlflow.db"],  # fmt: skip
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    counts = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines()
                  if line.startswith(("before", "after", "at exit")))  # fmt: skip
    before, after, at_exit = (int(counts[k]) for k in ("before", "after", "at exit"))
    assert before == 0
    assert after > 100_000  # torch, Lightning and MLflow: frozen when the config was parsed
    assert at_exit > after  # what the fit made since, frozen as the process ended
