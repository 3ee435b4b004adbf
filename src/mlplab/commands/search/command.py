"""`mlplab search`: argument and file handling, and every check made before a study exists."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import yaml

from mlplab.commands.search.space import Dimension, all_keys, parse_space, written_params
from mlplab.commands.sweep import point_args
from mlplab.direction import better
from mlplab.errors import CommandParser, UserError, parse_cause

FILE_KEYS = {"config", "space", "metric", "direction", "n_trials", "timeout", "sampler",
             "pruner", "args", "name", "stack"}  # fmt: skip
OPTUNA_DIRECTION = {"min": "minimize", "max": "maximize"}  # a mode as Optuna names it
DIRECTIONS = tuple(OPTUNA_DIRECTION.values())


def arguments() -> argparse.ArgumentParser:
    from mlplab.commands.search import __doc__ as usage

    parser = CommandParser(
        prog="mlplab search",
        usage="mlplab search [SEARCH_FILE] [options] [fit overrides, e.g. --trainer.max_epochs 5]",
        description=usage,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    add = parser.add_argument
    add("--config", action="append", default=[], help="experiment config(s), as for fit")
    add("--space", help="a YAML mapping of dotted CLI keys to ranges or choices")
    add("--metric", help="a validation metric the model logs (default val/loss)")
    add("--direction", help="minimize or maximize (default: minimize losses and errors)")
    add("--n_trials", type=int, help="results the study is run to, over every attempt (20)")
    add("--timeout", type=float, help="stop starting trials after this many seconds")
    add("--sampler", help="tpe (default), random, cmaes, gp, qmc; or YAML {name: tpe, seed: 0}")
    add("--pruner", help="median (default), percentile, halving, hyperband, none; or YAML "
                         "{name: median, n_startup_trials: 5}")  # fmt: skip
    add("--workers", type=int, default=1, help="processes running trials of the study at once")
    add("--stack", type=int, help="ask N trials at a time and train those of one architecture "
                                  "as one stacked model")  # fmt: skip
    add("--name", help="the study's and parent run's name (default search-<experiment>)")
    add("--experiment_name", help="default: the first config's name")
    add("--tracking_uri", help="MLflow store (default as for fit)")
    add("--storage", help="Optuna storage URL (default sqlite:///<store folder>/optuna.db)")
    add("--register_model", help="register the best trial's model under this name")
    add("--register_alias", default="candidate", help="the alias it gets (default candidate)")
    add("--worker", type=int, default=0, help=argparse.SUPPRESS)  # the n-th spawned by --workers
    return parser


def load_search_file(path: str) -> dict:
    """A search file; or a sweep file with a `search:` section (the sweep's config, metric,
    mode, args and name, the section's space, budget, sampler and pruner)."""
    spec = read_yaml(path, "search file")
    if not isinstance(spec, dict):
        raise UserError(f"search file {path}: expected a mapping with keys {sorted(FILE_KEYS)}")
    if "grid" in spec and isinstance(spec.get("search"), dict):
        sweep = {k: v for k, v in spec.items() if k in ("config", "metric", "args", "name")}
        if spec.get("mode") in ("min", "max"):
            sweep["direction"] = OPTUNA_DIRECTION[spec["mode"]]
        spec = {**sweep, **spec["search"]}
    unknown = sorted(set(spec) - FILE_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], FILE_KEYS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f"; it takes {sorted(FILE_KEYS)}"
        raise UserError(f"search file {path}: unknown key {unknown[0]!r}{hint}")
    return spec


def read_yaml(path: str, what: str):
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = str(err).replace("\n", " ")
        raise UserError(f"cannot read {what} {path}: {reason}") from None


def named(value, what: str) -> dict:
    """`tpe` or `{name: tpe, seed: 0}` (YAML text on the command line) -> a mapping."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--{what} {value!r} is not a YAML mapping") from None
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and "name" in value:
        return value
    raise UserError(f"--{what}: give a name, or a mapping with a name and settings")


def settings(argv: list[str]):
    """The search's settings from the command line over the search file."""
    from mlplab.commands.search.study import Setup

    # the search file comes first, so a fit override's value is never taken for it
    search_file = argv[0] if argv and not argv[0].startswith("-") else None
    args, extra = arguments().parse_known_args(argv[1:] if search_file else argv)
    spec = load_search_file(search_file) if search_file else {}
    configs = args.config or as_list(spec.get("config"))
    space_spec = read_yaml(args.space, "space file") if args.space else spec.get("space")
    if isinstance(space_spec, dict) and set(space_spec) == {"space"}:  # a file with a space:
        space_spec = space_spec["space"]
    if not configs or space_spec is None:
        raise UserError("give --config and --space, or a search file with config and space")
    for config in configs:
        if not Path(config).is_file():
            raise UserError(f"config file {config} does not exist")
    space = parse_space(space_spec)
    all_keys(space)
    metric = args.metric or spec.get("metric", "val/loss")
    if not isinstance(metric, str):
        raise UserError(f"--metric must be a metric's name, e.g. val/acc; got {metric!r}")
    direction = args.direction or spec.get("direction") or OPTUNA_DIRECTION[better(metric)]
    if direction not in DIRECTIONS:
        raise UserError(f"--direction {direction!r}: write minimize or maximize")
    n_trials = args.n_trials if args.n_trials is not None else spec.get("n_trials", 20)
    timeout = args.timeout if args.timeout is not None else spec.get("timeout")
    if not isinstance(n_trials, int) or n_trials < 1:
        raise UserError(f"--n_trials must be a positive integer, got {n_trials!r}")
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout!r}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    stack = args.stack if args.stack is not None else spec.get("stack", 0)
    if not isinstance(stack, int) or stack < 0:
        raise UserError(f"--stack {stack!r}: the number of trials trained together (0: each "
                        "alone)")  # fmt: skip
    experiment = args.experiment_name or Path(configs[0]).stem
    setup = Setup(
        configs=configs,
        space_spec=space_spec,
        space=space,
        metric=metric,
        direction=direction,
        n_trials=n_trials,
        timeout=timeout,
        sampler=named(args.sampler or spec.get("sampler", "tpe"), "sampler"),
        pruner=named(args.pruner or spec.get("pruner", "median"), "pruner"),
        extra=[*map(str, spec.get("args", [])), *extra],
        experiment=experiment,
        name=args.name or spec.get("name") or f"search-{experiment}",
        tracking_uri=args.tracking_uri,
        storage=args.storage,
        register_model=args.register_model,
        register_alias=args.register_alias,
        argv=argv,
        stack=stack,
    )
    return setup, args


