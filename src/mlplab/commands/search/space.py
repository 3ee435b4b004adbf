"""A search space keyed by the CLI's own dotted names, and its translation into Optuna trials.

    model.lr: {low: 1.0e-4, high: 0.1, log: true}        # a float range (log scale)
    data.batch_size: {low: 16, high: 256, step: 16}      # integer bounds: an int range
    model.net.init_args.hidden_sizes: [[300, 100], [500, 150]]   # choices, any YAML values
    model.optimizer:                                     # conditional choices: a choice's
      choices:                                           # own sub-space is searched only
        SGD: {model.optimizer.init_args.momentum: {low: 0.5, high: 0.99}}   # when it is taken
        Adam: null

A trial's values become `--KEY=VALUE` overrides of `mlplab fit`, so a key means what it means
on the command line; `config` picks a config file, as in a sweep's grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from mlplab.errors import UserError

RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass
class Dimension:
    """One searched setting: a range (`low`..`high`) or choices, each choice with the
    dimensions searched only when it is taken."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list = field(default_factory=list)
    branches: dict[str, dict[str, Dimension]] = field(default_factory=dict)

    @property
    def is_range(self) -> bool:
        return self.low is not None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    @property
    def labels(self) -> list:
        """The choices as Optuna stores them: scalars as they are, lists and mappings as JSON."""
        return [encode(choice) for choice in self.choices]

    def values(self) -> list:
        """Values that exercise the dimension: its bounds, or every choice."""
        return [self.low, self.high] if self.is_range else list(self.choices)


def encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, separators=(",", ":"))


def parse_space(spec: Any, where: str = "the search space") -> dict[str, Dimension]:
    """Check a space's shape and read it; every mistake is one line naming the key."""
    if not isinstance(spec, dict) or not spec:
        raise UserError(f"{where} must be a mapping of dotted CLI keys to ranges or choices")
    space = {}
    for key, value in spec.items():
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise UserError(f"{where}: {key!r} is not a dotted CLI key (e.g. model.lr)")
        space[key] = parse_dimension(key, value)
    return space


def parse_dimension(key: str, value: Any) -> Dimension:
    if isinstance(value, list):
        if not value:
            raise UserError(f"search space {key}: the list of choices is empty")
        return Dimension(key, choices=value)
    if not isinstance(value, dict):
        raise UserError(
            f"search space {key}: write a range {{low: A, high: B}}, a list of choices, or "
            f"{{choices: ...}}; got {value!r}"
        )
    if "choices" in value:
        return parse_choices(key, value)
    unknown = set(value) - RANGE_KEYS
    if unknown or not {"low", "high"} <= set(value):
        raise UserError(
            f"search space {key}: a range takes low, high, and optionally log, step; "
            f"got {sorted(value)}"
        )
    low, high, log, step = value["low"], value["high"], value.get("log", False), value.get("step")
    numbers = [n for n in (low, high, step) if n is not None]
    if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
        raise UserError(f"search space {key}: low, high and step must be numbers")
    if not all(math.isfinite(n) for n in numbers):
        raise UserError(f"search space {key}: low, high and step must be finite")
    if not low < high:
        raise UserError(
            f"search space {key}: the range {low}..{high} is "
            f"{'empty' if low == high else 'inverted'}; low must be below high"
        )
    if log and low <= 0:
        raise UserError(f"search space {key}: a log range needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise UserError(f"search space {key}: step must be positive, and not with log")
    if isinstance(low, int) != isinstance(high, int):
        raise UserError(
            f"search space {key}: low and high must both be integers (an int range) or both "
            f"have a decimal point (a float range); got {low!r} and {high!r}"
        )
    return Dimension(key, low=low, high=high, log=bool(log), step=step)


def parse_choices(key: str, value: dict) -> Dimension:
    choices = value["choices"]
    if set(value) != {"choices"}:
        raise UserError(f"search space {key}: choices go alone, got {sorted(value)}")
    if isinstance(choices, list):
        return parse_dimension(key, choices)
    if not isinstance(choices, dict) or not choices:
        raise UserError(f"search space {key}: choices must be a list or a mapping of choice to "
                        "the sub-space searched when it is taken")  # fmt: skip
    branches = {
        encode(choice): parse_space(sub, f"search space {key}={choice}") if sub else {}
        for choice, sub in choices.items()
    }
    return Dimension(key, choices=list(choices), branches=branches)


def all_keys(space: dict[str, Dimension]) -> list[str]:
    """Every key in the space, sub-spaces included; a key may appear once."""
    keys = []
    for key, dim in space.items():
        keys.append(key)
        for branch in dim.branches.values():
            keys += all_keys(branch)
    duplicated = {key for key in keys if keys.count(key) > 1}
    if duplicated:
        raise UserError(
            f"search space: {sorted(duplicated)[0]} appears twice; give each key one range"
        )
    return keys


def suggest(trial, space: dict[str, Dimension]) -> dict[str, Any]:
    """The trial's values, sub-spaces of the choices taken included, in CLI order (a choice
    before the settings of its sub-space)."""
    point = {}
    for key, dim in space.items():
        if dim.is_range and dim.is_int:
            point[key] = trial.suggest_int(key, dim.low, dim.high, step=dim.step or 1, log=dim.log)
        elif dim.is_range:
            point[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
        else:
            label = trial.suggest_categorical(key, dim.labels)
            point[key] = dim.choices[dim.labels.index(label)]
            point.update(suggest(trial, dim.branches.get(label, {})))
    return point


def matches(choice: Any, written: Any) -> bool:
    """Whether the config's value is this choice: equal, or the class a short name names."""
    class_path = getattr(written, "class_path", None)
    if class_path is not None and isinstance(choice, str):
        return class_path == choice or class_path.endswith("." + choice)
    return encode(choice) == encode(written)


def written_params(space: dict[str, Dimension], lookup) -> tuple[dict, list[str]]:
    """Trial 0: the config's own value of every dimension it lies in (`lookup(key)` reads the
    parsed config), and the keys whose value lies outside the space (trial 0 samples them)."""
    params, outside = {}, []
    for key, dim in space.items():
        if key == "config":  # a choice of files, not a setting: trial 0 samples it
            outside.append(key)
            continue
        try:
            written = lookup(key)
        except KeyError:
            outside.append(key)
            continue
        if dim.is_range:
            number = isinstance(written, int | float) and not isinstance(written, bool)
            if number and dim.low <= written <= dim.high and not (dim.is_int and written % 1):
                params[key] = written
            else:
                outside.append(key)
            continue
        found = [c for c in dim.choices if matches(c, written)]
        if not found:
            outside.append(key)
            continue
        params[key] = encode(found[0])
        more, out = written_params(dim.branches.get(encode(found[0]), {}), lookup)
        params.update(more)
        outside += out
    return params, outside
