"""`mlplab sweep`: every combination of a grid as an MLflow child run under one parent run.

    mlplab sweep --config configs/mnist.yaml --grid model.lr=[0.1,0.01] data.batch_size=[32,64]
    mlplab sweep configs/sweeps/mnist_optimizers.yaml --workers 2

Each child is an ordinary `mlplab fit` (a subprocess) with the point's settings as CLI
overrides; a grid key `config` adds a config file instead (e.g. an optimizer partial). The
parent records the grid, each child's point and the best child by `--metric`. Running the same
sweep again continues it: children that finished are not rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from mlplab.direction import better
from mlplab.errors import CommandParser, UserError
from mlplab.tracking.store import (
    ensure_experiment,
    local_store_root,
    open_store,
    redact_uri,
    store_lock,
)

POINT_TAG = "mlplab.sweep.point"
KEY_TAG = "mlplab.sweep.key"
STACK_TAG = "mlplab.stack"  # the stack a child trained in (`--stack`)
MATES_TAG = "mlplab.stack.mates"  # the names of the children it trained with


def parse_grid(items: list[str]) -> dict[str, list]:
    """`["model.lr=[0.1,0.01]", "config=[a.yaml,b.yaml]"]` -> {"model.lr": [0.1, 0.01], ...}."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        try:
            parsed = yaml.safe_load(values) if sep else None
        except yaml.YAMLError:
            parsed = None  # e.g. "[0.1," when the shell split the list at a space
        if not sep or not key or not isinstance(parsed, list) or not parsed:
            raise UserError(f"--grid {item!r}: write KEY=[VALUE, ...], e.g. model.lr=[0.1,0.01]")
        grid[key.strip()] = parsed
    return grid


def without_repeats(grid: dict[str, list]) -> dict[str, list]:
    """Each value of a dimension once, saying which were given twice: the same point trained
    twice would be two runs of one setting."""
    unique = {}
    for key, values in grid.items():
        unique[key] = [v for i, v in enumerate(values) if v not in values[:i]]
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            shown = ", ".join(f"{key}={v}" for v in repeated)
            print(f"mlplab: sweep: {shown} given twice in the grid; trained once", file=sys.stderr)
    return unique


def check_grid(configs: list[str], grid: dict[str, list], extra: list[str]) -> None:
    """Every key a setting of the config, every value one it takes, as `mlplab fit` parses and
    builds them (no Trainer, no run): before the parent run exists, as `mlplab search` checks
    its space."""
    from jsonargparse import ArgumentError

    from mlplab.commands.search.check import ConfigCheck, not_a_setting
    from mlplab.errors import parse_cause

    base = ["--trainer.devices=1", *[a for c in configs for a in ("--config", c)], *extra]
    try:
        check = ConfigCheck(base)
    except ArgumentError as err:
        raise UserError(f"the fit settings are refused: {parse_cause(str(err))}") from None
    for key, values in grid.items():
        if key != "config" and (hint := not_a_setting(check.config, key)) is not None:
            raise UserError(f"--grid {key}: not a setting of this config{hint}")
        for value in values:
            try:  # parsed, then built: a class refuses what its type admits (a negative lr)
                check.config = check.parse([*base, *point_args({key: value})])
                check.instantiate_classes()
            except ArgumentError as err:
                reason = parse_cause(str(err))
                raise UserError(f"--grid {key}: {value!r} is refused: {reason}") from None
            except UserError as err:
                raise UserError(f"--grid {key}: {value!r} is refused: {err}") from None


def points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def point_args(point: dict) -> list[str]:
    """CLI arguments for one point: `--config FILE` for `config`, `--KEY=VALUE` otherwise."""
    args = []
    for key, value in point.items():
        if key == "config":
            args += ["--config", str(value)]
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            args.append(f"--{key}={text}")
    return args


def point_name(point: dict) -> str:
    return ",".join(
        f"{k}={Path(v).stem if k == 'config' else v}" for k, v in point.items()
    ).replace(" ", "")


