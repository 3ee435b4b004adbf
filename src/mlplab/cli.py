"""`mlplab fit|validate|test|predict --config configs/NAME.yaml`: LightningCLI wired to MLflow."""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from mlplab.commands.predict import PredictionWriter
from mlplab.console import ReleaseStartupLines, hold_startup_lines
from mlplab.errors import UserError, parse_cause, say_mistake
from mlplab.safety import interrupts, metadata
from mlplab.safety.checkpoints import Checkpoint, latest_checkpoint
from mlplab.safety.divergence import Divergence
from mlplab.safety.resume import check_fits, check_resumable, resolve_resume, slurm_root_dir
from mlplab.safety.slurm import SLURMRequeue
from mlplab.safety.trust import read_checkpoint, resolve_class, trust_checkpoints
from mlplab.speed import collector
from mlplab.speed.fast_path import FastPath
from mlplab.tracking import provenance
from mlplab.tracking.logged_models import log_model
from mlplab.tracking.logger import MLflowRunLogger, MLflowSaveConfig, RunStatus, given_settings
from mlplab.tracking.store import experiment_dir, open_store, run_exists
from mlplab.tracking.system_metrics import SystemMetrics

DESCRIPTION = (
    "Train, evaluate and track networks with Lightning and MLflow. Also: mlplab sweep | baseline "
    "| runs | export | reproduce | predict --model M --input X (each with --help)."
)


