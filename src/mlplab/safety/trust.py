"""A checkpoint is data: how mlplab reads one, and the classes one may name.

A `.ckpt` is a pickle, and unpickling can run any code the file asks for. Every checkpoint
mlplab reads goes through `read_checkpoint`: PyTorch's weights-only unpickler, which builds
tensors, containers, numbers and strings and nothing else. That is all a checkpoint written by
mlplab holds (a task built in Python has its network and optimizer classes stored as
`class_path` settings, `plain_hyperparameters`), so no global is added to PyTorch's
allow-list. Lightning's own reads get `weights_only=True` from the CLI.

The data still names classes, which LightningCLI and jsonargparse import and build: the
hyper-parameters' `class_path`s, the config a checkpoint carries, `mlplab_task`. Each must be a
public class of a package mlplab is built on (`TRUSTED_PACKAGES`), of the project's own
packages (beside mlplab in the project's src/, `project_package`), or of a module already
imported (as Lightning 2.6.6 asks of `_class_path`, CVE-2026-58659), and a network, optimizer,
scheduler, metric, datamodule or part of a Trainer (`buildable`): jsonargparse builds a
`class_path` wherever a setting is typed `Any`, so the kind is checked, not only the place. A
function by name (a setting typed `Callable`) must be one of mlplab's `FUNCTIONS`. Anything
else is refused in one line before any of it runs. The opt-in for a file the user trusts is
Lightning's own switch, `--weights_only false`, which `trust_checkpoints` records for the
process.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from mlplab.errors import UserError

#: packages whose public classes a checkpoint may name (mlplab's and what it is built on)
TRUSTED_PACKAGES = frozenset(
    {"mlplab", "lightning", "pytorch_lightning", "torch", "torchmetrics", "torchvision"}
)
#: the functions an mlplab config may name (`ThroughputMonitor`'s `batch_size_fn`)
FUNCTIONS = frozenset({"mlplab.data.base.batch_size"})
#: the instantiator LightningCLI records in the hyper-parameters it saves
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
HINT = "if you trust this file, add --weights_only false"
DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")

_trusted = False


def trust_checkpoints(trusted: bool = True) -> None:
    """The user trusts the checkpoints this process reads (`--weights_only false`): they are
    unpickled in full and may name any class."""
    global _trusted
    _trusted = trusted


def checkpoints_trusted() -> bool:
    return _trusted


def add_weights_only_argument(parser) -> None:
    """`--weights_only` for mlplab's own commands that read a checkpoint, as the CLI's."""
    parser.add_argument(
        "--weights_only", choices=("true", "false"), default="true",
        help="false: the checkpoint is trusted, unpickled in full and may name any class",
    )  # fmt: skip


def trust_from_arguments(args) -> None:
    trust_checkpoints(args.weights_only == "false")


def read_checkpoint(path: str | Path, trust: bool | None = None) -> dict:
    """A checkpoint's contents (tensors memory-mapped, not read), or a one-line error: a file
    that is missing, no checkpoint, holds more than data or names a class it may not. Read
    once per process however many checks ask (the dict is shared: do not modify it)."""
    trust = _trusted if trust is None else trust
    try:
        modified = Path(path).stat().st_mtime_ns
    except OSError:
        modified = None
    return _read_checkpoint(str(path), modified, trust)


@functools.lru_cache(maxsize=4)
def _read_checkpoint(path: str, modified: int | None, trust: bool) -> dict:
    if modified is not None and Path(path).is_file() and not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a readable checkpoint (not a PyTorch file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; give a .ckpt file or `last`") from None
    except pickle.UnpicklingError:
        if not trust and (wanted := first_unsafe_global(path)):
            raise UserError(
                f"checkpoint {path} holds a {wanted} object, which is code, not data (an "
                f"mlplab checkpoint holds none); nothing in it was run; {HINT}"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint (not a PyTorch file)") from None
    except Exception as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    if not trust:
        for name, kind in named(checkpoint, path):
            if why := refusal(name, kind):
                raise UserError(f"checkpoint {path} names {name}, {why}; nothing was built; {HINT}")
    return checkpoint


def first_unsafe_global(path: str) -> str | None:
    """The first class or function a pickle asks for beyond PyTorch's weights-only set, read
    without running anything."""
    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: no name to give
        return None
    return wanted[0] if wanted else None


def named(checkpoint: dict, path: str) -> Iterator[tuple[str, str]]:
    """(name, kind) for every class, instantiator and callable the checkpoint names: in its
    hyper-parameters, the datamodule's, the config it carries and `mlplab_task`."""
    import yaml

    if "mlplab_task" in checkpoint:
        yield str(checkpoint["mlplab_task"]), "class"
    parts = [checkpoint.get("hyper_parameters"), checkpoint.get("datamodule_hyper_parameters")]
    config = checkpoint.get("mlplab_config")
    if config is not None:
        try:
            settings = yaml.safe_load(config) if isinstance(config, str) else None
        except yaml.YAMLError:
            settings = None
        if not isinstance(settings, dict):
            raise UserError(f"checkpoint {path} carries a config that is no YAML mapping; {HINT}")
        parts.append(settings)
    for part in parts:
        yield from _walk(part)


