"""`mlplab fit|validate|test|predict --config configs/NAME.yaml`: LightningCLI wired to MLflow."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mlplab.data.base import ArrayDataModule
from mlplab.errors import UserError
from mlplab.models.tasks import MLPTask
from mlplab.predict import PredictionWriter
from mlplab.resume import (
    check_fits,
    read_checkpoint,
    resolve_resume,
    run_id_in_checkpoint,
    slurm_root_dir,
)
from mlplab.slurm import SLURMRequeue
from mlplab.tracking import (
    MLflowLogger,
    MLflowSaveConfig,
    RunStatus,
    check_reachable,
    experiment_dir,
    log_model,
    register_model,
    run_exists,
)


class _Parser(LightningArgumentParser):
    """jsonargparse's parser, but a mistake prints the error and a tip, not 100 lines of usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {message}\ntip: `{prog} --help` lists the options\n")
        self.exit(2)


class MLPLabCLI(LightningCLI):
    """LightningCLI with shapes linked from data to model, MLflow as the logger, and a `fit`
    that ends with the best checkpoint evaluated on the test split and logged as a model."""

    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            MLPTask,
            ArrayDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=MLflowSaveConfig,
            save_config_kwargs={"save_to_log_dir": False},
            auto_configure_optimizers=False,
            parser_class=_Parser,
            parser_kwargs={
                "description": "Train, evaluate and track MLPs. Also: mlplab sweep | baseline | "
                "runs | export | reproduce | predict --model M --input X (each with --help)."
            },
            # with the logger off, checkpoints go to mlruns/checkpoints/, not the working directory
            trainer_defaults={"default_root_dir": "mlruns"},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--experiment_name",
            type=str | None,
            default=None,
            help="MLflow experiment (default: the first config file's name)",
        )
        parser.add_argument("--run_name", type=str | None, default=None, help="MLflow run name")
        parser.add_argument(
            "--tracking_uri",
            type=str | None,
            default=None,
            help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)",
        )
        parser.add_argument(
            "--tags", type=dict[str, str] | None, default=None, help="extra MLflow run tags"
        )
        parser.add_argument(
            "--register_model",
            type=str | None,
            default=None,
            help="fit: register the logged model in the MLflow Model Registry under this name",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="fit: evaluate the best checkpoint on the test split, if the data has one",
        )
        parser.add_argument(
            "--num_threads",
            type=int,
            default=1,
            help="torch CPU threads; 1 suits small MLPs best (0 keeps torch's default)",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": MLPTask.monitor,
                "checkpoint.filename": "best-{epoch}",
                "checkpoint.save_last": True,
            }
        )
        parser.link_arguments(
            "data.num_features", "model.init_args.num_features", apply_on="instantiate"
        )
        # classification data has num_classes, regression data num_targets: jsonargparse skips the
        # link whose source attribute the chosen datamodule lacks
        for shape in ("num_classes", "num_targets"):
            parser.link_arguments(
                f"data.{shape}", f"model.init_args.{shape}", apply_on="instantiate"
            )
        parser.link_arguments(
            "data.standardize", "model.init_args.standardize", apply_on="instantiate"
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning restores the model's settings from `--ckpt_path`'s hyperparameters; an
        unreadable file, or one of another model, stops with one line instead of a dump."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return
        if "_class_path" not in read_checkpoint(path).get("hyper_parameters", {}):
            return  # not written through the CLI: Lightning cannot parse it; the config rules
        parsers = [self.parser, self.parser._subcommands_action._name_parser_map[subcommand]]
        for parser in parsers:
            parser.exit_on_error = False
        try:
            super()._parse_ckpt_path()
        except ArgumentError as err:
            lines = [line.strip() for line in str(err).splitlines()]
            reason = next((line for line in lines if "not accepted" in line), lines[0])
            raise UserError(
                f"checkpoint {path} belongs to another model ({reason}); use it with the "
                "config it was trained with"
            ) from None
        finally:
            for parser in parsers:
                parser.exit_on_error = True

    @property
    def command_config(self):
        """The running subcommand's settings (all of them with `run=False`)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        threads = self.command_config.num_threads
        if threads > 0:
            torch.set_num_threads(threads)

    def instantiate_trainer(self, **kwargs):
        config = self.command_config
        trainer = self._get(self.config_init, "trainer", default={})
        unsupported = {  # checked before any MLflow run exists
            "gradient_clip_val": (None, "remove it"),
            "accumulate_grad_batches": (1, "remove it and raise data.batch_size instead"),
        }
        for key, (off, fix) in unsupported.items():
            if trainer.get(key) not in (off, 0):
                raise UserError(
                    f"trainer.{key} does not apply: mlplab's tasks step the optimiser once per "
                    f"batch themselves; {fix}"
                )
        callbacks = [RunStatus()]
        if SLURMEnvironment.detect():
            if trainer.get("default_root_dir") == "mlruns":
                trainer["default_root_dir"] = slurm_root_dir("mlruns")  # requeue checkpoints
            if self.subcommand in ("fit", None) and trainer.get("plugins") is None:
                # requeue at an epoch boundary, not inside the signal handler (see mlplab.slurm)
                trainer["plugins"] = [SLURMEnvironment(auto_requeue=False)]
                callbacks.append(SLURMRequeue())
        trainer["callbacks"] = [*(trainer.get("callbacks") or []), *callbacks]
        experiment = config.get("experiment_name") or self.config_name()
        checkpoint = self.resolve_checkpoint(experiment) if self.subcommand else None
        wanted = trainer.get("logger")
        if self.subcommand == "predict":
            kwargs["logger"] = False
            kwargs["callbacks"] = [PredictionWriter()]
        elif wanted is None or wanted is True:
            if rank_zero_only.rank == 0:
                check_reachable(config.tracking_uri)
            kwargs["logger"] = MLflowLogger(
                experiment_name=experiment,
                run_name=config.run_name,
                tracking_uri=config.tracking_uri,
                tags={**(config.get("tags") or {}), "mlplab.command": self.subcommand},
                run_id=self.resumed_run(checkpoint) if self.subcommand == "fit" else None,
            )
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        if config.get("enable_checkpointing") is False:  # the user's word beats our checkpoint
            callbacks = [
                callback for callback in callbacks if not isinstance(callback, ModelCheckpoint)
            ]
        return super()._instantiate_trainer(config, callbacks)

    def resolve_checkpoint(self, experiment: str) -> Path | None:
        """The checkpoint `--ckpt_path` names (`last`: the experiment's newest; on SLURM, a
        requeued fit's), checked to exist and to fit the model before anything starts."""
        config, init = self.config[self.subcommand], self.config_init[self.subcommand]
        if "ckpt_path" not in init:
            return None
        ckpt_path, checkpoint = resolve_resume(
            init.ckpt_path,
            experiment_dir(experiment, config.get("tracking_uri")),
            init.trainer.default_root_dir,
            fit=self.subcommand == "fit",
        )
        config.ckpt_path = init.ckpt_path = ckpt_path
        if checkpoint is not None:
            check_fits(checkpoint, self.model)
        return checkpoint

    def resumed_run(self, checkpoint: Path | None) -> str | None:
        """The MLflow run a resumed fit continues: the one its checkpoint was written by."""
        run_id = run_id_in_checkpoint(checkpoint) if checkpoint is not None else None
        if run_id is None or rank_zero_only.rank != 0:
            return run_id
        if not run_exists(self.config.fit.tracking_uri, run_id):
            print(
                f"mlplab: {checkpoint} was written by run {run_id}, which this store has not "
                "got; resuming the training into a new run",
                file=sys.stderr,
            )
            return None
        print(f"mlplab: resuming run {run_id} from {checkpoint}", file=sys.stderr)
        return run_id

    def config_name(self) -> str:
        """The first config file's stem (`configs/xor.yaml` -> `xor`), else the data's class."""
        files = self.command_config.get("config") or []
        if files:
            return Path(str(files[0])).stem
        return type(self.datamodule).__name__.removesuffix("DataModule").lower()

    def after_fit(self) -> None:
        trainer, datamodule = self.trainer, self.datamodule
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        metrics = dict(trainer.callback_metrics)  # the last epoch's, before testing replaces them
        if self.config.fit.test_after_fit and "test" in getattr(datamodule, "splits", ()):
            trainer.test(self.model, datamodule=datamodule, ckpt_path="best" if best else None)
            metrics.update(trainer.callback_metrics)
        elif best:
            state = torch.load(best, map_location=self.model.device, weights_only=False)
            self.model.load_state_dict(state["state_dict"])
        if not trainer.is_global_zero:
            return
        print(
            "mlplab: "
            + "  ".join(
                f"{k}={float(v):.0f}" if k.endswith("/samples") else f"{k}={float(v):.4f}"
                for k, v in sorted(metrics.items())
                if "/" in k
            )
        )
        logger = trainer.logger
        if isinstance(logger, MLflowLogger):
            uri = log_model(logger, self.model, datamodule.data["train"][0])
            print(f"mlplab: run {logger.run_id} ({logger.name}), model {uri}")
            if self.config.fit.register_model:
                register_model(uri, self.config.fit.register_model, logger._tracking_uri)


def _quiet() -> None:
    """Silence advice that does not apply to in-memory data and epoch-level logging."""
    for message in (
        r".*does not have many workers",  # batches are tensor slices: workers would only add IPC
        r".*smaller than the logging interval",  # mlplab logs per epoch
        r".*LeafSpec",  # a deprecation inside Lightning itself
        r".*args parameter is intended",  # `mlplab reproduce` drives the CLI from Python
    ):
        warnings.filterwarnings("ignore", message=message)
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


def main(args: list[str] | None = None) -> None:
    _quiet()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # an unreachable tracking server fails in seconds, not after MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["reproduce"]:
            from mlplab.reproduce import main as reproduce_main

            reproduce_main(argv[1:])
        elif argv[:1] == ["sweep"]:
            from mlplab.sweep import main as sweep_main

            sweep_main(argv[1:])
        elif argv[:1] == ["baseline"]:
            from mlplab.baseline import main as baseline_main

            baseline_main(argv[1:])
        elif argv[:1] == ["export"]:
            from mlplab.export import main as export_main

            export_main(argv[1:])
        elif argv[:1] == ["runs"]:
            from mlplab.runs import main as runs_main

            runs_main(argv[1:])
        elif argv[:1] == ["predict"] and "--input" in argv:
            from mlplab.predict import main as predict_main

            predict_main(argv[1:])
        else:
            MLPLabCLI(args=args)
            _leave_process_group()
    except UserError as err:  # Lightning has already marked a started run FAILED
        print(f"mlplab: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except SIGTERMException:  # `RunStatus` has marked the run KILLED and said so
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # outside training (Lightning handles it inside)
        print("mlplab: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
