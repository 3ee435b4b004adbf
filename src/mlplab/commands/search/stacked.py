"""`mlplab search --stack N`: Optuna is asked for N trials at a time (ask-and-tell), the ones
that share an architecture train as one stacked model (`mlplab.speed.stacked`), each reports
its metric at every validation and is pruned alone (it leaves the stack, its run ends KILLED,
its trial PRUNED; its mates go on), and each is told its result. A trial that cannot be stacked
runs as an ordinary trial, with one line saying why. The study and the parent are the search's
own, so the same command again continues it."""

from __future__ import annotations

import json
import math
import os
import time

import optuna
from optuna.trial import TrialState

from mlplab.commands.search.space import suggest
from mlplab.commands.search.study import HOST, Search, TrialFailed, counted, say
from mlplab.commands.sweep import point_name


def optimize(search: Search, study: optuna.Study, size: int) -> None:
    from mlplab.speed.stacked import Builder

    builder = Builder()  # one parser for every trial of the search
    kept: dict[str, tuple] = {}  # the best stacked trial so far: run id -> (trial, record)
    started = time.monotonic()
    timeout = search.setup.timeout
    while True:
        search.reclaim(study)
        done = sum(map(counted, study.get_trials(deepcopy=False)))
        left = search.setup.n_trials - done
        if left <= 0:
            break
        if timeout is not None and time.monotonic() - started > timeout:
            say(f"search {search.setup.name}: --timeout {timeout:g} s reached")
            break
        run_batch(search, study, [study.ask() for _ in range(min(size, left))], builder, kept)
    log_best_model(search, study, kept)


def log_best_model(search: Search, study: optuna.Study, kept: dict) -> None:
    """The best trial's logged model, where it trained stacked here (a trial trained alone
    logged its own)."""
    from mlplab.tracking import trial_runs

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return
    run_id = study.best_trial.user_attrs.get("mlflow.run_id")
    if run_id in kept:
        trial, record = kept[run_id]
        trial_runs.log_model(run_id, trial, record, search.setup.experiment, search.uri)


def keep_best(study: optuna.Study, kept: dict, stacked: dict) -> None:
    """Keep the trial and record of the study's best trial if it is one of `stacked` (run id
    -> (trial, record)); forget the one kept before."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    run_id = study.best_trial.user_attrs.get("mlflow.run_id") if complete else None
    if run_id in stacked:
        kept.clear()
        kept[run_id] = stacked[run_id]


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
        args = [*setup.fit_args(point), "--experiment_name", setup.experiment,
                "--run_name", f"trial-{trial.number}"]  # fmt: skip
        built = builder.build(args)
        built.point, built.optuna = point, trial
        why = stacked.refusal(built)
        if why is not None:
            say(f"trial {trial.number} cannot be stacked ({why}); it trains alone")
            alone.append(trial)
            continue
        key = json.dumps(stacked.stack_key(built), sort_keys=True, default=str)
        groups.setdefault(key, []).append(built)
    for group in groups.values():
        keep_best(study, kept, train_stack(search, study, group))
    for trial in alone:
        try:
            value = search.objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except TrialFailed:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)


def train_stack(search: Search, study: optuna.Study, group: list) -> dict[str, tuple]:
    """Train one stack, write and tell each trial; their trials and records by run id."""
    from mlplab.speed.stacked import StackedFit
    from mlplab.tracking import trial_runs
    from mlplab.tracking.logger import dataset_inputs
    from mlplab.tracking.store import ensure_experiment

    setup = search.setup
    numbers = [t.optuna.number for t in group]
    say(f"trials {', '.join(map(str, numbers))}: one stack of {len(group)}")
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

    records = StackedFit(group).run(on_validation=report)
    client = search.client
    experiment_id = ensure_experiment(client, setup.experiment, search.uri)
    inputs = dataset_inputs(group[0].datamodule)
    names = [f"trial-{n}" for n in numbers]
    written = {}
    for built, record, name in zip(group, records, names, strict=True):
        trial = built.optuna
        value = values.get(id(built))
        extra = {}
        if record.pruned:
            state, status = TrialState.PRUNED, "KILLED"
            extra["mlplab.failure"] = why[id(built)]
        elif value is None or not math.isfinite(value):
            state, status = TrialState.FAIL, "FAILED"
            reason = ("the fit ran no validation, so there is no val/ metric to compare"
                      if value is None else f"{setup.metric} is {value}")  # fmt: skip
            trial.set_user_attr("mlplab.error", reason)
        else:
            state, status = TrialState.COMPLETE, "FINISHED"
        tags = {"mlflow.parentRunId": search.parent, "optuna.study": search.study_name,
                "optuna.trial": str(trial.number), "optuna.state": state.name,
                "mlplab.stack.mates": ", ".join(n for n in names if n != name)[:5000],
                **extra}  # fmt: skip
        run_id = trial_runs.write(client, experiment_id, built, record, name, tags, inputs,
                                  status=status)  # fmt: skip
        trial.set_user_attr("mlflow.run_id", run_id)
        trial.set_user_attr("mlplab.epochs", record.epochs)
        outcome = {TrialState.COMPLETE: f"{setup.metric} {value:.4f}" if value is not None else "",
                   TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}[state]  # fmt: skip
        if state == TrialState.COMPLETE:
            study.tell(trial, value)
        else:
            study.tell(trial, state=state)
        say(f"trial {trial.number}: {outcome} after {record.epochs} epochs (stacked)")
        written[run_id] = (built, record)
    return written
