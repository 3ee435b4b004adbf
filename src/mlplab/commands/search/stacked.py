"""`mlplab search --stack N`: Optuna is asked for N trials at a time (ask-and-tell), the ones
that share an architecture train as one stacked model (`mlplab.speed.stacked`), each reports
its metric at every validation and is pruned alone (it leaves the stack, its run ends KILLED,
its trial PRUNED; its mates go on), and each is told its result. A trial that cannot be stacked
runs as an ordinary trial, with one line saying why. The study and the parent are the search's
own, so the same command again continues it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import warnings

import optuna
from optuna.trial import TrialState

from mlplab.commands.search.space import suggest
from mlplab.commands.search.study import HOST, Search, TrialFailed, counted, say
from mlplab.commands.sweep import MATES_TAG, STACK_TAG, point_args, point_name
from mlplab.errors import UserError


class StackedSearch(Search):
    def run_trials(self, study: optuna.Study) -> None:
        optimize(self, study, self.setup.stack)


def optimize(search: Search, study: optuna.Study, size: int) -> None:
    from mlplab.speed.stacked import Builder, check_memory

    builder = Builder()  # one parser for every trial of the search
    check_memory(builder.build(search.setup.fit_args()), size)  # the config as written
    kept: dict[str, tuple] = {}  # the best stacked trial so far: run id -> (trial, record)
    started = time.monotonic()
    timeout = search.setup.timeout
    while True:
        with warnings.catch_warnings():  # "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # as `Study.optimize` does before a trial
        search.reclaim(study)
        trials = study.get_trials(deepcopy=False)
        running = sum(t.state == TrialState.RUNNING for t in trials)  # other workers' too
        left = search.setup.n_trials - sum(map(counted, trials)) - running
        if left <= 0:
            break
        if timeout is not None and time.monotonic() - started > timeout:
            say(f"search {search.setup.name}: --timeout {timeout:g} s reached")
            break
        with warnings.catch_warnings():  # their heartbeats are recorded here (`heartbeats`)
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            asked = [study.ask() for _ in range(min(size, left))]
        with heartbeats(search, study, asked):
            run_batch(search, study, asked, builder, kept)
    run_id = best_run(study)
    if run_id in kept:  # the best trial trained stacked here: its model (alone, it has one)
        from mlplab.tracking import trial_runs

        trial, record = kept[run_id]
        trial_runs.log_model(run_id, trial, record, search.setup.experiment, search.uri)


@contextlib.contextmanager
def heartbeats(search: Search, study: optuna.Study, asked: list[optuna.Trial]):
    """The asked trials' heartbeats while they train: `Study.optimize` records them for the
    trial it runs, and these run outside it. If this process dies, another machine's search
    fails them and asks them again, as it does a lost fit's trial (`fail_stale_trials`)."""
    storage = search.storage
    study_id = storage.get_study_id_from_name(study.study_name)
    ids = [storage.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in asked]
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in ids:
                storage.record_heartbeat(trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name="mlplab-heartbeats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def best_run(study: optuna.Study) -> str | None:
    """The MLflow run of the study's best trial (None before any completed)."""
    complete = any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    return study.best_trial.user_attrs.get("mlflow.run_id") if complete else None


def run_batch(
    search: Search, study: optuna.Study, asked: list[optuna.Trial], builder, kept: dict
) -> None:
    """Build the asked trials as their fits would be, stack those that can share a stack,
    and run the others one by one as the search always runs a trial."""
    from mlplab.speed import stacked

    setup = search.setup
    groups: dict[str, list] = {}
    alone = []
    for trial in asked:
        for key, value in {"mlplab.host": HOST, "mlplab.pid": os.getpid(), "mlplab.epochs": 0,
                           "mlflow.run_id": None}.items():  # fmt: skip
            trial.set_user_attr(key, value)
        point = suggest(trial, setup.space)
        names = {"experiment_name": setup.experiment, "run_name": f"trial-{trial.number}"}
        args = [*setup.fit_args(point), *point_args(names)]
        # the space's bounds and choices were checked against the config before the first
        # trial (`check_space`); a value between two bounds is taken as checked
        try:
            built = builder.build(args, checked={**point, **names})
            built.point, built.optuna = point, trial
            why = stacked.refusal(built)
        except Exception as err:  # noqa: BLE001 - its own fit says what is wrong
            why = f"it cannot be built: {(str(err).strip().splitlines() or [''])[0][:200]}"
        if why is not None:
            say(f"trial {trial.number} cannot be stacked ({why}); it trains alone")
            alone.append(trial)
            continue
        key = json.dumps(stacked.stack_key(built), sort_keys=True, default=str)
        groups.setdefault(key, []).append(built)
    for group in groups.values():
        try:
            fit = stacked.StackedFit(group)
        except ValueError as err:  # e.g. a buffer that differs between the trials
            say(f"trials {', '.join(str(b.optuna.number) for b in group)} cannot be stacked "
                f"({err}); they train alone")  # fmt: skip
            alone += [built.optuna for built in group]
            continue
        written = train_stack(search, study, group, fit)
        run_id = best_run(study)
        if run_id in written:
            kept.clear()
            kept[run_id] = written[run_id]
    for trial in alone:
        try:
            value = search.objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except TrialFailed:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)