def _walk(value) -> Iterator[tuple[str, str]]:
    import yaml

    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("class_path", "_class_path"):
                yield str(item), "class"
            elif key == "_instantiator":
                yield str(item), "instantiator"
            else:
                yield from _walk(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk(item)
    elif isinstance(value, str) and "class_path" in value:
        try:  # jsonargparse reads a string given for an `Any` setting as YAML
            yield from _walk(yaml.safe_load(value))
        except yaml.YAMLError:
            pass
    elif isinstance(value, str) and DOTTED.fullmatch(value) and _importable(value):
        yield value, "callable"  # jsonargparse imports a dotted string given for a Callable


def _importable(name: str) -> bool:
    top = name.split(".")[0]
    if top in sys.modules:
        return True
    spec = importlib.util.find_spec(top)  # a top-level look-up runs no code
    return spec is not None and spec.origin is not None


@functools.cache
def project_package(top: str) -> bool:
    """Whether `top` is one of the project's own packages (`my_project`, or one `mlplab new`
    made): a package beside mlplab in the project's source folder (src/, installed editable).
    Its classes are as trusted as mlplab's. An installed mlplab (site-packages) has no such
    neighbours; a module that merely lies in the working directory is not trusted."""
    source = Path(__file__).resolve().parents[2]  # src/, holding mlplab/
    spec = importlib.util.find_spec(top) if top.isidentifier() else None
    if "site-packages" in source.parts or spec is None or spec.origin is None:
        return False
    return Path(spec.origin).resolve().parent.parent == source


@functools.cache
def buildable() -> tuple[type, ...]:
    """The kinds of class a checkpoint may name: what a config of mlplab's can build (its
    model and data, and the Trainer's parts)."""
    import torchmetrics
    from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
    from lightning.pytorch import Callback, LightningDataModule
    from lightning.pytorch.accelerators import Accelerator
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.plugins import Precision
    from lightning.pytorch.profilers import Profiler
    from lightning.pytorch.strategies import Strategy
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    return (torch.nn.Module, torch.optim.Optimizer, LRScheduler, ReduceLROnPlateau,
            torchmetrics.Metric, LightningDataModule, Callback, Logger, Profiler, Strategy,
            Accelerator, Precision, ClusterEnvironment, CheckpointIO)  # fmt: skip


BUILDABLE = "a network, optimizer, scheduler, metric, datamodule or Trainer part"


def refusal(name: str, kind: str) -> str | None:
    """Why a checkpoint may not name `name` (None: it may)."""
    if kind == "instantiator":
        return None if name == INSTANTIATOR else "an instantiator other than LightningCLI's"
    if kind == "callable" and name in FUNCTIONS:
        return None
    module_name, _, attribute = name.rpartition(".")
    parts = name.split(".")[1:] if module_name == "__main__" else name.split(".")
    if not module_name or any(not part.isidentifier() or part.startswith("_") for part in parts):
        return "which is not a public class of a module"
    top = name.split(".")[0]
    if top in TRUSTED_PACKAGES or project_package(top):
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - no such module here
            return "which is not a class here"
    elif module_name in sys.modules:  # a script's or notebook's own (`__main__`), or imported
        module = sys.modules[module_name]
    else:
        return (
            f"a class outside {', '.join(sorted(TRUSTED_PACKAGES))} and this project whose "
            "module is not imported (give the --config that names it)"
        )
    target = getattr(module, attribute, None)
    if inspect.isclass(target):
        return None if issubclass(target, buildable()) else f"which is not {BUILDABLE} class"
    if kind == "callable" and not callable(target):
        return None  # a constant (`torch.float32`), or nothing jsonargparse could call
    return f"which is not {BUILDABLE} class" if target is not None else "which is not a class here"


def resolve_class(name: str) -> type:
    """The class a checkpoint names, once `read_checkpoint` has passed the checkpoint."""
    module_name, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def plain_hyperparameters(hparams: dict, owner: type) -> dict:
    """Hyper-parameters of a module built in Python, as data: a class becomes its `class_path`,
    `functools.partial(Class, **settings)` its `class_path` and `init_args`, as LightningCLI
    writes them, so `load_from_checkpoint` rebuilds them through LightningCLI's instantiator.
    Values of other kinds stay as they are (the checkpoint then needs trust to load)."""
    if "_instantiator" in hparams:
        return hparams
    converted = {key: _as_setting(value) for key, value in hparams.items()}
    if all(converted[key] is hparams[key] for key in hparams):
        return hparams
    return {
        "_class_path": f"{owner.__module__}.{owner.__qualname__}",
        **converted,
        "_instantiator": INSTANTIATOR,
    }


def _as_setting(value):
    if inspect.isclass(value):
        return {"class_path": f"{value.__module__}.{value.__qualname__}"}
    if (
        isinstance(value, functools.partial)
        and inspect.isclass(value.func)
        and not value.args
    ):
        return {
            "class_path": f"{value.func.__module__}.{value.func.__qualname__}",
            "init_args": dict(value.keywords),
        }
    return value
