"""The config a search's trials start from, parsed and built as `mlplab fit` would, without a
Trainer or an MLflow run: what a search checks its space and metric against."""

from __future__ import annotations

import inspect
import logging

import yaml
from jsonargparse import Namespace
from torchmetrics import MetricCollection

from mlplab.cli import MLPLabCLI
from mlplab.errors import UserError


class ConfigCheck(MLPLabCLI):
    def __init__(self, args: list[str]) -> None:
        seed = logging.getLogger("lightning.fabric.utilities.seed")
        level = seed.level
        seed.setLevel(logging.WARNING)  # no "Seed set" line ahead of a mistake's: nothing runs
        try:
            super().__init__(args=args, run=False)
        finally:
            seed.setLevel(level)

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False  # errors are raised, for `mlplab search` to word them
        return parser

    def instantiate_trainer(self, **kwargs):
        return None

    def instantiate_classes(self) -> None:
        # Lightning gives the modules their hparams from the config's dump, made once per CLI
        # (`config_dump`): each trial built on this CLI has a config of its own, checked when
        # it was parsed (or its values were), dumped here as Lightning dumps it, unvalidated
        dump = self.parser.dump(self.config, skip_link_targets=False, skip_none=False,
                                skip_validation=True)  # fmt: skip
        self.config_dump = yaml.safe_load(dump)
        super().instantiate_classes()

    def parse(self, args: list[str]) -> Namespace:
        return self.parser.parse_args(args)

    def check_metric(self, metric: str) -> None:
        """Trials are compared, and pruned, on a metric of each validation."""
        if not metric.startswith("val/"):
            raise UserError(
                f"--metric {metric}: a search compares and prunes trials on a validation "
                "metric (val/...): test/ would choose on the test split, train/ on fit alone"
            )
        model, data = self.model, self.datamodule
        if isinstance(getattr(model, "val_metrics", None), MetricCollection):  # mlplab's tasks
            logged = ["val/loss", *model.val_metrics.keys()]
            if metric not in logged:
                raise UserError(f"--metric {metric} is not logged by {type(model).__name__}; "
                                f"it logs {', '.join(logged)}")  # fmt: skip
        splits = inspect.getattr_static(data, "splits", None)  # a class's fixed splits
        if isinstance(splits, tuple) and "val" not in splits:
            raise UserError(f"{type(data).__name__} has no validation split to compare trials on")
        if lookup(self.config, "trainer.limit_val_batches") == 0:
            raise UserError("trainer.limit_val_batches is 0: trials need their validation")

    def check_one_process(self) -> None:
        """Trials run in the search's process: DDP would relaunch the search in each rank."""
        trainer = self.config.trainer
        devices = trainer.devices
        one = str(devices) == "1" or (isinstance(devices, list) and len(devices) == 1)
        if not one or trainer.num_nodes != 1:
            raise UserError(
                f"trainer.devices {trainer.devices}, num_nodes {trainer.num_nodes}: a search runs "
                "each trial on one device (--workers N runs N at once); train the best with DDP"
            )


def lookup(config: Namespace, key: str):
    """A dotted CLI key's value (`model.lr` is `model.init_args.lr`); KeyError if none."""
    return config[full_key(config, key)]


def full_key(config: Namespace, key: str) -> str:
    """A dotted CLI key as the config holds it (`model.lr`: `model.init_args.lr`); KeyError if
    it names no setting."""
    node, parts = config, []
    for part in key.split("."):
        if isinstance(node, Namespace) and part not in node and "init_args" in node:
            node = node["init_args"]
            parts.append("init_args")
        if not isinstance(node, Namespace) or part not in node:
            raise KeyError(key)
        node = node[part]
        parts.append(part)
    return ".".join(parts)


def not_a_setting(config: Namespace, key: str) -> str | None:
    """None where `key` is a setting of `config`; else a hint at the closest one (or '')."""
    import difflib

    try:
        lookup(config, key)
        return None
    except KeyError:
        close = difflib.get_close_matches(key, short_keys(config), n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else ""


def short_keys(config: Namespace) -> list[str]:
    """Every setting as the command line can name it shortest (no `init_args`), classes too."""
    keys = set()
    for key in config.keys():
        short = ".".join(part for part in key.split(".") if part != "init_args")
        keys.add(short.removesuffix(".class_path"))
    return sorted(keys)
