"""`mlplab search`: pruning, the parent and child runs, resuming a killed search, parallel
workers, and every bad input refused before a study or a run exists."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mlplab.main import main

ROOT = Path(__file__).resolve().parents[1]
MOONS = str(ROOT / "configs" / "moons.yaml")
MAX_EPOCHS = 8
# the learning rate over four decades with a plain or an adaptive optimizer: some trials
# learn nothing in 8 epochs, and the median pruner stops them
SPACE = {
    "model.lr": {"low": 1.0e-4, "high": 0.3, "log": True},
    "model.optimizer": {"choices": {"SGD": {"model.optimizer.init_args.momentum":
                                            {"low": 0.0, "high": 0.9}},
                                    "Adam": None}},
}  # fmt: skip


def search_args(tmp_path: Path, n_trials: int, *more: str, epochs: int = MAX_EPOCHS) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    return [
        "--config", MOONS, "--space", str(space), "--metric", "val/acc",
        "--n_trials", str(n_trials), "--sampler", "{name: random, seed: 0}",
        "--pruner", "{name: median, n_startup_trials: 2}", "--trainer.max_epochs", str(epochs),
        "--trainer.callbacks=[]", "--log_system_metrics", "false", *more,
    ]  # fmt: skip


def start_and_wait_for_training(args: list[str], tmp_path: Path, trial: int):
    """`mlplab search ARGS` in a process, returned once `trial` has reported an epoch, with
    the file its stderr goes to."""
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "mlplab", "search", *args],
                                   stderr=stderr, text=True)  # fmt: skip
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.5)
        assert process.poll() is None, log.read_text()
        if f"mlplab: trial {trial}:" not in log.read_text():
            continue  # the study exists once a trial starts: read it from then on
        study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0],
                                  storage=storage)  # fmt: skip
        if study.trials[trial].intermediate_values:
            return process, log
    raise AssertionError("the trial did not start training")


def runs(uri: str) -> tuple:
    """The search's parent run and its children, oldest first."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("moons")
    found = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    parents = [r for r in found if r.data.tags.get("mlplab.command") == "search"]
    assert len(parents) == 1
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


def study_of(tmp_path: Path, parent) -> optuna.Study:
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    return optuna.load_study(study_name=parent.data.params["search.study"], storage=storage)


def test_search_prunes_and_records_the_best_in_the_parent(store, tmp_path):
    main(["search", *search_args(tmp_path, 6), "--register_model", "moons-best"])
    client, parent, children = runs(store)
    assert parent.info.status == "FINISHED"
    assert len(children) == 6
    pruned = [r for r in children if r.data.tags.get("optuna.state") == "PRUNED"]
    assert pruned, "the median pruner stopped no trial"
    for run in pruned:  # ended early: KILLED, fewer epochs than asked
        assert run.info.status == "KILLED"
        assert "pruned by Optuna" in run.data.tags["mlplab.failure"]
        assert run.data.metrics["epoch"] < MAX_EPOCHS - 1
    complete = [r for r in children if r.data.tags.get("optuna.state") == "COMPLETE"]
    assert complete and all(r.info.status == "FINISHED" for r in complete)

    study = study_of(tmp_path, parent)
    trials = study.trials
    assert trials[0].params == {"model.lr": 0.01, "model.optimizer": "Adam"}  # as written
    best = study.best_trial
    assert parent.data.tags["mlplab.best_child"] == best.user_attrs["mlflow.run_id"]
    named = {r.info.run_id: r.info.run_name for r in children}
    assert parent.data.tags["mlplab.best_child_name"] == named[best.user_attrs["mlflow.run_id"]]
    assert parent.data.tags["mlflow.source.name"] == "mlplab search"
    assert parent.data.tags["best.model.optimizer"] == best.params["model.optimizer"]
    assert parent.data.metrics["best/val/acc"] == pytest.approx(best.value)
    assert parent.data.metrics["best/val/acc"] == max(r.data.metrics["val/acc"] for r in complete)
    assert "best/test/acc" in parent.data.metrics
    spent = sum(t.user_attrs["mlplab.epochs"] for t in trials)
    assert parent.data.metrics["trials/epochs"] == spent < 6 * MAX_EPOCHS
    assert parent.data.metrics["trials/pruned"] == len(pruned)
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    plots = ("optimization_history", "intermediate_values", "param_importances",
             "parallel_coordinate")  # fmt: skip
    assert {f"figures/{plot}.png" for plot in plots} <= figures
    version = client.get_model_version_by_alias("moons-best", "candidate")
    assert version.run_id == best.user_attrs["mlflow.run_id"]

    # the same command again: the study is complete, nothing more runs, the same parent
    main(["search", *search_args(tmp_path, 6)])
    _, again, children_again = runs(store)
    assert again.info.run_id == parent.info.run_id and len(children_again) == 6


