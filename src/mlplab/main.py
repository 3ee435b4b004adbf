"""The `mlplab` command: one dispatcher for LightningCLI's subcommands and mlplab's own.

Kept free of heavy imports, so `mlplab --help` answers at once; each command imports what it
needs when it runs.
"""

from __future__ import annotations

import importlib
import os
import sys

# mlplab's own commands and their modules (each has a `main(argv)`)
COMMANDS = {
    "sweep": "mlplab.commands.sweep",
    "search": "mlplab.commands.search",
    "baseline": "mlplab.commands.baseline",
    "runs": "mlplab.tracking.runs",
    "export": "mlplab.commands.export",
    "reproduce": "mlplab.commands.reproduce",
    "sync": "mlplab.tracking.journal",
    "server": "mlplab.tracking.server",
    "new": "mlplab.commands.new",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

USAGE = """usage: mlplab COMMAND [options]

Train, evaluate and track networks with PyTorch Lightning and MLflow.

LightningCLI commands (settings from YAML configs and dotted flags):
  fit        train, test the best checkpoint, log the model to MLflow
  validate   evaluate a checkpoint on the validation split
  test       evaluate a checkpoint on the test split
  predict    predictions over a config's data; or --model M --input FILE for a file

mlplab's commands:
  sweep      a grid as MLflow parent and child runs
  search     an Optuna search (pruned, resumable) as MLflow parent and child runs
  baseline   a scikit-learn estimator on mlplab data, tracked like a fit
  runs       an experiment's runs as a table
  export     a checkpoint as ONNX, checked against it
  reproduce  every seed experiment, written to docs/RESULTS.md
  sync       send what runs kept while their tracking server was away
  server     an MLflow tracking server on loopback (PostgreSQL or SQLite)
  new        a project of your own: the template's package and configs under a new name

`mlplab COMMAND --help` lists a command's options, e.g. `mlplab fit --help`.
"""


def _quiet() -> None:
    """Silence advice that does not apply to in-memory data and epoch-level logging."""
    import logging
    import warnings

    # by message: these warnings have no category of their own (Lightning's PossibleUserWarning,
    # UserWarning, FutureWarning carry advice that should show), and Python filters by message
    for message in (
        r".*does not have many workers",  # batches are tensor slices: workers would only add IPC
        r".*smaller than the logging interval",  # mlplab logs per epoch
        r".*LeafSpec",  # a deprecation inside Lightning itself
        r".*args parameter is intended",  # `mlplab reproduce` drives the CLI from Python
        r".*configured with multiple `ModelCheckpoint`",  # the first is the best: as intended
        r".*The `srun` command is available",  # scripts/slurm/ runs mlplab under srun
        # `seed_everything: true` (LightningCLI's default): said before a mistake in the data
        # is found; Lightning's "Seed set to 0" line, held until a stage starts, says it too
        r"No seed found, seed set to",
    ):
        warnings.filterwarnings("ignore", message=message)
    # `mlflow.pytorch` calls `logging.basicConfig` on import (mlflow 3.17,
    # mlflow/pytorch/_lightning_autolog.py): with a root handler already there it does nothing,
    # and Lightning's lines of a later fit (a search's next trial) are not doubled as "INFO:..."
    logging.getLogger().addHandler(logging.NullHandler())
    # MLflow logs each database error with its traceback, then raises it: the raised one is
    # what mlplab reports (a full disk in one line, anything else as it is). Its internal
    # module's logger: MLflow has no public switch for one module's lines
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # Lightning's advertisements ("💡 Tip: ... litmodels/litlogger"), by their text: no switch
    # silences them (Lightning-AI/pytorch-lightning#21294)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip")
    )


def _leave_process_group() -> None:
    """DDP ranks wait for rank zero (logging the model) and close the process group together:
    a rank exiting with its gloo threads still running aborts ("terminate called without an
    active exception"), seen here one run in a few."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _run(argv: list[str]) -> None:
    command = argv[0] if argv else None
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command]).main(argv[1:])
    elif command == "predict" and "--input" in argv:
        from mlplab.commands.predict import main as predict_main

        predict_main(argv[1:])
    else:
        from mlplab.cli import MLPLabCLI

        MLPLabCLI(args=argv)
        _leave_process_group()


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    if argv[0] not in (*COMMANDS, *LIGHTNING_COMMANDS):
        print(f"mlplab: error: unknown command {argv[0]!r}; `mlplab --help` lists them",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    # a datamodule or network in the working directory imports by `class_path`, as it does
    # with `python -m mlplab` (appended: it cannot shadow an installed package)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # an unreachable tracking server fails in seconds, not after MLflow's minutes of retries;
    # a slow one (a busy shared server) gets a minute an answer
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    from mlplab.safety import interrupts
    from mlplab.speed import collector

    collector.freeze_at_exit()
    interrupts.install()
    try:
        _quiet()
        from mlplab.errors import UserError, disk_full, refused

        try:
            _run(argv)
            interrupts.check()  # a SIGTERM a stage ended before acting on
        except UserError as err:  # Lightning has already marked a started run FAILED
            from mlplab.tracking.store import redact_uri

            print(f"mlplab: error: {redact_uri(str(err))}", file=sys.stderr)
            sys.exit(err.exit_code)
        except ModuleNotFoundError as err:  # an optional package a chosen class needs
            print(f"mlplab: error: {str(err).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        except Exception as err:
            said = refused(err)  # a tracking server turned the client away mid-command
            if said is not None:
                print(f"mlplab: error: {said}", file=sys.stderr)
                sys.exit(2)
            full = disk_full(err)
            if full is None:
                raise
            print(f"mlplab: error: {full}; free some space and run again (earlier runs are "
                  "kept)", file=sys.stderr)  # fmt: skip
            sys.exit(1)
    except BaseException as err:  # Ctrl-C or SIGTERM, at start-up, in a stage or after it
        code = interrupts.exit_code(err)
        if code is None:
            raise
        interrupts.leave(code)


if __name__ == "__main__":
    main()