def open_parent(
    client, uri, experiment, name, key_tag, key, command, params, configs=()
) -> str:
    """A parent run found by its key (`key_tag`), so that running the same sweep or search
    again continues it; else a new one with `params` and where it comes from (the command
    line, the `configs`' commit: `mlplab.tracking.provenance`)."""
    experiment_id = ensure_experiment(client, experiment, uri)
    earlier = client.search_runs(
        [experiment_id], f"tags.`{key_tag}` = '{key}'", order_by=["start_time DESC"]
    )
    if earlier:
        run_id = earlier[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        print(f"mlplab: continuing {command} {name} (parent run {run_id})", file=sys.stderr)
        return run_id
    from mlplab.tracking import provenance

    tags = {**provenance.of_this_process(command, list(configs)), key_tag: key,
            "mlplab.command": command}  # fmt: skip
    run_id = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
    for param, value in params.items():
        client.log_param(run_id, param, str(value)[:6000])
    return run_id


def load_sweep_file(path: str) -> dict:
    if not Path(path).is_file():
        raise UserError(f"sweep file {path} does not exist (or is not a file)")
    try:
        spec = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"cannot read sweep file {path}: {reason}") from None
    known = {"config", "grid", "metric", "mode", "goal", "args", "name", "stack", "search"}
    unknown = set(spec) - known
    if unknown or not isinstance(spec.get("grid"), dict):
        raise UserError(
            f"sweep file {path}: expected keys config, grid (a mapping), metric, mode, goal, "
            f"args, name, stack, search (for `mlplab search`); got {sorted(spec)}"
        )
    return spec