class _Parser(LightningArgumentParser):
    """jsonargparse's parser, but a mistake prints the error and a tip, not 100 lines of usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        # jsonargparse names the subcommand missing its model and data only in this text
        missing = re.search(r"arguments are required: (fit|validate|test|predict)\.", message)
        if missing:  # neither a config nor a checkpoint to take one from
            prog = f"mlplab {missing.group(1)}"
            message = ("no model and data: give --config CONFIG.yaml, or --ckpt_path of a "
                       "checkpoint `mlplab fit` wrote")  # fmt: skip
        message = parse_cause(message)
        sys.stderr.write(say_mistake(prog, message))
        self.exit(2)


def flag_values(args: list[str], names: tuple[str, ...]) -> list[tuple[int, str]]:
    """(position, value) of each `--name VALUE` or `--name=VALUE` among `args`, in order."""
    found = []
    for at, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if flag in names:
            found.append((at, value if equals else (args[at + 1] if at + 1 < len(args) else "")))
    return found


# what `validate|test|predict --ckpt_path X` takes from the config a checkpoint carries: the
# model, the data and the experiment. Where runs go (store, logger, folders), which checkpoint,
# how it is read, and any other Trainer setting stay the user's: the file chose them.
CHECKPOINT_SETTINGS = ("seed_everything", "model", "data", "experiment_name")
CHECKPOINT_TRAINER_SETTINGS = ("callbacks", "precision", "enable_progress_bar")


def with_checkpoint_config(args: list[str]) -> list[str]:
    """`validate|test|predict --ckpt_path X` with neither `--config` nor `--model`: the model,
    the data and the experiment the checkpoint was trained with (`CHECKPOINT_SETTINGS`, checked
    by `mlplab.safety.trust`) go first."""
    import yaml

    flags = [arg.split("=", 1)[0] for arg in args]
    if flags[:1] not in (["validate"], ["test"], ["predict"]) or "--ckpt_path" not in flags:
        return args
    if {"--config", "-c", "--model"} & set(flags):
        return args
    path = flag_values(args, ("--ckpt_path",))[-1][1]
    if not Path(path).is_file():
        if path in ("", "last", "best", "hpc", "registry") or path.startswith("registry:"):
            return args  # Lightning's names for a checkpoint it finds
        raise UserError(f"checkpoint {path} does not exist; give a .ckpt file or `last`")
    config = metadata.config(path)
    if config is None:
        raise UserError(f"{path} carries no config (not written by `mlplab fit`); add --config")
    config = yaml.safe_load(config)  # read and checked by `read_checkpoint`
    settings = {key: config[key] for key in CHECKPOINT_SETTINGS if key in config}
    trainer = config.get("trainer") or {}
    settings["trainer"] = {k: trainer[k] for k in CHECKPOINT_TRAINER_SETTINGS if k in trainer}
    return [args[0], "--config", yaml.safe_dump(settings), *args[1:]]


def with_weights_only(args: list[str]) -> list[str]:
    """Lightning reads `--ckpt_path` with `weights_only=True` (a checkpoint is data) unless the
    user's flags or config say `weights_only: false`; Lightning's own default, None, leaves it
    to an environment variable of PyTorch's. The user's word (the last, as for any flag) is
    recorded before any read."""
    flags = [arg.split("=", 1)[0] for arg in args]
    if flags[:1] not in (["fit"], ["validate"], ["test"], ["predict"]):
        return args
    given = flag_values(args, ("--weights_only",))
    trust_checkpoints(bool(given) and given[-1][1].lower() == "false")
    return [args[0], "--weights_only", "true", *args[1:]]


def check_config_files(args: list[str]) -> list[str]:
    """Each `--config` file is text YAML with settings in it: said in one line naming the file
    (jsonargparse reports a binary file with a traceback, a syntax error in "<unicode string>",
    an empty file as "Unexpected config: ")."""
    import yaml

    for _, path in flag_values(args, ("--config", "-c")):
        if not Path(path).is_file():
            continue  # YAML text, or a missing file: jsonargparse says so
        try:
            content = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"config {path} is not a text file; give a YAML config") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UserError(f"config {path}: YAML syntax error{where}: {problem}") from None
        if content is None:
            raise UserError(f"config {path} is empty; write its settings, or leave it out")
        if not isinstance(content, dict):
            raise UserError(f"config {path} is not a mapping of settings (model:, data:, ...)")
    return args


def with_experiment_name(args: list[str]) -> list[str]:
    """The experiment is named after the first config file: given as a setting ahead of that
    file, so the file (a printed config fed back) and later flags still decide, and
    `--print_config` shows the name the run will use."""
    flags = [arg.split("=", 1)[0] for arg in args]
    if "--experiment_name" in flags:
        return args
    for at, path in flag_values(args, ("--config", "-c")):
        if path.endswith((".yaml", ".yml", ".json")):  # a file, not YAML text
            return [*args[:at], "--experiment_name", Path(path).stem, *args[at:]]
    return args


class MLPLabCLI(LightningCLI):
    """LightningCLI with shapes linked from data to model, MLflow as the logger, and a `fit`
    that ends with the best checkpoint evaluated on the test split and logged as a model.

    Any LightningModule and LightningDataModule subclass is accepted by `class_path`."""

    def __init__(
        self, args: list[str] | None = None, run: bool = True, callbacks: Iterable[Callback] = ()
    ) -> None:
        """`callbacks` join the Trainer's whatever the config says (a search's pruning)."""
        hold_startup_lines()
        self.given_args = list(sys.argv[1:] if args is None else args)  # as the user typed them
        args = with_experiment_name(
            with_checkpoint_config(with_weights_only(check_config_files(self.given_args)))
        )
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=MLflowSaveConfig,
            # the settings the config files and flags name: params even where they equal a default
            save_config_kwargs={"save_to_log_dir": False, "given": given_settings(args)},
            auto_configure_optimizers=False,
            parser_class=_Parser,
            parser_kwargs={"description": DESCRIPTION, "prog": "mlplab"},  # not `__main__.py`
            # with the logger off, checkpoints go to mlruns/checkpoints/, not the working directory
            trainer_defaults={"default_root_dir": "mlruns", "callbacks": list(callbacks)},
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
            "--register_alias",
            type=str | None,
            default="candidate",
            help="fit: the registry alias set on the registered version (models:/NAME@ALIAS)",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="fit: evaluate the best checkpoint on the test split, if the data has one",
        )
        parser.add_argument(
            "--log_system_metrics",
            type=bool | None,
            default=None,
            help="CPU, memory, disk, network, GPU metrics in the run (default: on, unless "
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false)",
        )
        parser.add_argument(
            "--num_threads",
            type=int,
            default=1,
            help="torch CPU threads; 1 suits small MLPs best (0 keeps torch's default)",
        )
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(FastPath, "fast_path")
        parser.add_lightning_class_args(Divergence, "divergence")
        parser.set_defaults(
            {
                # none given: `val/loss` where the module logs it, else Lightning's default,
                # the latest checkpoint (chosen at the first save: `Checkpoint`)
                "checkpoint.monitor": None,
                "checkpoint.filename": "best-{epoch}",
                "checkpoint.save_last": True,
            }
        )
        # Shapes flow from the data into the task, which builds its network with them. A link
        # is skipped where the datamodule lacks its source (classification data has
        # num_classes, regression data num_targets) or the model lacks its target.
        for shape in ("num_features", "num_classes", "num_targets", "standardize"):
            parser.link_arguments(
                f"data.{shape}", f"model.init_args.{shape}", apply_on="instantiate"
            )

    def _parse_ckpt_path(self) -> None:
        """Lightning takes the model's settings from `--ckpt_path`'s hyperparameters; here they
        come from mlplab's read (`mlplab.safety.trust`), as Lightning takes them: a file that is no
        checkpoint, or holds or names what it may not, is one line, and a file the user trusts
        is read in full (Lightning's own read of the hyperparameters is weights-only always;
        `weights_only` reaches only its restore of the state). One not
        written through the CLI (no `_class_path`) has no settings to take: the config rules.
        (LightningCLI has no public hook for the checkpoint's hyperparameters and reads them
        weights-only always: Lightning-AI/pytorch-lightning#20058, #20801; this overrides its
        private step, which `LightningCLI.__init__` calls after parsing.)"""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        trust_checkpoints(self.config[subcommand].get("weights_only") is False)
        path = self.config[subcommand].get("ckpt_path")
        if not (path and Path(path).is_file()):
            return
        hparams = dict(read_checkpoint(path).get("hyper_parameters", {}))
        if "_class_path" not in hparams:
            return
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path")
        # LightningCLI saves the values linked from the data (num_features, ...) among the
        # hyperparameters even where the module takes none of them: only what it takes
        parameters = inspect.signature(resolve_class(class_path)).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            names = {p.name for p in parameters}
            hparams = {k: v for k, v in hparams.items() if k in names}
        model = {"class_path": class_path, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def instantiate_classes(self) -> None:
        """A class that cannot be built from its settings (a missing optional package, a value
        its `__init__` refuses) is one line naming the class, not jsonargparse's nested dump."""
        collector.settle()  # every class of the config is imported by now
        try:
            super().instantiate_classes()
        except ValueError as err:
            chain = [err]
            while chain[-1].__cause__ is not None:
                chain.append(chain[-1].__cause__)
            mistakes = [e for e in chain if isinstance(e, UserError)]
            if mistakes:  # the class said what is wrong: that line alone
                raise mistakes[0] from None
            # jsonargparse names the class it could not build only in its message
            named = [str(e) for e in chain if "Problem with given class_path" in str(e)]
            given = re.search(r"class_path='([^']+)'", str(chain[0]))
            if not named and not given:
                raise
            class_path = named[-1].split("'")[1] if named else given.group(1)
            reason = str(chain[-1]).strip().splitlines()[0]
            hint = (
                "; install it (`pip install 'mlplab[tensorboard]'` for TensorBoardLogger)"
                if isinstance(chain[-1], ImportError)
                else ""
            )
            raise UserError(f"cannot build {class_path}: {reason}{hint}") from None

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
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = init.get("trainer", {})
        callbacks = [RunStatus(), ReleaseStartupLines(), metadata.CheckpointMetadata()]
        if SLURMEnvironment.detect():
            if trainer.get("default_root_dir") == "mlruns":
                trainer["default_root_dir"] = slurm_root_dir("mlruns")  # requeue checkpoints
            if self.subcommand in ("fit", None):
                # requeue at an epoch boundary, not in the signal handler (see mlplab.safety.slurm);
                # mlplab notes SIGUSR1 from start-up, so Lightning's own requeue never registers,
                # whatever plugins a config sets
                if trainer.get("plugins") is None:
                    trainer["plugins"] = [SLURMEnvironment(auto_requeue=False)]
                callbacks.append(SLURMRequeue())
        trainer["callbacks"] = [*(trainer.get("callbacks") or []), *callbacks]
        # named after the config file (`with_experiment_name`), else after the data's class
        data_name = type(self.datamodule).__name__.removesuffix("DataModule").lower()
        experiment = config.get("experiment_name") or data_name
        config.experiment_name = experiment  # recorded, so a printed or saved config keeps it
        checkpoint = self.resolve_checkpoint(experiment) if self.subcommand else None
        wanted = trainer.get("logger")
        if self.subcommand == "predict":
            kwargs["logger"] = False
            kwargs["callbacks"] = [ReleaseStartupLines(), PredictionWriter()]
        elif wanted is None or wanted is True:
            open_store(config.tracking_uri)  # every rank: none may build the tables in place
            run_id = self.resumed_run(checkpoint) if self.subcommand == "fit" else None
            kwargs["logger"] = MLflowRunLogger(
                experiment_name=experiment,
                run_name=config.run_name or provenance.run_name(experiment, self.given_args[1:]),
                tracking_uri=config.tracking_uri,
                tags={
                    **provenance.tags(
                        self.subcommand,
                        self.given_args[1:],
                        [str(path) for path in config.get("config") or []],
                    ),
                    **(config.get("tags") or {}),
                    "mlplab.command": self.subcommand,
                },
                run_id=run_id,
                unwritten=metadata.unwritten(checkpoint) if run_id else None,
            )
            if self.system_metrics_wanted():
                trainer["callbacks"].append(SystemMetrics())
        return super().instantiate_trainer(**kwargs)

    def system_metrics_wanted(self) -> bool:
        """`--log_system_metrics`, else MLflow's switch where it is set, else on."""
        wanted = self.command_config.get("log_system_metrics")
        if wanted is None:
            from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as switch

            wanted = switch.get() if switch.defined else True
        return wanted

    # LightningCLI hands the callbacks of `add_lightning_class_args` (the checkpoint's latest)
    # only to this private step: no public hook sees them (no upstream issue found)
    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        if config.get("enable_checkpointing") is False:  # the user's word beats our checkpoint
            callbacks = [
                callback for callback in callbacks if not isinstance(callback, ModelCheckpoint)
            ]
        # each `Checkpoint` with `save_last` brings the callback that keeps last.ckpt the latest
        latest = [c.latest for c in callbacks if isinstance(c, Checkpoint) and c.latest]
        try:
            return super()._instantiate_trainer(config, [*callbacks, *latest])
        except MisconfigurationException as err:  # Lightning's own checks of its settings
            raise UserError(f"trainer: {str(err).strip().splitlines()[0]}") from None

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
            if self.subcommand == "fit":
                check_resumable(checkpoint)
        return checkpoint

    def resumed_run(self, checkpoint: Path | None) -> str | None:
        """The MLflow run a resumed fit continues: the one its checkpoint was written by."""
        run_id = metadata.run_id(checkpoint) if checkpoint is not None else None
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

    def can_test(self) -> bool:
        """Whether the module has a test step and a test loader to run it on: the data's (mlplab's
        datamodules name their splits in `splits`), else the module's own, as Lightning picks."""
        data, model = self.datamodule, self.model
        loader = is_overridden("test_dataloader", data, LightningDataModule) and "test" in getattr(
            data, "splits", ("test",)
        )
        return is_overridden("test_step", model, LightningModule) and (
            loader or is_overridden("test_dataloader", model, LightningModule)
        )

    def before_fit(self) -> None:
        for callback in self.trainer.callbacks:  # refused before a run exists
            if isinstance(callback, FastPath):
                callback.refuse_graph(self.trainer, self.model, self.datamodule)
        if isinstance(self.trainer.logger, MLflowRunLogger):
            self.trainer.logger.keep_open = True  # until the test and the model (`after_fit`)

    def after_fit(self) -> None:
        """Test the best checkpoint, log the model, and only then end the run FINISHED: an
        interrupt or an error in between ends it KILLED or FAILED."""
        logger = self.trainer.logger
        if not isinstance(logger, MLflowRunLogger) or not logger.keep_open:
            self.test_and_log_model()  # no run, or Lightning ended it (a stage failed)
            return
        try:
            self.test_and_log_model()
        except BaseException as err:
            with interrupts.deferred():
                logger.finish(err)
            raise
        with interrupts.deferred():  # a signal now ends the process after FINISHED is written
            logger.finish()

    def test_and_log_model(self) -> None:
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        interrupts.check()
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        metrics = dict(trainer.callback_metrics)  # the last epoch's, before testing replaces them
        if self.config.fit.test_after_fit and self.can_test():
            if isinstance(trainer.logger, MLflowRunLogger) and best:  # the tested weights' step
                trainer.logger.tested_step = read_checkpoint(best)["global_step"]
            trainer.test(
                model, datamodule=datamodule, ckpt_path="best" if best else None, weights_only=True
            )
            tested = {k: v for k, v in trainer.callback_metrics.items() if k not in metrics}
        else:
            tested = {}
            if best:
                model.load_state_dict(read_checkpoint(best)["state_dict"])
        if not trainer.is_global_zero:
            return
        # the module's own names (`val/acc`, `valid_loss`), without Lightning's `epoch`/`step`
        # and the `_step`/`_epoch` copies of a metric logged both per step and per epoch; the
        # last epoch's apart from the tested checkpoint's
        def said(values: dict) -> str:
            kept = {
                k: v
                for k, v in values.items()
                if k not in ("epoch", "step")
                and not (k.endswith(("_step", "_epoch")) and k.rsplit("_", 1)[0] in values)
            }
            return "  ".join(
                f"{k}={float(v):.0f}" if k.endswith("/samples") else f"{k}={float(v):.4f}"
                for k, v in sorted(kept.items())
            )

        parts = [("last epoch", said(metrics))]
        if tested:
            epoch = read_checkpoint(best)["epoch"] if best else trainer.current_epoch - 1
            parts.append((f"tested checkpoint (epoch {epoch})", said(tested)))
        if any(text for _, text in parts):
            print("mlplab: " + ";  ".join(f"{name}: {text}" for name, text in parts if text))
        logger = trainer.logger
        if not isinstance(logger, MLflowRunLogger):
            return
        fit = self.config.fit
        register = (fit.register_model, fit.register_alias) if fit.register_model else None
        interrupts.check()
        step = read_checkpoint(best)["global_step"] if best else trainer.global_step
        source = datamodule if datamodule is not None else model  # a module's own loaders
        uri = log_model(logger, model, source, step, best, latest_checkpoint(trainer), register)
        if uri is not None:
            print(f"mlplab: run {logger.run_id} ({logger.name}), model {uri}")
        logger.experiment.settle()