def test_a_killed_search_resumes_its_study_and_parent_and_retries_the_lost_trial(store, tmp_path):
    args = search_args(tmp_path, 3, epochs=200)  # a startup trial (not pruned) lasts seconds
    process, _ = start_and_wait_for_training(args, tmp_path, trial=1)
    process.kill()
    process.wait()
    study = study_of(tmp_path, runs(store)[1])
    assert study.trials[1].state.name == "RUNNING"  # lost with its process

    main(["search", *args])  # the same command again
    client, parent, children = runs(store)
    assert parent.info.status == "FINISHED"  # the same parent run, finished this time
    study = study_of(tmp_path, parent)
    states = [t.state.name for t in study.trials]
    assert states[1] == "FAIL" and "mlplab.error" not in study.trials[1].user_attrs
    retries = [t for t in study.trials if t.user_attrs.get("mlplab.retry_of") == 1]
    assert len(retries) == 1 and retries[0].params == study.trials[1].params
    assert retries[0].number == 2  # the study's count continues; the retry runs first
    lost = client.get_run(study.trials[1].user_attrs["mlflow.run_id"])
    assert lost.info.status == "KILLED" and lost.data.tags["optuna.state"] == "FAIL"
    assert len(study.trials) == 4 and states.count("FAIL") == 1  # the lost one is no result
    assert parent.data.metrics["trials/complete"] + parent.data.metrics["trials/pruned"] == 3
    assert len(children) == 4


def test_workers_run_trials_of_one_study_in_parallel_processes(store, tmp_path):
    # unpruned trials of seconds each: the second process (up in ~8 s) takes some of them
    main(["search", *search_args(tmp_path, 5, "--workers", "2", "--pruner", "none", epochs=100)])
    _, parent, children = runs(store)
    assert parent.info.status == "FINISHED"
    study = study_of(tmp_path, parent)
    done = [t for t in study.trials if t.state.is_finished()]
    assert 5 <= len(done) <= 6  # a worker finishing its trial may pass the budget by one
    assert len({t.user_attrs["mlplab.pid"] for t in done}) == 2
    assert len(children) == len(done)
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == len(done)