class Sweep:
    def __init__(
        self, configs, grid, metric, mode, extra, experiment, name, tracking_uri, goal=None
    ):
        """`goal`: a value of `metric` the parent counts the children reaching (per group)."""
        self.configs, self.grid, self.metric, self.mode = configs, grid, metric, mode
        self.goal = goal
        self.log_models = "best"  # or "all": which stacked children get a logged model
        self.kept: dict[str, tuple] = {}  # stacked children's trials and records, by run id
        self.extra, self.experiment, self.name = extra, experiment, name
        self.uri = open_store(tracking_uri)
        identity = json.dumps([configs, grid, extra, metric], sort_keys=True, default=str)
        self.key = hashlib.sha1(identity.encode()).hexdigest()[:12]
        from mlflow.tracking import MlflowClient

        with store_lock(local_store_root(self.uri)):
            self.client = MlflowClient(self.uri)

    def parent(self) -> str:
        """The sweep's parent run: the unfinished one of an earlier attempt, else a new one."""
        params = {"sweep.config": ",".join(self.configs), "sweep.metric": self.metric,
                  "sweep.mode": self.mode, "sweep.size": len(points(self.grid))}  # fmt: skip
        params.update({f"sweep.grid.{k}": json.dumps(v) for k, v in self.grid.items()})
        return open_parent(
            self.client, self.uri, self.experiment, self.name, KEY_TAG, self.key, "sweep", params,
            self.configs,
        )  # fmt: skip

    def children(self, parent: str) -> list:
        experiment = self.client.get_experiment_by_name(self.experiment)
        return self.client.search_runs(
            [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
        )

    def fit_args(self, point: dict) -> list[str]:
        """The `mlplab fit` arguments of one point."""
        return [*[arg for config in self.configs for arg in ("--config", config)],
                *point_args(point), *self.extra, "--experiment_name", self.experiment,
                "--run_name", point_name(point)]  # fmt: skip

    def plan_stacks(self, todo: list[dict], size: int) -> tuple[list[list], list[dict]]:
        """The points that can share a stack, built as their fits would be and grouped `size`
        at a time (`mlplab.speed.stacked`); the points left to train alone, having said why.
        A stack that would not fit in memory is refused here, with the size that fits."""
        from mlplab.speed import stacked

        trials, alone, reasons = [], [], {}
        builder = stacked.Builder()
        for point in todo:
            try:
                trial = builder.build(self.fit_args(point))
                trial.point = point
                why = stacked.refusal(trial)
            except Exception as err:  # noqa: BLE001 - its own fit says what is wrong
                why = f"it cannot be built: {(str(err).strip().splitlines() or [''])[0][:200]}"
            if why is None:
                trials.append(trial)
            else:
                alone.append(point)
                reasons.setdefault(why, []).append(point_name(point))
        for why, names in reasons.items():
            shown = names[0] if len(names) == 1 else f"{len(names)} points"
            print(f"mlplab: sweep: {shown} cannot be stacked ({why}); trained alone",
                  file=sys.stderr)  # fmt: skip
        groups: dict[str, list] = {}
        for trial in trials:
            key = json.dumps(stacked.stack_key(trial), sort_keys=True, default=str)
            groups.setdefault(key, []).append(trial)
        if len(groups) > 1:
            keys = stacked.apart([stacked.stack_key(g[0]) for g in groups.values()])
            shown = ", ".join(dict.fromkeys(_short(k) for k in keys))
            print(f"mlplab: sweep: {len(groups)} groups train in separate stacks; they differ "
                  f"in {shown}", file=sys.stderr)  # fmt: skip
        skipped = sorted({name for trial in trials for name in trial.callbacks})
        if skipped:
            print(f"mlplab: sweep: stacked children run without the config's callbacks "
                  f"({', '.join(skipped)})", file=sys.stderr)  # fmt: skip
        masked = sum(map(stacked.draws_masks, trials))
        if masked:
            print(f"mlplab: sweep: {masked} stacked points have dropout; {stacked.MASKS}",
                  file=sys.stderr)  # fmt: skip
        for group in groups.values():
            stacked.check_memory(group[0], min(size, len(group)))
        return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)], alone

    def train_stack(self, parent: str, trials: list) -> list[int]:
        """Train one stack and write each trial as a child run; their exit codes (1: its
        training diverged, as a plain child's fit would fail)."""
        from mlplab.speed.stacked import StackedFit
        from mlplab.tracking import trial_runs
        from mlplab.tracking.logger import dataset_inputs

        try:
            fit = StackedFit(trials)
        except ValueError as err:  # e.g. a buffer that differs between the trials
            print(f"mlplab: sweep: {len(trials)} points cannot be stacked ({err}); trained alone",
                  file=sys.stderr)  # fmt: skip
            return [self.run_child(parent, trial.point) for trial in trials]
        records = fit.run()
        experiment_id = ensure_experiment(self.client, self.experiment, self.uri)
        inputs = dataset_inputs(trials[0].datamodule)
        names = [point_name(trial.point) for trial in trials]
        stack = hashlib.sha1(json.dumps([parent, names]).encode()).hexdigest()[:8]
        codes = []
        for trial, record, name in zip(trials, records, names, strict=True):
            mates = ", ".join(n for n in names if n != name)
            tags = {"mlflow.parentRunId": parent, POINT_TAG: _key(trial.point),
                    STACK_TAG: stack, MATES_TAG: mates[:5000]}  # fmt: skip
            status = "FINISHED"
            if record.failure:
                tags["mlplab.failure"], status = record.failure, "FAILED"
            run_id = trial_runs.write(self.client, experiment_id, trial, record, name, tags,
                                      inputs, status, self.experiment, self.uri)  # fmt: skip
            said = "done" if not record.failure else f"FAILED\n  {record.failure}"
            print(f"mlplab: sweep child {name}: {said} (stacked, {len(trials)} trials)",
                  file=sys.stderr)  # fmt: skip
            codes.append(1 if record.failure else 0)
            if record.failure:
                continue
            if self.log_models == "all":
                trial_runs.log_model(run_id, trial, record, self.experiment, self.uri)
            else:  # the best so far, until the best of all is known
                self.keep_if_best(run_id, trial, record)
        return codes

    def keep_if_best(self, run_id: str, trial, record) -> None:
        """Keep this stacked child's trial and record if its `metric` is the best so far (as
        `best` reads it: the value at the last step), with those it ties, forgetting worse."""
        values = [(step, value) for key, value, step in record.metrics if key == self.metric]
        if not values or not math.isfinite(value := max(values)[1]):
            return
        kept = next(iter(self.kept.values()), None)
        if kept is not None and value != kept[2]:
            if (value < kept[2]) if self.mode == "max" else (value > kept[2]):
                return
            self.kept.clear()
        self.kept[run_id] = (trial, record, value)

    def run_child(self, parent: str, point: dict) -> int:
        # a URI with a password in it goes to the child in its environment, never on its
        # command line (which every user of the machine can list)
        secret = redact_uri(self.uri) != self.uri
        command = [
            sys.executable, "-m", "mlplab", "fit", *self.fit_args(point),
            *([] if secret else ["--tracking_uri", self.uri]),
            "--tags", json.dumps({"mlflow.parentRunId": parent, POINT_TAG: _key(point)}),
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        status = "done" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        print(f"mlplab: sweep child {point_name(point)}: {status}", file=sys.stderr)
        if result.returncode != 0:  # the child's own error, not the tip after it
            said = [line for line in result.stderr.strip().splitlines()
                    if line.strip() and not line.startswith("tip:")]  # fmt: skip
            print(f"  {said[-1].strip() if said else 'no message'}", file=sys.stderr)
        return result.returncode

    def finished(self) -> set[str]:
        """The points an earlier attempt of this sweep finished (none for a new sweep)."""
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return set()
        earlier = self.client.search_runs(
            [experiment.experiment_id], f"tags.`{KEY_TAG}` = '{self.key}'",
            order_by=["start_time DESC"],
        )  # fmt: skip
        if not earlier:
            return set()
        children = self.children(earlier[0].info.run_id)
        return {r.data.tags.get(POINT_TAG) for r in children if r.info.status == "FINISHED"}

    def run(self, workers: int, stack: int = 0) -> dict:
        finished = self.finished()
        todo = [p for p in points(self.grid) if _key(p) not in finished]
        skipped = len(points(self.grid)) - len(todo)
        # stacks are planned (and their memory checked) before the parent run exists
        stacks, alone = self.plan_stacks(todo, stack) if stack else ([], todo)
        parent = self.parent()
        print(
            f"mlplab: sweep {self.name}: {len(todo)} to run, {skipped} finished before",
            file=sys.stderr,
        )
        try:
            codes = [code for chunk in stacks for code in self.train_stack(parent, chunk)]
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                codes += list(pool.map(lambda p: self.run_child(parent, p), alone))
        except BaseException as err:  # the parent never stays RUNNING
            interrupted = isinstance(err, KeyboardInterrupt | SystemExit)
            self.client.set_terminated(parent, "KILLED" if interrupted else "FAILED")
            raise
        best = self.best(parent)
        if best is not None and best.info.run_id in self.kept:  # a stacked child: its model
            from mlplab.tracking import trial_runs

            trial, record, _ = self.kept[best.info.run_id]
            trial_runs.log_model(best.info.run_id, trial, record, self.experiment, self.uri)
        elif best is not None and STACK_TAG in best.data.tags and not self.has_model(best):
            self.model_from_checkpoint(best)
        if best is not None:
            self.client.set_tag(parent, "mlplab.best_child", best.info.run_id)
            self.client.set_tag(parent, "mlplab.best_child_name", best.info.run_name)  # as listed
            self.client.log_metric(parent, f"best/{self.metric}", best.data.metrics[self.metric])
            print(
                f"mlplab: best child {best.info.run_name} ({best.info.run_id}): "
                f"{self.metric}={best.data.metrics[self.metric]:.4f}"
            )
        self.record_groups(parent)
        failed = sum(code != 0 for code in codes)
        self.client.set_terminated(parent, "FAILED" if failed else "FINISHED")
        return {"parent": parent, "best": best, "failed": failed, "ran": len(todo)}

    def groups(self, parent: str) -> dict[str, list]:
        """The finished children by their values of the grid's other dimensions than the seed
        (one group when the seed is all the grid varies)."""
        kept = [k for k in self.grid if k != "seed_everything" and len(self.grid[k]) > 1]
        found: dict[str, list] = {}
        for run in self.children(parent):
            point = json.loads(run.data.tags.get(POINT_TAG, "{}"))
            if run.info.status == "FINISHED" and self.metric in run.data.metrics:
                name = point_name({k: point[k] for k in kept if k in point}) or "all"
                found.setdefault(name, []).append(run)
        return dict(sorted(found.items()))

    def record_groups(self, parent: str) -> None:
        """Per group: how many children reached `goal` (a metric `goal/reached/GROUP` and one
        line), and a figure of every child's final training loss and `metric`."""
        groups = self.groups(parent)
        if not groups:
            return
        if self.goal is not None:
            reached = {}
            for name, runs in groups.items():
                values = [r.data.metrics[self.metric] for r in runs]
                count = sum(v >= self.goal if self.mode == "max" else v <= self.goal
                            for v in values)  # fmt: skip
                reached[name] = count
                key = re.sub(r"[^\w\-. /]", "_", name)  # MLflow's key characters
                self.client.log_metric(parent, f"goal/reached/{key}", count)
                self.client.log_metric(parent, f"goal/children/{key}", len(runs))
            sign = ">=" if self.mode == "max" else "<="
            said = "; ".join(f"{name}: {reached[name]} of {len(runs)}"
                             for name, runs in groups.items())  # fmt: skip
            print(f"mlplab: sweep {self.name}: {self.metric} {sign} {self.goal} reached by {said}")
        from mlplab.commands.sweep_figure import final_values

        self.client.log_figure(parent, final_values(groups, self.metric), "figures/final.png")

    def has_model(self, run) -> bool:
        found = self.client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'", max_results=1,
        )  # fmt: skip
        return bool(found)

    def model_from_checkpoint(self, run) -> None:
        """The logged model of a stacked best child that an earlier attempt wrote and was
        stopped before the model (logged once every stack has trained): from its best
        checkpoint, at its step, as `keep_if_best` would have had it logged."""
        from mlplab.safety.trust import read_checkpoint
        from mlplab.speed.stacked import Record, build
        from mlplab.tracking import trial_runs
        from mlplab.tracking.store import experiment_dir

        folder = experiment_dir(self.experiment, self.uri) / run.info.run_id / "checkpoints"
        saved = sorted((p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"),
                       key=lambda path: path.stat().st_mtime)  # the newest best last
        if not saved:
            print(f"mlplab: best child {run.info.run_name} has no checkpoint to log its model "
                  f"from (looked in {folder})", file=sys.stderr)  # fmt: skip
            return
        checkpoint = read_checkpoint(saved[-1])
        trial = build(self.fit_args(json.loads(run.data.tags[POINT_TAG])))
        trial.datamodule.setup("fit")
        record = Record(weights=dict(checkpoint["state_dict"]),
                        best_step=checkpoint["global_step"])  # fmt: skip
        trial_runs.log_model(run.info.run_id, trial, record, self.experiment, self.uri)

    def best(self, parent: str):
        done = [r for r in self.children(parent)
                if r.info.status == "FINISHED" and self.metric in r.data.metrics]  # fmt: skip
        if not done:
            return None
        pick = max if self.mode == "max" else min
        return pick(done, key=lambda r: r.data.metrics[self.metric])


def _short(key: str) -> str:
    """`model.init_args.net.init_args.hidden_sizes` as the command line names it."""
    return ".".join(p for p in key.split(".") if p != "init_args").removesuffix(".class_path")


def _key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


def main(argv: list[str]) -> None:
    from mlplab.tracking import provenance

    provenance.command_line = ["sweep", *argv]  # what the parent run records
    parser = CommandParser(
        prog="mlplab sweep",
        usage="mlplab sweep [SWEEP_FILE] [options] [fit overrides, e.g. --trainer.max_epochs 5]",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--config", action="append", default=[], help="experiment config(s)")
    parser.add_argument("--grid", nargs="+", default=[], help="KEY=[V1,V2,...] per dimension")
    parser.add_argument("--metric", help="what picks the best child (default val/loss)")
    parser.add_argument("--mode", choices=["min", "max"], help="default: min for losses/errors")
    parser.add_argument("--goal", type=float, help="count the children whose metric reaches it")
    parser.add_argument("--log_models", choices=["best", "all"], default="best",
                        help="stacked children that get a logged model (a plain child always "
                        "has one)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="children run in parallel")
    parser.add_argument("--stack", type=int, help="train up to N children of one architecture "
                        "as one stacked model (default: each its own fit)")  # fmt: skip
    parser.add_argument("--experiment_name", help="default: the first config's name")
    parser.add_argument("--name", help="the parent run's name (default sweep-<experiment>)")
    parser.add_argument("--tracking_uri")
    parser.add_argument("--register_model", help="register the best child's model as NAME")
    # the sweep file comes first, so a fit override's value is never taken for it
    sweep_file = argv[0] if argv and not argv[0].startswith("-") else None
    args, extra = parser.parse_known_args(argv[1:] if sweep_file else argv)
    spec = load_sweep_file(sweep_file) if sweep_file else {}
    configs = args.config or _as_list(spec.get("config"))
    grid = {**{k: _as_list(v) for k, v in spec.get("grid", {}).items()}, **parse_grid(args.grid)}
    if not configs or not grid:
        parser.exit(2, "mlplab sweep: error: give --config and --grid, or a sweep file\n")
    for config in configs + [v for v in grid.get("config", [])]:
        if not Path(config).is_file():
            parser.exit(2, f"mlplab sweep: error: config file {config} does not exist\n")
    if args.workers < 1:
        parser.exit(2, f"mlplab sweep: error: --workers {args.workers}: at least 1\n")
    stack = args.stack if args.stack is not None else spec.get("stack", 0)
    if not isinstance(stack, int) or stack < 0:
        parser.exit(2, f"mlplab sweep: error: --stack {stack}: the number of trials trained "
                       "together (0: each alone)\n")  # fmt: skip
    metric = args.metric or spec.get("metric", "val/loss")
    mode = args.mode or spec.get("mode") or better(metric)
    experiment = args.experiment_name or Path(configs[0]).stem
    name = args.name or spec.get("name") or f"sweep-{experiment}"
    extra = [*map(str, spec.get("args", [])), *extra]
    grid = without_repeats(grid)
    try:
        check_grid(configs, grid, extra)
    except UserError as err:
        parser.exit(2, f"mlplab sweep: error: {err}\n")
    goal = args.goal if args.goal is not None else spec.get("goal")
    if goal is not None and not (isinstance(goal, int | float) and math.isfinite(goal)):
        parser.exit(2, f"mlplab sweep: error: goal {goal!r}: a number, e.g. 1.0 for val/acc\n")
    sweep = Sweep(configs, grid, metric, mode, extra, experiment, name, args.tracking_uri, goal)
    sweep.log_models = args.log_models
    result = sweep.run(args.workers, stack)
    if args.register_model and result["best"] is not None:
        from mlplab.tracking.logged_models import register_model

        register_model(f"runs:/{result['best'].info.run_id}/model", args.register_model, sweep.uri)
    if result["failed"]:
        sys.exit(1)


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]
