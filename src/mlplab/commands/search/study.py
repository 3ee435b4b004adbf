"""An Optuna study whose trials are `mlplab fit` runs: MLflow child runs under one parent run.

The study lives in its own database beside the MLflow store (`mlruns/optuna.db`: Optuna and
MLflow both keep an `alembic_version` table, so they cannot share a file). Both are found again
by the search's key (its configs, space, overrides, metric and direction), so running the same
command again continues the same study and the same parent run, up to `n_trials` results.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

# Lightning's exceptions have no other import path (its API reference lists no module for them)
from lightning.pytorch.utilities.exceptions import SIGTERMException
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from mlplab.commands.search.pruning import MetricNotLogged, Pruned, PruneTrial
from mlplab.commands.search.space import Dimension, suggest
from mlplab.commands.sweep import open_parent, point_args, point_name
from mlplab.errors import UserError, refused
from mlplab.tracking.store import (
    local_store_root,
    open_store,
    redact_uri,
    resolve_tracking_uri,
    store_lock,
)

KEY_TAG = "mlplab.search.key"
HOST = socket.gethostname()
# A trial whose process died elsewhere (another node) is failed once its heartbeat is this
# old, and retried; on this machine a dead process is seen at once (`Search.reclaim`).
HEARTBEAT_S, GRACE_S, MAX_RETRY = 10, 60, 2

# Ahead of the configs, so they and the command line decide: a trial runs in the search's
# process, on one device (Lightning's "auto" would launch DDP on a multi-GPU machine).
TRIAL_DEFAULTS = ["--trainer.devices=1"]

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}


class TrialFailed(Exception):
    """The trial's fit failed (its settings, or a diverging loss): a result, and the study
    goes on."""


@dataclass
class Setup:
    """Everything a search is run with (the command line and the search file, merged)."""

    configs: list[str]
    space_spec: dict
    space: dict[str, Dimension]
    metric: str
    direction: str
    n_trials: int
    timeout: float | None = None
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    extra: list[str] = field(default_factory=list)
    experiment: str = "default"
    name: str = "search"
    tracking_uri: str | None = None
    storage: str | None = None
    register_model: str | None = None
    register_alias: str | None = None
    argv: list[str] = field(default_factory=list)
    stack: int = 0  # trials asked at once and trained as stacks (`--stack`)

    def fit_args(self, point: dict | None = None) -> list[str]:
        """A trial's settings for `mlplab fit`: the defaults, the configs (and a `config` the
        trial chose), the command line's overrides, then the trial's values."""
        point = point or {}
        files = {k: v for k, v in point.items() if k == "config"}
        values = {k: v for k, v in point.items() if k != "config"}
        configs = [arg for path in self.configs for arg in ("--config", path)]
        return [*TRIAL_DEFAULTS, *configs, *point_args(files), *self.extra, *point_args(values)]


def component(spec: dict, table: dict, what: str):
    """A sampler or pruner from `{name: ..., setting: value, ...}`."""
    settings = dict(spec)
    name = str(settings.pop("name", ""))
    if name not in table:
        raise UserError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    try:
        with warnings.catch_warnings():  # QMC and GP samplers are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return table[name](**settings)
    except (TypeError, ValueError) as err:
        raise UserError(f"{what} {name}: {err}") from None


def default_storage(tracking_uri: str) -> str:
    """`optuna.db` in the MLflow store's folder (`mlruns/` for a tracking server)."""
    root = local_store_root(tracking_uri) or Path("mlruns")
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'optuna.db').resolve()}"


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """A result: complete, pruned, or failed by its own settings (not lost with a process)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "mlplab.error" in trial.user_attrs
    )


def alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


class Search:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.uri = resolve_tracking_uri(setup.tracking_uri)
        self.storage_url = setup.storage or default_storage(self.uri)
        identity = json.dumps(
            [setup.configs, setup.space_spec, setup.extra, setup.metric, setup.direction,
             setup.name, self.storage_url],
            sort_keys=True,
            default=str,
        )  # fmt: skip
        self.key = hashlib.sha1(identity.encode()).hexdigest()[:12]
        self.study_name = f"{setup.name}-{self.key}"
        self.parent: str | None = None
        self.completed = False  # whether any trial completed (the first process's record)

    @functools.cached_property
    def client(self):
        """MLflow's client, made once the study could be opened (it creates a new store)."""
        from mlflow.tracking import MlflowClient

        open_store(self.uri)
        with store_lock(local_store_root(self.uri)):
            return MlflowClient(self.uri)

    # --- the study and the parent run ------------------------------------------------------
    def open_study(self, written: dict | None = None, worker: int = 0) -> optuna.Study:
        """Create the study or load it; a new one's first trial is the config as written."""
        sqlite = self.storage_url.startswith("sqlite")
        with warnings.catch_warnings():  # heartbeats, metric names: "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                storage = optuna.storages.RDBStorage(
                    self.storage_url,
                    engine_kwargs={"connect_args": {"timeout": 120}} if sqlite else None,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=self.run_again,
                )
            except (ImportError, SQLAlchemyError) as err:
                reason = str(err).strip().splitlines()[0]
                raise UserError(
                    f"cannot open the Optuna storage {redact_uri(self.storage_url)}: {reason}"
                ) from None
            self.storage = storage
            study = optuna.create_study(
                study_name=self.study_name,
                storage=storage,
                pruner=component(self.setup.pruner, PRUNERS, "pruner"),
                direction=self.setup.direction,
                load_if_exists=True,
            )
            if written is not None and not study.trials:
                study.set_metric_names([self.setup.metric])
                study.enqueue_trial(written, user_attrs={"mlplab.origin": "config"})
        # A seeded sampler draws another sequence in each worker and each attempt: the same
        # sequence again would repeat the trials it drew before.
        sampler = dict(self.setup.sampler)
        if sampler.get("seed") is not None:
            sampler["seed"] += 1000 * worker + len(study.trials)
        study.sampler = component(sampler, SAMPLERS, "sampler")
        return study

    def open_parent(self) -> str:
        setup = self.setup
        params = {
            "search.config": ",".join(setup.configs),
            "search.metric": setup.metric,
            "search.direction": setup.direction,
            "search.sampler": json.dumps(setup.sampler),
            "search.pruner": json.dumps(setup.pruner),
            "search.study": self.study_name,
            "search.storage": redact_uri(self.storage_url),
            "search.args": " ".join(setup.extra),
            **{f"search.space.{k}": json.dumps(v) for k, v in setup.space_spec.items()},
        }
        return open_parent(
            self.client, self.uri, setup.experiment, setup.name, KEY_TAG, self.key, "search",
            params, setup.configs,
        )  # fmt: skip

    # --- trials --------------------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> float:
        from mlplab.cli import MLPLabCLI

        setup = self.setup
        for key, value in {"mlplab.host": HOST, "mlplab.pid": os.getpid(), "mlplab.epochs": 0,
                           "mlflow.run_id": None}.items():  # fmt: skip
            trial.set_user_attr(key, value)
        point = suggest(trial, setup.space)
        retry_of = trial.user_attrs.get("mlplab.retry_of")
        tags = {"mlflow.parentRunId": self.parent, "optuna.study": self.study_name,
                "optuna.trial": str(trial.number)}  # fmt: skip
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        args = [
            "fit", *setup.fit_args(point),
            "--experiment_name", setup.experiment, "--run_name", f"trial-{trial.number}",
            "--tracking_uri", self.uri, "--tags", json.dumps(tags),
        ]  # fmt: skip
        retry = f" (retry of trial {retry_of})" if retry_of is not None else ""
        say(f"trial {trial.number}{retry}: {point_name(point)}")
        pruning = PruneTrial(trial, setup.metric)
        try:
            MLPLabCLI(args=args, callbacks=[pruning])
        except Pruned as pruned:
            self.finish(trial, pruning, "PRUNED", "pruned")
            raise optuna.TrialPruned(str(pruned)) from None
        except SIGTERMException:
            raise  # the trial stays RUNNING with a dead process: `reclaim` retries it
        except SystemExit as exit_:
            if isinstance(exit_.__context__, KeyboardInterrupt):  # how Lightning ends a Ctrl-C
                self.finish(trial, pruning, "FAIL", "interrupted: it runs again with the search")
                raise KeyboardInterrupt from exit_
            reason = f"the fit exited with status {exit_.code} (its message is above)"
            trial.set_user_attr("mlplab.error", reason)
            self.finish(trial, pruning, "FAIL", f"failed: {reason}")
            raise TrialFailed(reason) from None
        except MetricNotLogged:
            trial.set_user_attr("mlplab.error", "metric not logged")
            raise  # every trial would fail alike: the search stops
        except Exception as err:  # noqa: BLE001 - a fit's failure is its trial's result
            if refused(err) is not None:
                raise  # the server turned these credentials away: every trial would be
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            reason = redact_uri(reason)  # MLflow's messages quote the URL
            trial.set_user_attr("mlplab.error", reason)
            self.finish(trial, pruning, "FAIL", f"failed: {reason}")
            raise TrialFailed(reason) from None
        if pruning.value is None:
            reason = "the fit ran no validation, so there is no val/ metric to compare"
            trial.set_user_attr("mlplab.error", reason)
            self.finish(trial, pruning, "FAIL", reason)
            raise UserError(f"{reason}; the data needs a validation split")
        if not math.isfinite(pruning.value):  # Optuna would fail it as if lost
            reason = f"{setup.metric} is {pruning.value}"
            trial.set_user_attr("mlplab.error", reason)
            self.finish(trial, pruning, "FAIL", f"failed: {reason}")
            raise TrialFailed(reason)
        self.finish(trial, pruning, "COMPLETE", f"{setup.metric} {pruning.value:.4f}")
        return pruning.value

    def finish(self, trial, pruning: PruneTrial, state: str, outcome: str) -> None:
        """Record what the trial spent, tag its MLflow run with the trial's state, say it."""
        trial.set_user_attr("mlplab.epochs", pruning.epochs)
        if pruning.run_id is not None:
            self.client.set_tag(pruning.run_id, "optuna.state", state)
        say(f"trial {trial.number}: {outcome} after {pruning.epochs} epochs")

    def reclaim(self, study: optuna.Study, *_) -> None:
        """Trials lost with their process on this machine (killed, interrupted) are failed and
        run again; a live process's trials, or another machine's, are left to the heartbeat.
        Workers of one SQLite study take turns, so that a lost trial is run again once."""
        with store_lock(self.lock_folder):
            self.reclaim_now(study)

    @property
    def lock_folder(self) -> Path | None:
        if not self.storage_url.startswith("sqlite:///"):
            return None  # a server's workers may race to run a lost trial again: twice at worst
        return Path(self.storage_url.removeprefix("sqlite:///")).parent

    def reclaim_now(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("mlplab.retry_of") for t in trials}
        for trial in trials:
            if trial.state == TrialState.RUNNING:
                attrs, pid = trial.user_attrs, trial.user_attrs.get("mlplab.pid")
                if attrs.get("mlplab.host") != HOST or pid is None or alive(pid):
                    continue  # another machine's, just asked for (no pid yet), or alive
                trial = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            elif trial.state != TrialState.FAIL or counted(trial) or trial.number in retried:
                continue
            elif trial.user_attrs.get("mlplab.retries", 0) >= MAX_RETRY:
                continue  # said when it was given up
            self.run_again(study, trial)

    def run_again(self, study: optuna.Study, lost: optuna.trial.FrozenTrial) -> None:
        """A lost trial: its run KILLED, its values enqueued again (up to MAX_RETRY times);
        Optuna calls this too for a trial whose heartbeat stopped."""
        run_id = lost.user_attrs.get("mlflow.run_id")
        if run_id and self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_tag(run_id, "optuna.state", "FAIL")
            self.client.set_terminated(run_id, "KILLED")
        retries = lost.user_attrs.get("mlplab.retries", 0)
        if retries >= MAX_RETRY:
            say(f"trial {lost.number} was lost {retries + 1} times: not run again")
            return
        study.enqueue_trial(
            lost.params, user_attrs={"mlplab.retry_of": lost.number, "mlplab.retries": retries + 1}
        )
        say(f"trial {lost.number} was lost with its process: it runs again")

    def budget(self, study: optuna.Study, *_) -> None:
        if sum(map(counted, study.get_trials(deepcopy=False))) >= self.setup.n_trials:
            study.stop()

    def optimize(self, study: optuna.Study) -> None:
        self.reclaim(study)
        done = sum(map(counted, study.get_trials(deepcopy=False)))
        if done >= self.setup.n_trials:
            say(f"study {self.study_name} has {done} results of {self.setup.n_trials}")
            return
        say(f"study {self.study_name}: {done} of {self.setup.n_trials} trials done before")
        self.run_trials(study)

    def run_trials(self, study: optuna.Study) -> None:
        """Trials until the study has `n_trials` results (`StackedSearch`: N at a time)."""
        study.optimize(
            self.objective,
            timeout=self.setup.timeout,
            catch=(TrialFailed,),
            callbacks=[self.reclaim, self.budget],
            gc_after_trial=True,
        )

    # --- the whole search ----------------------------------------------------------------------
    def run(
        self, workers: int, written: dict | None, worker: int = 0, record=None
    ) -> optuna.Study:
        """Run trials here and in `workers - 1` more processes (`worker` 1, 2, ...); the first
        process then records the outcome in the parent run (`record(search, study)`: whether
        any trial completed)."""
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # mlplab says each trial's outcome
        study = self.open_study(written, worker)
        self.parent = self.find_parent() if worker else self.open_parent()
        others = [] if worker else [self.spawn(n) for n in range(1, workers)]
        try:
            self.optimize(study)
            for process in others:
                process.wait()
            if not worker and record is not None:
                self.completed = record(self, study)
        except BaseException as err:
            for process in others:
                process.send_signal(signal.SIGTERM)
                process.wait()
            if not worker:
                interrupted = isinstance(err, KeyboardInterrupt | SystemExit)
                self.client.set_terminated(self.parent, "KILLED" if interrupted else "FAILED")
            raise
        return study

    def find_parent(self) -> str:
        runs = self.client.search_runs(
            [self.client.get_experiment_by_name(self.setup.experiment).experiment_id],
            f"tags.`{KEY_TAG}` = '{self.key}'",
            order_by=["start_time DESC"],
        )
        return runs[0].info.run_id

    def spawn(self, worker: int) -> subprocess.Popen:
        """Another process running trials of the same study (`--worker N`: it neither checks
        nor records the outcome; the first process does)."""
        command = [sys.executable, "-m", "mlplab", "search", *self.setup.argv,
                   "--workers", "1", "--worker", str(worker)]  # fmt: skip
        return subprocess.Popen(command)


def say(message: str) -> None:
    print(f"mlplab: {message}", file=sys.stderr, flush=True)
