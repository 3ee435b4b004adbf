"""A stacked fit: trials of one architecture trained together as one model, in one process
(`mlplab sweep --stack N`, `mlplab search --stack N`).

Each trial is built as `mlplab fit` builds it (its config parsed, its seed set, its datamodule
and module made, with hparams from its own config), so it starts from its own run's weights; a
search's trial whose checked values are all that differ is set on a copy of the last parsed
config (`Builder.build`). Its batches come in its own run's
order: a generator per trial, started from torch's global state after the trial was built,
replays the draws a fit's data loaders make from that stream (each training epoch's loader
draws a base seed, then its sampler's seed; each validation's loader a base seed; Lightning's
sanity check isolates its own). The networks run as one `Stack`, each with its own optimiser
settings (`StackedOptimizer`), so every trial's weights and metrics are its own run's to float32
rounding; with dropout, in distribution only (`MASKS`).

What a stacked fit keeps of a Lightning fit: `trainer.max_epochs`, `check_val_every_n_epoch`,
the checkpoint's monitor and mode (each trial is tested with its best weights, at their step,
as a fit tests its best checkpoint), the divergence check (a diverging trial leaves the stack
failed) and the module's own loss, metrics and optimiser. A trial whose config asks for more (a
scheduler, gradient clipping, other checkpoint settings, a callback of Lightning's that acts
during training, ...) cannot be stacked: `refusal` says why and the trial trains alone.
Per-epoch training metrics are kept at the epochs that validate (and the last): every epoch for
most configs, one in a hundred for the XOR nets, whose 3,000 epochs x 100 trials of per-epoch
rows would take the store longer than the training.

A module stacks when it offers the `Stackable` methods (the template's tasks do).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch import LightningModule
from torch.func import functional_call, vmap

from mlplab.direction import better
from mlplab.speed import stack
from mlplab.speed.stack import DEFAULTS, SHARED, Stack, StackedOptimizer

# settings that may differ between the trials of one stack (beside an optimiser's own)
PER_TRIAL = ("seed_everything", "model.init_args.lr")
# settings that say where a run goes, not what it trains
BOOKKEEPING = ("experiment_name", "run_name", "tracking_uri", "tags", "log_system_metrics",
               "register_model", "register_alias", "verbose", "config")  # fmt: skip
# trainer settings a stacked fit keeps (or that change nothing it computes)
TRAINER_KEPT = ("max_epochs", "check_val_every_n_epoch", "enable_progress_bar", "callbacks",
                "enable_model_summary", "num_sanity_val_steps", "logger", "default_root_dir",
                "log_every_n_steps", "accelerator", "devices", "deterministic",
                "benchmark")  # fmt: skip
# checkpoint settings a stacked fit keeps (what it tests: the best weights by monitor and mode)
CHECKPOINT_KEPT = ("monitor", "mode", "filename", "save_last", "verbose")
# Lightning's callbacks that only report: skipped without changing what a trial computes
REPORTING = ("ModelSummary", "RichModelSummary", "TQDMProgressBar", "RichProgressBar",
             "LearningRateMonitor", "DeviceStatsMonitor", "Timer")  # fmt: skip
# optimiser flags a stack runs only at these values
NEUTRAL = {"maximize": (False,), "amsgrad": (False,), "capturable": (False,),
           "differentiable": (False,), "fused": (None, False)}  # fmt: skip


@runtime_checkable
class Stackable(Protocol):
    """What a LightningModule offers to train stacked: `forward` and `loss` pure functions of
    its weights (vmapped over the trials), and every metric it logs as a collection made
    afresh (`fresh_metrics`, unprefixed: `acc`, not `val/acc`)."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None): ...

    def metric_inputs(self, logits: torch.Tensor, y: torch.Tensor) -> tuple: ...

    def fresh_metrics(self): ...

    def sample_weights(self, y: torch.Tensor, weight, stage: str): ...


@dataclass
class Trial:
    """One point of a sweep, built as its own `mlplab fit` would build it."""

    point: dict
    args: list[str]  # the fit's arguments
    config: Any  # the parsed config (jsonargparse Namespace)
    parser: Any
    module: LightningModule
    datamodule: Any
    rng: torch.Tensor  # torch's global state right after the trial was built
    callbacks: list[str] = field(default_factory=list)  # the config's, skipped when stacked