def test_space_ranges_choices_and_sub_spaces_become_trials_and_overrides():
    from mlplab.commands.search.space import parse_space, suggest, written_params
    from mlplab.commands.sweep import point_args

    space = parse_space(
        {
            "data.batch_size": {"low": 16, "high": 128, "step": 16},  # int bounds: an int range
            "model.lr": {"low": 1.0e-4, "high": 0.1, "log": True},
            "model.net.hidden_sizes": [[300, 100], [500, 150]],
            "model.optimizer": {"choices": {"SGD": {"model.optimizer.init_args.momentum":
                                                    {"low": 0.0, "high": 0.9}},
                                            "Adam": None}},
        }
    )  # fmt: skip
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        point = suggest(study.ask(), space)
        assert isinstance(point["data.batch_size"], int) and point["data.batch_size"] % 16 == 0
        assert 1.0e-4 <= point["model.lr"] <= 0.1
        assert point["model.net.hidden_sizes"] in ([300, 100], [500, 150])
        sgd = point["model.optimizer"] == "SGD"
        assert ("model.optimizer.init_args.momentum" in point) == sgd  # only when taken
        seen.add(point["model.optimizer"])
        args = point_args(point)
        assert args[2] in (
            "--model.net.hidden_sizes=[300, 100]",
            "--model.net.hidden_sizes=[500, 150]",
        )
        assert args[3] == f"--model.optimizer={point['model.optimizer']}"  # before its sub-space
    assert seen == {"SGD", "Adam"}

    class Namespace:  # a parsed config's class value
        class_path = "torch.optim.SGD"

    written = {"data.batch_size": 32, "model.lr": 0.001, "model.net.hidden_sizes": [300, 100],
               "model.optimizer": Namespace(),
               "model.optimizer.init_args.momentum": 0.0}  # fmt: skip
    params, outside = written_params(space, written.__getitem__)
    assert params == {"data.batch_size": 32, "model.lr": 0.001, "model.net.hidden_sizes":
                      "[300,100]", "model.optimizer": "SGD",
                      "model.optimizer.init_args.momentum": 0.0}  # fmt: skip
    assert outside == []
    written["data.batch_size"] = 1000  # outside the range: trial 0 samples it
    assert written_params(space, written.__getitem__)[1] == ["data.batch_size"]
    files = parse_space({"config": ["a.yaml", "b.yaml"]})  # config files: sampled in trial 0
    assert written_params(files, written.__getitem__) == ({}, ["config"])


@pytest.mark.parametrize("what", ["sampler", "pruner"])
def test_every_named_sampler_and_pruner_is_optunas(what):
    from mlplab.commands.search.study import PRUNERS, SAMPLERS, component

    table = SAMPLERS if what == "sampler" else PRUNERS
    required = {"percentile": {"percentile": 25.0}}  # the one without defaults
    for name, cls in table.items():
        assert type(component({"name": name, **required.get(name, {})}, table, what)) is cls


def test_a_timeout_stops_starting_trials(store, tmp_path):
    main(["search", *search_args(tmp_path, 50, "--timeout", "1")])
    _, parent, children = runs(store)
    assert parent.info.status == "FINISHED" and len(children) == 1


def test_a_sweep_file_with_a_search_section_is_a_search(store, tmp_path):
    from mlplab.commands.sweep import load_sweep_file

    sweep = {"config": MOONS, "metric": "val/acc", "mode": "max", "name": "moons-lr",
             "grid": {"model.lr": [0.01, 0.1]},
             "search": {"space": {"model.lr": {"low": 0.001, "high": 0.1}},
                        "n_trials": 1}}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert load_sweep_file("sweep.yaml")["grid"]  # still a sweep file for `mlplab sweep`
    main(["search", "sweep.yaml", "--trainer.max_epochs=4", "--log_system_metrics=false"])
    _, parent, children = runs(store)
    assert parent.info.run_name == "moons-lr" and parent.info.status == "FINISHED"
    assert parent.data.params["search.direction"] == "maximize" and len(children) == 1
    assert children[0].data.params["model.lr"] == "0.01"  # trial 0: the config as written