def train_stack(search: Search, study: optuna.Study, group: list, fit) -> dict[str, tuple]:
    """Train one stack, write and tell each trial; their trials and records by run id."""
    from mlplab.speed.stacked import MASKS, draws_masks
    from mlplab.tracking import trial_runs
    from mlplab.tracking.logger import dataset_inputs
    from mlplab.tracking.store import ensure_experiment

    setup = search.setup
    numbers = [t.optuna.number for t in group]
    say(f"trials {', '.join(map(str, numbers))}: one stack of {len(group)}")
    if draws_masks(group[0]):
        say(f"trials {', '.join(map(str, numbers))} have dropout; {MASKS}")
    for built in group:
        say(f"trial {built.optuna.number}: {point_name(built.point)}")
    validations = {id(t): 0 for t in group}
    values: dict[int, float] = {}
    why: dict[int, str] = {}  # a pruned trial's reason, as a pruned fit's run says it

    def report(trials, found, epoch):
        pruned = []
        for position, (built, metrics) in enumerate(zip(trials, found, strict=True)):
            trial = built.optuna
            value = metrics[setup.metric]
            values[id(built)] = value
            trial.report(value, validations[id(built)])
            validations[id(built)] += 1
            if trial.should_prune():
                why[id(built)] = (f"pruned by Optuna after epoch {epoch} "
                                  f"({setup.metric} {value:.4f})")  # fmt: skip
                say(f"trial {trial.number}: {why[id(built)]}")
                pruned.append(position)
        return pruned

    records = fit.run(on_validation=report)
    client = search.client
    experiment_id = ensure_experiment(client, setup.experiment, search.uri)
    inputs = dataset_inputs(group[0].datamodule)
    names = [f"trial-{n}" for n in numbers]
    stack = f"{search.study_name}-{numbers[0]}"
    written, unvalidated = {}, None
    for built, record, name in zip(group, records, names, strict=True):
        trial = built.optuna
        value = values.get(id(built))
        extra, status = {}, "FINISHED"  # a trial whose metric is not finite: its fit finished
        if record.pruned:
            state, status = TrialState.PRUNED, "KILLED"
            extra["mlplab.failure"] = why[id(built)]
        elif record.failure:
            state, status = TrialState.FAIL, "FAILED"
            extra["mlplab.failure"] = record.failure
            trial.set_user_attr("mlplab.error", record.failure)
        elif value is None:
            state = TrialState.FAIL
            unvalidated = "the fit ran no validation, so there is no val/ metric to compare"
            trial.set_user_attr("mlplab.error", unvalidated)
        elif not math.isfinite(value):
            state = TrialState.FAIL
            trial.set_user_attr("mlplab.error", f"{setup.metric} is {value}")
        else:
            state = TrialState.COMPLETE
        tags = {"mlflow.parentRunId": search.parent, "optuna.study": search.study_name,
                "optuna.trial": str(trial.number), "optuna.state": state.name,
                STACK_TAG: stack, MATES_TAG: ", ".join(n for n in names if n != name)[:5000],
                **extra}  # fmt: skip
        run_id = trial_runs.write(client, experiment_id, built, record, name, tags, inputs,
                                  status, setup.experiment, search.uri)  # fmt: skip
        trial.set_user_attr("mlflow.run_id", run_id)
        trial.set_user_attr("mlplab.epochs", record.epochs)
        if state == TrialState.COMPLETE:
            study.tell(trial, value)
            outcome = f"{setup.metric} {value:.4f}"
        else:
            study.tell(trial, state=state)
            outcome = {TrialState.PRUNED: "pruned"}.get(state, "failed")
        say(f"trial {trial.number}: {outcome} after {record.epochs} epochs (stacked)")
        written[run_id] = (built, record)
    if unvalidated is not None:  # every trial would fail alike, as in a search of fits
        raise UserError(f"{unvalidated}; the data needs a validation split")
    return written