@dataclass
class Record:
    """What a trial's stacked fit produced: its metrics as a fit logs them, and its weights."""

    metrics: list[tuple[str, float, int]] = field(default_factory=list)  # key, value, step
    best_step: int = 0
    best_epoch: int = 0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # the tested (best) ones
    last: dict[str, torch.Tensor] = field(default_factory=dict)  # the last epoch's
    epochs: int = 0  # trained
    pruned: bool = False  # left the stack at a validation (`StackedFit.run`'s `on_validation`)
    failure: str | None = None  # why it left the stack failed (its training diverged)
    # what its checkpoints hold beside weights (`mlplab.speed.stacked_checkpoints`)
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # the optimiser's
    best_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # with weights
    monitor: str | None = None  # the metric its best weights were chosen by, once validated
    best_value: float | None = None
    initial: float | None = None  # its first batch's loss (the divergence check's scale)


def build(args: list[str]) -> Trial:
    """Parse and build a trial's config as `mlplab fit` does (no Trainer, no run)."""
    return Builder().build(args)


class Builder:
    """Trials built as `mlplab fit` builds them, with one parser: a LightningCLI's set-up is
    most of the 0.4 s a trial's own would take. Each trial's arguments are prepared as the
    CLI prepares them, parsed, seeded (`seed_everything`, as LightningCLI seeds) and built."""

    def __init__(self) -> None:
        self.check = None
        # the last config parsed with `checked` settings (before its seed was drawn), its
        # arguments without them, and their keys
        self.parsed, self.base, self.keys = None, None, None

    def build(self, args: list[str], checked: dict[str, Any] | None = None) -> Trial:
        """`checked`: settings (CLI key: value) that `args` end with, as `--KEY=VALUE` flags,
        each value already checked against the config. Where `args` without them are the last
        parsed ones', with the same keys, and each names a setting holding a value of the
        same type, the trial's config is a copy of that one with the values set; else `args`
        are parsed."""
        from mlplab import cli
        from mlplab.commands.search.check import ConfigCheck

        if self.check is None:
            self.check = ConfigCheck(args)  # parsed, seeded and built as LightningCLI does
            return self.trial(args)
        base = without(args, checked or {})
        config = None
        if base is not None and base == self.base and set(checked) == self.keys:
            config = self.varied(checked)
        if config is None:
            prepared = cli.with_experiment_name(cli.with_checkpoint_config(
                cli.with_weights_only(cli.check_config_files(list(args)))))  # fmt: skip
            config = self.check.parse(prepared)
            if base is not None:
                self.parsed, self.base, self.keys = config.clone(), base, set(checked)
        return self.seeded(args, config)

    def varied(self, checked: dict[str, Any]):
        """The last parsed config with `checked` set; None where one is not a scalar setting
        of the same type there (a class, a config file, None, a list, an int for a float)."""
        from mlplab.commands.search.check import full_key

        config = self.parsed.clone()
        for key, value in checked.items():
            try:
                key = full_key(config, key)
            except KeyError:
                return None
            old = config[key]
            if type(old) is not type(value) or not isinstance(value, int | float | bool | str):
                return None
            config[key] = value
        return config

    def seeded(self, args: list[str], config) -> Trial:
        import logging

        from lightning.pytorch import seed_everything

        check = self.check
        check.config = config
        seed = config.get("seed_everything")
        if seed is not False:
            said = logging.getLogger("lightning.fabric.utilities.seed")
            level = said.level
            said.setLevel(logging.WARNING)  # no "Seed set" line per trial
            try:
                config.seed_everything = seed_everything(None if seed is True else seed,
                                                         workers=True)  # fmt: skip
            finally:
                said.setLevel(level)
        check.before_instantiate_classes()
        check.instantiate_classes()
        return self.trial(args)

    def trial(self, args: list[str]) -> Trial:
        check = self.check
        rng = torch.get_rng_state()
        config = check.config
        callbacks = [c.class_path.rsplit(".", 1)[-1] for c in config.trainer.callbacks or []]
        return Trial({}, args, config, check.parser, check.model, check.datamodule, rng,
                     callbacks)  # fmt: skip