BAD = {
    "unknown key": ({"model.lrr": {"low": 0.001, "high": 0.1}}, [],
                    "model.lrr is not a setting of this config; did you mean model.lr?"),
    "unknown nested key": ({"model.net.init_args.hidden_size": [[8]]}, [],
                           "did you mean model.net.hidden_sizes?"),
    "empty range": ({"model.lr": {"low": 0.01, "high": 0.01}}, [], "is empty"),
    "inverted range": ({"model.lr": {"low": 0.1, "high": 0.001}}, [], "is inverted"),
    "log from zero": ({"model.lr": {"low": 0.0, "high": 0.1, "log": True}}, [],
                      "a log range needs low > 0"),
    "no choices": ({"model.optimizer": []}, [], "the list of choices is empty"),
    "unknown choice": ({"model.optimizer": ["Adam", "Adamm"]}, [], "'Adamm' is refused"),
    "metric not logged": ({"model.lr": {"low": 0.001, "high": 0.1}}, ["--metric", "val/f1"],
                          "val/f1 is not logged by Classifier; it logs val/loss, val/acc"),
    "test metric": ({"model.lr": {"low": 0.001, "high": 0.1}}, ["--metric", "test/acc"],
                    "a search compares and prunes trials on a validation metric"),
    "direction": ({"model.lr": {"low": 0.001, "high": 0.1}}, ["--direction", "up"],
                  "--direction 'up': write minimize or maximize"),
    "sampler": ({"model.lr": {"low": 0.001, "high": 0.1}}, ["--sampler", "grid"],
                "unknown sampler 'grid'"),
    "pruner setting": ({"model.lr": {"low": 0.001, "high": 0.1}},
                       ["--pruner", "{name: median, warmup: 2}"], "pruner median:"),
    "DDP trials": ({"model.lr": {"low": 0.001, "high": 0.1}},
                   ["--config", str(ROOT / "configs" / "trainer" / "ddp_cpu.yaml")],
                   "a search runs each trial on one device"),
    "storage URL": ({"model.lr": {"low": 0.001, "high": 0.1}}, ["--storage", "optuna.db"],
                    "--storage 'optuna.db' is not a database URL"),
    "MLflow's database": ({"model.lr": {"low": 0.001, "high": 0.1}},
                          ["--storage", "sqlite:///mlruns/mlflow.db"],
                          "the Optuna study cannot live in MLflow's database"),
    "sampler YAML": ({"model.lr": {"low": 0.001, "high": 0.1}}, ["--sampler", "{name: tpe"],
                     "is not a YAML mapping"),
    "storage folder": ({"model.lr": {"low": 0.001, "high": 0.1}},
                       ["--storage", "sqlite:////nonexistent/folder/optuna.db"],
                       "cannot open the Optuna storage"),
    "fit override": ({"model.lr": {"low": 0.001, "high": 0.1}}, ["--trainer.max_epochz", "2"],
                     "the fit settings are refused"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_and_creates_nothing(store, tmp_path, capsys, case):
    space, more, message = BAD[case]
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--config", MOONS, "--space", "space.yaml", "--metric", "val/acc", *more])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlplab: error: "), err
    assert message in err[0]
    assert not (tmp_path / "mlruns" / "optuna.db").exists()  # no study
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # no run


def test_a_typo_in_a_search_file_is_named(store, tmp_path, capsys):
    """A typo in a search file is named (tests/test_cli.py checks configs/searches/ whole)."""
    spec = yaml.safe_load((ROOT / "configs" / "searches" / "mnist_optimizers.yaml").read_text())
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**spec, "n_trial": 3}))
    with pytest.raises(SystemExit):
        main(["search", "typo.yaml"])
    assert "unknown key 'n_trial' (did you mean n_trials?)" in capsys.readouterr().err


def test_ctrl_c_ends_the_search_killed_and_the_trial_runs_again(store, tmp_path):
    args = search_args(tmp_path, 2, epochs=200)
    process, log = start_and_wait_for_training(args, tmp_path, trial=0)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, log.read_text()
    rest = log.read_text()
    assert "Traceback" not in rest and "mlplab: interrupted" in rest
    _, parent, children = runs(store)
    assert parent.info.status == "KILLED" and children[0].info.status == "KILLED"
    study = study_of(tmp_path, parent)
    assert study.trials[0].state.name == "FAIL"  # lost, not a result: the next start reruns it