def as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def main(argv: list[str]) -> None:
    from mlplab.tracking import provenance

    provenance.command_line = ["search", *argv]  # what the parent run records
    setup, args = settings(argv)
    from mlplab.commands.search.outcome import record_outcome
    from mlplab.commands.search.study import PRUNERS, SAMPLERS, Search, component

    component(setup.sampler, SAMPLERS, "sampler")  # refused now, not after a study exists
    component(setup.pruner, PRUNERS, "pruner")
    check_storage(setup.storage, setup.tracking_uri)
    written = None if args.worker else check_config(setup)
    if setup.stack:
        from mlplab.commands.search.stacked import StackedSearch

        search = StackedSearch(setup)
    else:
        search = Search(setup)
    search.run(args.workers, written, worker=args.worker, record=record_outcome)
    if not args.worker and not search.completed:
        sys.exit(1)  # every trial failed or was pruned: the search found nothing


def check_storage(storage: str | None, tracking_uri: str | None) -> None:
    """`--storage` is a database URL, and not MLflow's own SQLite file (both keep an
    `alembic_version` table)."""
    if storage is None:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from mlplab.tracking.store import redact_uri, resolve_tracking_uri

    try:
        url = make_url(storage)
    except ArgumentError:
        raise UserError(
            f"--storage {redact_uri(storage)!r} is not a database URL; write e.g. "
            "sqlite:///mlruns/optuna.db or postgresql://user@host/optuna"
        ) from None
    mlflow = resolve_tracking_uri(tracking_uri)
    if url.get_backend_name() == "sqlite" and mlflow.startswith("sqlite:"):
        theirs = make_url(mlflow).database
        if url.database and theirs and Path(url.database).resolve() == Path(theirs).resolve():
            raise UserError(
                f"--storage {storage}: the Optuna study cannot live in MLflow's database (both "
                "keep an alembic_version table); name another file, e.g. mlruns/optuna.db"
            )


# --- the config against the space, before anything is created ----------------------------------
def check_config(setup) -> dict:
    """Parse and build the config as every trial will (no Trainer, no run), check each key and
    value of the space and the metric, and return trial 0: the config's own values."""
    from jsonargparse import ArgumentError

    from mlplab.commands.search.check import ConfigCheck, lookup

    base = setup.fit_args()
    try:
        check = ConfigCheck(base)
    except ArgumentError as err:
        raise UserError(f"the fit settings are refused: {parse_cause(str(err))}") from None
    check.check_metric(setup.metric)
    check.check_one_process()
    check_space(setup.space, check, base, check.config)
    params, outside = written_params(setup.space, lambda key: lookup(check.config, key))
    if outside:
        print(
            f"mlplab: trial 0 is the config as written, but samples {', '.join(outside)} "
            "(the config's value lies outside the space)",
            file=sys.stderr,
        )
    return params


def check_space(space: dict[str, Dimension], check, base: list[str], config) -> None:
    from jsonargparse import ArgumentError

    from mlplab.commands.search.check import not_a_setting

    for key, dim in space.items():
        if key == "config":
            for path in dim.choices:
                if not Path(str(path)).is_file():
                    raise UserError(f"search space config: {path} does not exist")
        elif (hint := not_a_setting(config, key)) is not None:
            raise UserError(f"search space: {key} is not a setting of this config{hint}")
        for value in dim.values():
            args = [*base, *point_args({key: value})]
            try:
                parsed = check.parse(args)
            except ArgumentError as err:
                reason = parse_cause(str(err))
                raise UserError(f"search space {key}: {value!r} is refused: {reason}") from None
            branch = (
                dim.branches.get(dim.labels[dim.choices.index(value)]) if dim.branches else None
            )
            if branch:
                check_space(branch, check, args, parsed)