def rows_at(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[index]` for a (trials, batch) index of rows: `index_select` copies whole rows,
    a quarter of the time advanced indexing takes for a stack's MNIST batch."""
    return tensor.index_select(0, index.reshape(-1)).view(*index.shape, *tensor.shape[1:])


def without(args: list[str], checked: dict[str, Any]) -> list[str] | None:
    """`args` without the `--KEY=VALUE` flags of `checked` they end with (None: they do not)."""
    if not checked or len(args) < len(checked):
        return None
    tail = args[len(args) - len(checked) :]
    if [flag.split("=", 1)[0] for flag in tail] != [f"--{key}" for key in checked]:
        return None
    return args[: len(args) - len(checked)]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list) and any(isinstance(item, dict) for item in tree):
        return _flatten({str(i): item for i, item in enumerate(tree)}, prefix)
    return {prefix.rstrip("."): tree}


def settings(trial: Trial) -> dict[str, Any]:
    """Every setting of the trial, dotted (`model.init_args.lr`)."""
    return _flatten(trial.config.as_dict())


def optimiser_keys(trial: Trial) -> tuple[str, ...]:
    """The optimiser settings that may differ within a stack (its class's, bar `SHARED`)."""
    path = settings(trial).get("model.init_args.optimizer.class_path", "")
    return tuple(f"model.init_args.optimizer.init_args.{k}" for k in DEFAULTS.get(path, {})
                 if k not in SHARED)  # fmt: skip


def stack_key(trial: Trial) -> dict[str, Any]:
    """The settings every trial of a stack shares: all of them but the per-trial ones."""
    skip = (*PER_TRIAL, *optimiser_keys(trial))
    return {k: v for k, v in settings(trial).items()
            if k not in skip and k.split(".")[0] not in BOOKKEEPING}  # fmt: skip


def apart(keys: list[dict]) -> list[str]:
    """The settings in which these stack keys differ (a class, not also its arguments)."""
    names = sorted({k for key in keys for k in key})
    differ = [n for n in names if len({json.dumps(key.get(n), default=str) for key in keys}) > 1]
    classes = [n.removesuffix("class_path") for n in differ if n.endswith(".class_path")]
    return [n for n in differ if not any(n.startswith(f"{c}init_args.") for c in classes)]


def refusal(trial: Trial) -> str | None:
    """Why this trial cannot train in a stack (None: it can)."""
    config, module = trial.config, trial.module
    if not isinstance(module, Stackable):
        return (f"{type(module).__name__} has no loss, metric_inputs, sample_weights and "
                "fresh_metrics to stack")  # fmt: skip
    if not module.automatic_optimization:
        return f"{type(module).__name__} optimises by hand"
    defaults = trial.parser.get_defaults()
    for key, value in config.trainer.items():
        if key.split(".")[0] not in TRAINER_KEPT and value != defaults.trainer.get(key):
            return f"trainer.{key} {value} is not kept by a stack"
    for key, value in config.checkpoint.items():
        if key not in CHECKPOINT_KEPT and value != defaults.checkpoint.get(key):
            return f"checkpoint.{key} {value} is not kept by a stack"
    monitor = config.checkpoint.get("monitor")
    logged = ["val/loss", *(f"val/{k}" for k in module.fresh_metrics().keys())]
    if monitor is not None and monitor not in logged:
        return f"checkpoint.monitor {monitor}: a stack keeps the best by {', '.join(logged)}"
    devices, accelerator = config.trainer.get("devices"), config.trainer.get("accelerator")
    if devices not in ("auto", 1, "1", None) or accelerator not in ("auto", "cpu", "gpu", "cuda",
                                                                     None):  # fmt: skip
        return f"a stack trains on one device (trainer.devices {devices}, {accelerator})"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return "no CUDA device here"
    if devices in ("auto", None) and accelerator != "cpu" and torch.cuda.device_count() > 1:
        return f"trainer.devices auto is {torch.cuda.device_count()} GPUs here (DDP)"
    for callback in config.trainer.callbacks or []:
        name = callback.class_path.rsplit(".", 1)[-1]
        if callback.class_path.startswith("lightning.") and name not in REPORTING:
            return f"{name} acts during training"
    if not hasattr(trial.datamodule, "load_splits") or not hasattr(trial.datamodule, "batch_size"):
        return f"{type(trial.datamodule).__name__} does not hold its splits in memory"
    optimizer = module.configure_optimizers()
    if not isinstance(optimizer, torch.optim.Optimizer):
        return "its configure_optimizers returns a scheduler or several optimisers"
    name = type(optimizer).__name__
    path = f"torch.optim.{name}"
    if path not in DEFAULTS or getattr(torch.optim, name) is not type(optimizer):
        return f"{type(optimizer).__name__} is not stacked (these are: {', '.join(DEFAULTS)})"
    group = optimizer.param_groups[0]
    for flag, allowed in NEUTRAL.items():
        if flag in group and group[flag] not in allowed:
            return f"{type(optimizer).__name__}({flag}={group[flag]}) is not stacked"
    if group.get("decoupled_weight_decay") and path == "torch.optim.Adam":
        return "Adam(decoupled_weight_decay=True) is not stacked: use AdamW"
    if len(optimizer.param_groups) > 1:
        return "its optimiser has several parameter groups"
    try:
        Stack([module])
    except ValueError as err:
        return str(err).split(";")[0]
    return None


# what a stack says of trials whose networks draw random masks (`Stack.random`)
MASKS = ("dropout draws each trial's masks from its stack's random stream, not from its own run's: "
         "it ends as its fit would in distribution, not to float32 rounding")  # fmt: skip


def draws_masks(trial: Trial) -> bool:
    return stack.draws_masks(trial.module)


# optimiser state per weight, at most (RMSprop: square average, gradient average, momentum)
STATE = {"SGD": 1, "Adam": 2, "AdamW": 2, "RMSprop": 3, "Adagrad": 1}
FLOAT = 4  # bytes


def bytes_per_trial(trial: Trial) -> int:
    """What one trial adds to a stack, at most: its weights with their gradient, optimiser
    state, and copies of both at the best and the last validation (the checkpoints'), the
    activations of a training batch (kept for the backward pass) and of the largest split
    evaluated at once, and an epoch's outputs kept for its training metrics."""
    module, data = trial.module, trial.datamodule
    weights = sum(p.numel() for p in module.parameters())
    state = STATE.get(type(module.configure_optimizers()).__name__, 3)
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()))
             for m in module.modules() if not list(m.children())]  # fmt: skip
    training = module.training
    module.eval()  # batch norm: no batch statistics of one sample, its running ones untouched
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, *data.data["train"][0].shape[1:]))
    finally:
        module.train(training)
        for hook in hooks:
            hook.remove()
    per_sample = sum(sizes) + out.numel()
    splits = {name: len(split[0]) for name, split in data.data.items()}
    batch = data.batch_size if 0 < data.batch_size < splits["train"] else splits["train"]
    largest = max(n for name, n in splits.items() if name != "train") if len(splits) > 1 else 0
    return FLOAT * (weights * (4 + 3 * state) + 3 * batch * per_sample + largest * per_sample
                    + splits["train"] * out.numel())  # fmt: skip


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_memory(trial: Trial, size: int, available: int | None = None) -> None:
    """Refuse a stack of `size` such trials that would not fit in 80 % of the free memory,
    saying the size that does."""
    from mlplab.errors import UserError

    trial.datamodule.setup("fit")
    need = bytes_per_trial(trial)
    free = available_memory(device_of(trial.config)) if available is None else available
    if need * size <= 0.8 * free:
        return
    fits = int(0.8 * free // need)
    gib = 2**30
    advice = f"--stack {fits} fits" if fits else "not even one trial fits: train it alone"
    raise UserError(
        f"--stack {size}: a stack of {size} needs about {need * size / gib:.1f} GiB and "
        f"{free / gib:.1f} GiB are free; {advice}"
    )


def device_of(config) -> torch.device:
    """Where a trial's fit would train: a CUDA device where the trainer asks for one or leaves
    it to Lightning (`auto`) and one is there, else the CPU."""
    accelerator = config.trainer.get("accelerator") or "auto"
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


class StackedFit:
    """Trains `trials` (one `stack_key`) as one stacked model; `run()` gives each its `Record`."""

    def __init__(self, trials: list[Trial]) -> None:
        self.trials = trials
        first = trials[0]
        self.module = first.module
        self.config = first.config
        self.device = device_of(first.config)
        first.datamodule.setup("fit")
        for trial in trials:  # the hooks read the data through the trainer; nothing else runs
            trial.datamodule.data = first.datamodule.data  # one stack key: the same data
            trial.module.trainer = SimpleNamespace(datamodule=trial.datamodule)
            trial.module.setup("fit")
            trial.module.trainer = None
            trial.module.to(self.device)
        self.stack = Stack([t.module for t in trials])
        names = {n for n, _ in self.module.named_buffers()} - set(self.stack.running_names)
        for trial in trials[1:]:  # the others are shared: the first trial's serve all
            for name, buffer in trial.module.named_buffers():
                if name in names and not torch.equal(buffer, self.module.get_buffer(name)):
                    raise ValueError(f"{name} differs within the stack")
        optimizers = [t.module.configure_optimizers() for t in trials]
        path = f"torch.optim.{type(optimizers[0]).__name__}"
        per_trial = [{k: v for k, v in o.param_groups[0].items() if k in DEFAULTS[path]}
                     for o in optimizers]  # fmt: skip
        self.optimizer = StackedOptimizer(self.stack, path, per_trial)
        self.data = {split: tuple(t.to(self.device) for t in tensors)
                     for split, tensors in first.datamodule.data.items()}  # fmt: skip
        self.generators = []  # on the CPU, as the loaders' samplers draw there
        for trial in trials:
            generator = torch.Generator()
            generator.set_state(trial.rng)
            self.generators.append(generator)
        trainer = self.config.trainer
        self.max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else 1000
        self.every = trainer.check_val_every_n_epoch or 1
        monitor = self.config.checkpoint.monitor or "val/loss"
        self.monitor = monitor
        self.mode = self.config.checkpoint.mode or better(monitor)
        self.test_after = self.config.get("test_after_fit", True) and "test" in self.data
        self.collections: dict[tuple[int, str], Any] = {}  # `metrics`
        divergence = self.config.get("divergence")
        self.factor = divergence.get("factor") if divergence is not None else None

    def metrics(self, trial: Trial, prefix: str):
        """The trial's metrics for a split (`train/acc`, ...), made once and reset for each use
        (a collection's copy costs more than the epoch's arithmetic of a small network)."""
        key = (id(trial), prefix)
        if key not in self.collections:
            made = trial.module.fresh_metrics().clone(prefix=f"{prefix}/")
            self.collections[key] = made.to(self.device)
        collection = self.collections[key]
        collection.reset()
        return collection

    def weights(self) -> dict[str, torch.Tensor]:
        return self.stack.state()

    def losses(self, weights, x, y, w, stage: str):
        """Each trial's loss and logits, vmapped: trial dim first on weights (and on x, y, w
        when given per trial)."""
        module = self.module

        def one(weights, x, y, w):
            logits = functional_call(module, weights, (x,))
            return module.loss(logits, y, module.sample_weights(y, w, stage)), logits

        shared = None if x.dim() == self.data["train"][0].dim() else 0
        in_dims = (0, shared, shared, shared if w is not None else None)
        return vmap(one, in_dims=in_dims, randomness=self.stack.randomness)(weights, x, y, w)

    def order(self, n: int, batch: int) -> torch.Tensor | None:
        """Each trial's sample order for this epoch, as its own loader draws it (None: one
        batch of the whole split, whose order changes its sums by rounding only)."""
        if batch >= n:
            return None
        orders = []
        for generator in self.generators:
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the base seed
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
            orders.append(torch.randperm(n, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(orders).to(self.device)

    def evaluate(self, split: str, weights, step: int, record: list[Record], prefix: str):
        x, y, *w = self.data[split]
        self.module.eval()  # dropout off, as Lightning evaluates
        try:
            with torch.no_grad():
                losses, logits = self.losses(weights, x, y, w[0] if w else None, split)
        finally:
            self.module.train()
        values = []
        for i, trial in enumerate(self.trials):
            metrics = self.metrics(trial, prefix)
            metrics.update(*self.module.metric_inputs(logits[i], y))
            found = {f"{prefix}/loss": float(losses[i])}
            found.update({k: float(v) for k, v in metrics.compute().items()})
            values.append(found)
            record[i].metrics += [(k, v, step) for k, v in found.items()]
        return values

    def run(self, on_validation=None) -> list[Record]:
        """Train every trial for `max_epochs`; each trial's `Record`, in the order given.

        `on_validation(trials, values, epoch)` is called after each validation with the trials
        still training and their metrics; those at the positions it returns leave the stack
        there (pruned: no training metrics for that epoch and no test, as a fit stopped in its
        validation). A trial whose epoch's `train/loss` is not finite, or above
        `divergence.factor` times its first batch's, leaves as failed, as `Divergence` fails a
        fit."""
        self.module.train()
        records = [Record() for _ in self.trials]
        current = list(records)  # aligned with the trials still in the stack
        x, y, *w = self.data["train"]
        n = len(x)
        size = self.trials[0].datamodule.batch_size
        batch = n if size <= 0 or size >= n else size
        steps = math.ceil(n / batch)
        has_val = "val" in self.data
        best: list[float | None] = [None] * len(self.trials)
        initial: torch.Tensor | None = None  # each trial's first batch's loss
        step = 0
        for epoch in range(self.max_epochs):
            validate = has_val and (epoch + 1) % self.every == 0
            keep = validate or epoch == self.max_epochs - 1
            order = self.order(n, batch)
            total, outputs, index = None, [], None
            for j in range(steps):
                if order is None:
                    xb, yb, wb = x, y, w[0] if w else None
                else:
                    index = order[:, j * batch : (j + 1) * batch]
                    xb, yb = rows_at(x, index), rows_at(y, index)
                    wb = rows_at(w[0], index) if w else None
                losses, logits = self.losses(self.weights(), xb, yb, wb, "train")
                self.backward(losses.sum())
                self.optimizer.step()
                self.optimizer.zero_grad()
                step += 1
                part = losses.detach() * len(xb if order is None else xb[0])
                total = part if total is None else total + part
                initial = losses.detach().clone() if initial is None else initial
                if keep:
                    outputs.append((logits.detach(), yb if order is None else None, index))
            for record in current:
                record.epochs = epoch + 1
            leaving: dict[int, str] = {}
            if validate:
                for generator in self.generators:  # the validation loader's base seed
                    torch.empty((), dtype=torch.int64).random_(generator=generator)
                with torch.no_grad():
                    found = self.evaluate("val", self.weights(), step, current, "val")
                for i, values in enumerate(found):
                    current[i].metrics.append(("epoch", float(epoch), step))  # as a fit's
                    value = values.get(self.monitor)
                    if value is not None:
                        current[i].monitor = self.monitor
                    if value is not None and math.isfinite(value) and (best[i] is None or (
                        value < best[i] if self.mode == "min" else value > best[i]
                    )):  # fmt: skip
                        best[i] = current[i].best_value = value
                        current[i].best_step, current[i].best_epoch = step, epoch
                        current[i].weights = self.stack.trial(i)
                        current[i].best_state = self.optimizer.trial(i)
                if on_validation is not None:
                    leaving.update(dict.fromkeys(on_validation(self.trials, found, epoch), ""))
            for i, loss in enumerate((total / n).tolist()):
                if i not in leaving and (reason := self.diverged(loss, float(initial[i]), i)):
                    leaving[i] = reason
            if leaving:
                for i, reason in leaving.items():
                    current[i].pruned, current[i].failure = not reason, reason or None
                    self.leave(current[i], i, initial)
                stay = [i for i in range(len(self.trials)) if i not in leaving]
                if not stay:
                    return records
                self.keep(stay)
                current, best = [current[i] for i in stay], [best[i] for i in stay]
                total, initial = total[stay], initial[stay]
                outputs = [(logits[stay], shared_y, None if ix is None else ix[stay])
                           for logits, shared_y, ix in outputs]  # fmt: skip
            if keep:
                self.train_metrics(current, outputs, total / n, step, epoch)
        for i, record in enumerate(current):
            self.leave(record, i, initial)
            if not record.weights:  # no validation: the last weights, as the latest checkpoint
                record.weights, record.best_state = record.last, record.state
                record.best_step, record.best_epoch = step, self.max_epochs - 1
        if self.test_after:
            tested = {name: torch.stack([r.weights[name] for r in current])
                      for name in self.stack.state()}  # fmt: skip
            found = self.evaluate("test", tested, 0, [Record() for _ in current], "test")
            for record, values in zip(current, found, strict=True):
                record.metrics += [(k, v, record.best_step) for k, v in values.items()]
        return records

    def leave(self, record: Record, position: int, initial: torch.Tensor | None) -> None:
        """What trial `position` ends with: its last weights and optimiser state."""
        record.last = self.stack.trial(position)
        record.state = self.optimizer.trial(position)
        record.initial = float(initial[position]) if initial is not None else None

    def diverged(self, loss: float, initial: float, position: int) -> str:
        """Why trial `position`'s training diverged this epoch ("" if it did not), worded as
        `mlplab.safety.divergence.Divergence` words it."""
        factor = self.factor
        if math.isfinite(loss) and not (factor and initial and loss > factor * initial):
            return ""
        said = (f"train/loss is {loss}" if not math.isfinite(loss) else
                f"train/loss is {loss:.3g}, over {factor:g}x the first batch's {initial:.3g}")
        lr = self.optimizer.settings[position]["lr"]
        return (f"training diverged: {said} (model.lr is {lr}: lower it, or standardize the "
                "inputs; divergence.factor sets the limit)")  # fmt: skip

    def backward(self, loss: torch.Tensor) -> None:
        """The gradients as autograd makes them, the weights laid out as they come: a vmapped
        linear layer's comes transposed, and `backward()` would copy it into the weight's layout
        (7 MB a step for 8 MNIST MLPs), the update then read both layouts at once."""
        weights = list(self.stack.weights)
        grads = torch.autograd.grad(loss, weights)
        if self.optimizer.steps == 0:  # before the first step makes the optimiser's state
            self.stack.lay_out([g.stride() for g in grads])
            weights = list(self.stack.weights)
        for weight, grad in zip(weights, grads, strict=True):
            weight.grad = grad

    def keep(self, positions: list[int]) -> None:
        """Only the trials at these positions go on: their rows of every stacked weight and
        optimiser state, their settings, generators and modules."""
        index = torch.tensor(positions)
        self.stack.keep(index)
        self.optimizer.keep(positions)
        self.trials = [self.trials[i] for i in positions]
        self.generators = [self.generators[i] for i in positions]

    def train_metrics(self, records, outputs, mean_loss, step, epoch) -> None:
        """The epoch's training metrics per trial, from the logits of its batches (one update
        per trial with the whole epoch's, as `Gathered` updates a fit's)."""
        y = self.data["train"][1]
        logits = torch.cat([out for out, _, _ in outputs], dim=1)
        if outputs[0][1] is not None:  # one batch, shared by every trial
            targets = [outputs[0][1]] * len(self.trials)
        else:
            index = torch.cat([ix for _, _, ix in outputs], dim=1)
            targets = [y[index[i]] for i in range(len(self.trials))]
        for i, trial in enumerate(self.trials):
            metrics = self.metrics(trial, "train")
            metrics.update(*self.module.metric_inputs(logits[i], targets[i]))
            found = {"train/loss": float(mean_loss[i]), "epoch": float(epoch),
                     **{k: float(v) for k, v in metrics.compute().items()}}  # fmt: skip
            records[i].metrics += [(k, v, step) for k, v in found.items()]
