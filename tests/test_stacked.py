"""Stacked fits (`mlplab.speed.stacked`, `mlplab sweep --stack N`): each trial of a stack ends
where its own `mlplab fit` ends, and is recorded as that fit's child run would be; what cannot be
stacked is said in one line and trained alone."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import config
from mlplab.errors import UserError
from mlplab.speed.stacked import (
    StackedFit,
    apart,
    build,
    bytes_per_trial,
    check_memory,
    refusal,
    stack_key,
)

# a small tanh net (no dead units: Adam's first steps divide by |gradient| + eps, so a gradient
# of rounding size on a dead unit would turn float noise into a step of lr) for 3 epochs of
# 13 batches, without the figure callbacks and the store
BASE = ["--config", config("moons"), "--model.net.hidden_sizes=[8]",
        "--model.net.activation=tanh", "--trainer.max_epochs=3", "--trainer.callbacks=[]",
        "--trainer.logger=false", "--test_after_fit=false"]  # fmt: skip
OPTIMISERS = {
    "SGD": [["--model.optimizer=torch.optim.SGD", "--model.lr=0.1"],
            ["--model.optimizer=torch.optim.SGD", "--model.lr=0.05"]],
    "SGD momentum": [["--model.optimizer=torch.optim.SGD", "--model.optimizer.momentum=0.9"],
                     ["--model.optimizer=torch.optim.SGD", "--model.optimizer.momentum=0.5",
                      "--model.lr=0.05", "--model.optimizer.weight_decay=0.01"]],
    "Nesterov": [["--model.optimizer=torch.optim.SGD", "--model.optimizer.momentum=0.9",
                  "--model.optimizer.nesterov=true"],
                 ["--model.optimizer=torch.optim.SGD", "--model.optimizer.momentum=0.7",
                  "--model.optimizer.nesterov=true", "--model.lr=0.03"]],
    "Adam": [["--model.lr=0.01"], ["--model.lr=0.003", "--model.optimizer.betas=[0.8,0.99]"]],
    "RMSprop": [["--model.optimizer=torch.optim.RMSprop", "--model.lr=0.01"],
                ["--model.optimizer=torch.optim.RMSprop", "--model.lr=0.003",
                 "--model.optimizer.alpha=0.9", "--model.optimizer.momentum=0.5"]],
    "Adagrad": [["--model.optimizer=torch.optim.Adagrad", "--model.lr=0.1"],
                ["--model.optimizer=torch.optim.Adagrad", "--model.lr=0.05",
                 "--model.optimizer.lr_decay=0.01"]],
    # each trial's batch statistics and running statistics its own (the latter compared too)
    "batch norm": [["--model.net.batch_norm=true", "--model.net.input_batch_norm=true"],
                   ["--model.net.batch_norm=true", "--model.net.input_batch_norm=true",
                    "--model.lr=0.003"]],
}  # fmt: skip


def own_fit(args: list[str]) -> dict[str, torch.Tensor]:
    """The weights `mlplab fit ARGS` ends with (in-process, no run, no checkpoint file)."""
    from mlplab.cli import MLPLabCLI

    fit = MLPLabCLI(args=["fit", *args, "--trainer.enable_checkpointing=false"])
    return fit.model.state_dict()


@pytest.mark.parametrize("name", OPTIMISERS)
def test_each_stacked_trial_ends_as_its_own_fit(name):
    """Seeds and optimiser settings mixed in one stack; every weight equals the trial's own
    fit's to float32 rounding after 39 steps drawn in its own shuffled order."""
    points = [[f"--seed_everything={seed}", *args]
              for seed, args in enumerate(OPTIMISERS[name], start=1)]  # fmt: skip
    trials = [build([*BASE, *point]) for point in points]
    assert all(refusal(trial) is None for trial in trials)
    records = StackedFit(trials).run()
    for point, record in zip(points, records, strict=True):
        alone = own_fit([*BASE, *point])
        assert record.last.keys() == alone.keys()
        for key, weight in record.last.items():
            torch.testing.assert_close(weight, alone[key], atol=1e-5, rtol=0)
        assert record.best_epoch in (0, 1, 2) and record.best_step == 13 * (record.best_epoch + 1)


def test_what_cannot_be_stacked_says_why():
    def why(*args: str) -> str | None:
        return refusal(build([*BASE, *args]))

    assert why() is None
    assert why("--trainer.gradient_clip_val=0.5") == (
        "trainer.gradient_clip_val 0.5 is not kept by a stack"
    )
    assert why("--model.optimizer.amsgrad=true") == "Adam(amsgrad=True) is not stacked"
    assert why("--model.optimizer=torch.optim.Adamax").startswith("Adamax is not stacked")
    assert why("--model.lr_scheduler=torch.optim.lr_scheduler.StepLR",
               "--model.lr_scheduler.step_size=1") == (
        "its configure_optimizers returns a scheduler or several optimisers"
    )  # fmt: skip
    assert why("--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
               "--trainer.callbacks.monitor=val/loss") == "EarlyStopping acts during training"
    assert why("--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor") is None
    assert why("--model.net.dropout=0.2") is None  # stacked, its masks its own (not exact)


def test_dropout_trials_end_as_their_fits_in_distribution():
    """With dropout a stacked trial's masks are not its fit's, so it cannot end where its fit
    ends; over 16 seeds (each paired with its own fit: the same start and batches) the final
    losses agree within 4 standard errors, where training without dropout moves the training
    loss many more: the comparison tells."""
    seeds = range(16)
    args = [*BASE, "--model.net.hidden_sizes=[16]"]
    drop = [*args, "--model.net.dropout=0.5"]

    def final(records, key: str) -> list[float]:
        return [[v for k, v, _ in record.metrics if k == key][-1] for record in records]

    stacked = StackedFit([build([*drop, f"--seed_everything={s}"]) for s in seeds]).run()
    without = StackedFit([build([*args, f"--seed_everything={s}"]) for s in seeds]).run()
    alone = []
    for seed in seeds:
        from mlplab.cli import MLPLabCLI

        fit = MLPLabCLI(args=["fit", *drop, f"--seed_everything={seed}",
                              "--trainer.enable_checkpointing=false"])  # fmt: skip
        alone.append({k: float(v) for k, v in fit.trainer.callback_metrics.items()})

    def gap(values: list[float], key: str) -> float:  # the mean paired difference, in errors
        differences = np.array(values) - np.array([a[key] for a in alone])
        return abs(differences.mean()) / (differences.std(ddof=1) / np.sqrt(len(differences)))

    for key in ("train/loss", "val/loss"):
        assert gap(final(stacked, key), key) < 4, key
    assert gap(final(without, "train/loss"), "train/loss") > 8


def test_stack_keys_name_what_keeps_trials_apart():
    keys = [stack_key(build([*BASE, *args])) for args in (
        ["--seed_everything=1", "--model.lr=0.1"],
        ["--seed_everything=2", "--model.lr=0.2", "--model.optimizer.eps=1e-6"],
    )]  # fmt: skip
    assert apart(keys) == []  # seeds, rates and the optimiser's own settings stack
    keys.append(stack_key(build([*BASE, "--model.net.hidden_sizes=[4]"])))
    keys.append(stack_key(build([*BASE, "--model.optimizer=torch.optim.SGD"])))
    assert apart(keys) == [
        "model.init_args.net.init_args.hidden_sizes", "model.init_args.optimizer.class_path",
    ]  # fmt: skip


def test_a_stacked_sweep_records_each_trial_as_its_fit_would(cli, tmp_path):
    """Four children trained as one stack: each a FINISHED child run with the params, metrics
    (to float32 rounding), datasets and config of the same point's own `mlplab fit`, and the
    names of its stack mates; a second run of the sweep finds them all finished."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    env = {"MLFLOW_TRACKING_URI": uri}
    settings = ["--trainer.max_epochs=2", "--log_system_metrics=false"]
    sweep = ["sweep", "--config", config("moons"), "--grid", "seed_everything=[1,2]",
             "model.lr=[0.01,0.02]", "--stack", "4", "--goal", "0.9", "--metric", "val/acc",
             *settings]  # fmt: skip
    done = cli.run(sweep, tmp_path, env)
    assert done.code == 0, done.stderr[-2000:]
    assert sum("done (stacked, 4 trials)" in line for line in done.said) == 4
    # a child built on the sweep's parser after its first (whose lr is 0.01)
    own = ["fit", "--config", config("moons"), "--seed_everything=2", "--model.lr=0.02",
           "--run_name", "alone", *settings]  # fmt: skip
    alone = cli.run(own, tmp_path, env)
    assert alone.code == 0, alone.stderr[-2000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("moons").experiment_id
    runs = {run.info.run_name: run for run in client.search_runs([experiment])}
    children = [r for r in runs.values() if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    stacked, own = runs["seed_everything=2,model.lr=0.02"], runs["alone"]
    assert stacked.data.params == own.data.params
    assert stacked.data.tags["mlplab.stack.mates"].count("seed_everything=") == 3
    assert sorted(stacked.data.metrics) == sorted(own.data.metrics)
    for key in stacked.data.metrics:
        ours = {m.step: m.value for m in client.get_metric_history(stacked.info.run_id, key)}
        theirs = {m.step: m.value for m in client.get_metric_history(own.info.run_id, key)}
        assert ours.keys() == theirs.keys(), key
        assert all(abs(ours[s] - theirs[s]) < 1e-5 for s in ours), key
    contexts = [i.tags[0].value for i in stacked.inputs.dataset_inputs]
    assert sorted(contexts) == ["test", "train", "val"]
    assert "config.yaml" in [a.path for a in client.list_artifacts(stacked.info.run_id)]

    # the best child's model, logged from its best weights: it loads and predicts alone
    parent = next(r for r in runs.values() if r.data.tags.get("mlplab.command") == "sweep")
    best = parent.data.tags["mlplab.best_child"]
    ids = {r.info.run_id for r in children}
    models = [m for m in client.search_logged_models(experiment_ids=[experiment])
              if m.source_run_id in ids]  # fmt: skip
    assert [m.source_run_id for m in models] == [best]
    assert client.get_run(best).info.status == "FINISHED"
    loaded = mlflow.pyfunc.load_model(models[0].artifact_location)
    assert loaded.predict(np.zeros((3, 2), dtype=np.float32)).shape == (3, 1)
    reached = sum(r.data.metrics["val/acc"] >= 0.9 for r in children)
    assert parent.data.metrics["goal/reached/model.lr_0.01"] + parent.data.metrics[
        "goal/reached/model.lr_0.02"] == reached
    assert parent.data.metrics["goal/children/model.lr_0.01"] == 2
    assert any(line.startswith("mlplab: sweep sweep-moons: val/acc >= 0.9 reached by "
                               "model.lr=0.01: ") for line in done.stdout.splitlines())
    assert "figures/final.png" in [a.path for a in client.list_artifacts(parent.info.run_id,
                                                                         "figures")]  # fmt: skip

    # its checkpoints are the fit's: `last.ckpt` (loops, optimiser, callbacks) and the best
    folder = tmp_path / "mlruns" / "moons"
    saved = [a.path for a in client.list_artifacts(stacked.info.run_id, "checkpoints")]
    assert saved == [a.path for a in client.list_artifacts(own.info.run_id, "checkpoints")]
    assert saved[0].startswith("checkpoints/best-epoch=") and saved[1:] == [
        "checkpoints/last.ckpt"]
    for name in (path.removeprefix("checkpoints/") for path in saved):
        ours = torch.load(folder / stacked.info.run_id / "checkpoints" / name)
        theirs = torch.load(folder / own.info.run_id / "checkpoints" / name)
        assert_same_checkpoint(ours, theirs)
        assert ours["mlflow_run_id"] == stacked.info.run_id
    # and the stacked child resumes alone, as the fit's own resumes
    for run in (stacked, own):
        last = folder / run.info.run_id / "checkpoints" / "last.ckpt"
        resumed = cli.run(["fit", "--config", config("moons"), "--seed_everything=2",
                           "--model.lr=0.02", "--trainer.max_epochs=3",
                           "--log_system_metrics=false", "--ckpt_path", str(last)], tmp_path, env)
        assert resumed.code == 0, resumed.stderr[-2000:]
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
    ours, theirs = ({m.step: m.value for m in client.get_metric_history(r.info.run_id, "val/loss")}
                    for r in (stacked, own))  # fmt: skip
    assert ours.keys() == theirs.keys() == {13, 26, 39}
    assert all(abs(ours[s] - theirs[s]) < 1e-5 for s in ours)

    again = cli.run(sweep, tmp_path, env)
    assert again.code == 0 and any("0 to run, 4 finished before" in s for s in again.said)


def test_a_full_batch_trials_checkpoint_counts_as_its_fit(cli, tmp_path):
    """One batch an epoch, taken in chunks by the fast path (configs/xor_relu.yaml), validated
    every 100 epochs of 250 (the last epoch not): the loops' counters, optimiser state and
    callbacks of the stacked trial's checkpoints are its fit's."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}
    args = ["--config", config("xor_relu"), "--trainer.max_epochs=250",
            "--log_system_metrics=false"]  # fmt: skip
    done = cli.run(["sweep", *args, "--grid", "seed_everything=[3]", "--stack", "1"],
                   tmp_path, env)  # fmt: skip
    assert done.code == 0, done.stderr[-2000:]
    alone = cli.run(["fit", *args, "--seed_everything=3", "--run_name", "alone"], tmp_path, env)
    assert alone.code == 0, alone.stderr[-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("xor_relu").experiment_id
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment])}
    folder = tmp_path / "mlruns" / "xor_relu"
    for file in ("last.ckpt", "best-epoch=199.ckpt"):
        ours, theirs = (torch.load(folder / runs[name] / "checkpoints" / file)
                        for name in ("seed_everything=3", "alone"))  # fmt: skip
        assert_same_checkpoint(ours, theirs)


def test_a_stacked_best_childs_model_comes_back_from_its_checkpoint(cli, tmp_path):
    """A sweep stopped after its stacked children were written but before the best one's model
    (logged when every stack is done): run again, it logs that model from the child's best
    checkpoint."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}
    sweep = ["sweep", "--config", config("xor_relu"), "--trainer.max_epochs=200",
             "--log_system_metrics=false", "--grid", "seed_everything=[1,2]", "--stack", "2"]
    assert cli.run(sweep, tmp_path, env).code == 0
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("xor_relu").experiment_id
    parent = parent_of(client, experiment, "sweep")
    best = client.get_run(parent).data.tags["mlplab.best_child"]
    (lost,) = client.search_logged_models(experiment_ids=[experiment])
    client.delete_logged_model(lost.model_id)  # as if the sweep had stopped before it
    client.set_terminated(parent, "KILLED")
    again = cli.run(sweep, tmp_path, env)
    assert again.code == 0, again.stderr[-2000:]
    assert any("0 to run, 2 finished before" in line for line in again.said)
    (model,) = client.search_logged_models(experiment_ids=[experiment])
    assert model.source_run_id == best and model.model_id != lost.model_id
    assert mlflow.pyfunc.load_model(model.artifact_location).predict(
        np.zeros((4, 2), dtype=np.float32)).shape == (4, 1)


def assert_same_checkpoint(ours: dict, theirs: dict, path: str = "") -> None:
    """Two fits' checkpoints hold the same keys, counters and settings, and tensors equal to
    float32 rounding; the run's own folder and id aside."""
    if isinstance(ours, dict):
        assert isinstance(theirs, dict), path
        if path.endswith("best_k_models"):
            ours, theirs = list(ours.values()), list(theirs.values())
        else:
            assert ours.keys() == theirs.keys(), path
            for key in ours:
                if key not in ("mlflow_run_id", "dirpath", "mlplab_config"):
                    assert_same_checkpoint(ours[key], theirs[key], f"{path}/{key}")
            return
    if isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), path
        for i, (one, other) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_checkpoint(one, other, f"{path}/{i}")
    elif isinstance(ours, torch.Tensor):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, path
        assert torch.allclose(ours.float(), theirs.float(), atol=1e-5), path
    elif isinstance(ours, float):
        assert abs(ours - theirs) < 1e-5, path
    elif isinstance(ours, str) and "/checkpoints/" in ours:
        assert ours.rsplit("/", 1)[1] == theirs.rsplit("/", 1)[1], path
    else:
        assert ours == theirs, path


def test_points_that_cannot_share_a_stack_train_apart_and_say_why(cli, tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}
    args = ["--stack", "8", "--trainer.max_epochs=2", "--log_system_metrics=false"]
    done = cli.run(["sweep", "--config", config("xor"), "--grid",
                    "model.net.hidden_sizes=[[2],[4]]", "--model.net.dropout=0.1", *args],
                   tmp_path, env)  # fmt: skip
    assert done.code == 0, done.stderr[-2000:]
    assert "mlplab: sweep: 2 groups train in separate stacks; they differ in "\
        "model.net.hidden_sizes" in done.said  # fmt: skip
    assert "mlplab: sweep: 2 stacked points have dropout; dropout draws each trial's masks "\
        "from its stack's random stream, not from its own run's: it ends as its fit would in "\
        "distribution, not to float32 rounding" in done.said  # fmt: skip
    assert sum("done (stacked, 1 trials)" in line for line in done.said) == 2

    done = cli.run(["sweep", "--config", config("xor"), "--grid",
                    "trainer.gradient_clip_val=[null,1]", *args], tmp_path, env)  # fmt: skip
    assert done.code == 0, done.stderr[-2000:]
    assert "mlplab: sweep: trainer.gradient_clip_val=1 cannot be stacked "\
        "(trainer.gradient_clip_val 1.0 is not kept by a stack); trained alone" in done.said
    stacked = "mlplab: sweep child trainer.gradient_clip_val=None: done (stacked, 1 trials)"
    assert stacked in done.said
    assert "mlplab: sweep child trainer.gradient_clip_val=1: done" in done.said


def test_a_pruned_mate_leaves_the_stack_and_the_others_end_as_their_own_fits():
    points = [[f"--seed_everything={seed}", f"--model.lr={lr}"]
              for seed, lr in ((1, 0.01), (2, 0.02), (3, 0.005))]  # fmt: skip
    trials = [build([*BASE, *point]) for point in points]
    seen = []

    def prune_the_second(stacked, values, epoch):
        seen.append((epoch, len(stacked)))
        return [1] if epoch == 0 else []

    records = StackedFit(trials).run(on_validation=prune_the_second)
    assert seen == [(0, 3), (1, 2), (2, 2)]
    pruned = records[1]
    assert pruned.pruned and pruned.epochs == 1
    assert not any(key.startswith(("train/", "test/")) for key, _, _ in pruned.metrics)
    for point, record in zip(points, records, strict=True):
        if not record.pruned:
            alone = own_fit([*BASE, *point])
            for key, weight in record.last.items():
                torch.testing.assert_close(weight, alone[key], atol=1e-5, rtol=0)


def test_a_childs_params_and_metrics_go_to_mlflow_in_one_call_and_all_land(tmp_path):
    """1,500 metric values (over MLflow's 1,000 a batch) and the params of a fit, given to the
    client in one `log_batch`, which splits it at the store's limits: every value recorded."""
    from mlplab.speed.stacked import Record
    from mlplab.tracking import trial_runs
    from mlplab.tracking.store import ensure_experiment, open_store

    trial = build(BASE)
    record = Record(metrics=[("train/loss", 1 / (1 + i), i) for i in range(1500)], epochs=1)
    uri = open_store(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient(uri)
    calls = []
    log_batch = client.log_batch
    client.log_batch = lambda *args, **kwargs: calls.append(kwargs) or log_batch(*args, **kwargs)
    run_id = trial_runs.write(client, ensure_experiment(client, "moons", uri), trial, record,
                              "trial-0", {})  # fmt: skip
    run = client.get_run(run_id)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert history == [(i, pytest.approx(1 / (1 + i))) for i in range(1500)]
    assert 10 < len(run.data.params) < 100 and run.data.params["model.net.activation"] == "tanh"
    assert len(calls) == 1 and run.info.status == "FINISHED"
    assert len(calls[0]["params"]) == len(run.data.params) and len(calls[0]["metrics"]) == 1500


def test_a_stacked_search_asks_tells_and_prunes_trial_by_trial(cli, tmp_path):
    """Six trials asked three at a time (SGD and Adam trials in separate stacks): each its own
    child run; a trial behind the median at a validation is pruned alone (KILLED, PRUNED, fewer
    epochs), its mates going on; the same command again finds the study done."""
    from test_search import search_args

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}
    search = ["search", *search_args(tmp_path, 6), "--stack", "3"]
    done = cli.run(search, tmp_path, env)
    assert done.code == 0, done.stderr[-2000:]
    assert any(line.startswith("mlplab: trials 0, ") for line in done.said)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("moons").experiment_id
    children = client.search_runs([experiment], "tags.`optuna.trial` != ''")
    assert len(children) == 6
    pruned = [r for r in children if r.data.tags["optuna.state"] == "PRUNED"]
    complete = [r for r in children if r.data.tags["optuna.state"] == "COMPLETE"]
    assert pruned and complete, [r.data.tags["optuna.state"] for r in children]
    for run in pruned:
        assert run.info.status == "KILLED"
        assert "pruned by Optuna" in run.data.tags["mlplab.failure"]
        assert run.data.metrics["epoch"] < 7 and "test/acc" not in run.data.metrics
    assert all(r.info.status == "FINISHED" and "test/acc" in r.data.metrics for r in complete)
    for run in complete:  # each has its latest checkpoint, at its last epoch, for its run
        last = torch.load(tmp_path / "mlruns" / "moons" / run.info.run_id / "checkpoints"
                          / "last.ckpt")  # fmt: skip
        assert last["epoch"] == run.data.metrics["epoch"]
        assert last["mlflow_run_id"] == run.info.run_id and last["optimizer_states"]
    assert any(f"6 trials ({len(complete)} complete, {len(pruned)} pruned" in line
               for line in done.said)  # fmt: skip
    best = client.get_run(parent_of(client, experiment)).data.tags["mlplab.best_child"]
    ids = {r.info.run_id for r in children}
    models = [m.source_run_id for m in client.search_logged_models(experiment_ids=[experiment])
              if m.source_run_id in ids]  # fmt: skip
    assert models == [best]
    again = cli.run(search, tmp_path, env)
    assert again.code == 0 and any("has 6 results of 6" in line for line in again.said)


def test_a_stacked_searchs_trials_end_as_the_same_trials_one_by_one(cli, tmp_path):
    """The same six asked trials (learning rate, optimiser, momentum) stacked and one at a
    time: each trial's validation losses are the same, epoch by epoch."""
    from test_search import search_args

    losses = {}
    for name, more in (("stacked", ["--stack", "6"]), ("alone", [])):
        folder = tmp_path / name
        folder.mkdir()
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlruns/mlflow.db"}
        args = search_args(folder, 6, "--pruner", "none", *more, epochs=3)
        done = cli.run(["search", *args], folder, env)
        assert done.code == 0, done.stderr[-2000:]
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("moons").experiment_id
        losses[name] = {
            run.data.tags["optuna.trial"]: [m.value for m in sorted(
                client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)]
            for run in client.search_runs([experiment], "tags.`optuna.trial` != ''")
        }  # fmt: skip
    assert len(losses["stacked"]) == 6 and losses["stacked"].keys() == losses["alone"].keys()
    for trial, values in losses["stacked"].items():
        assert len(values) == 3
        np.testing.assert_allclose(values, losses["alone"][trial], rtol=0, atol=1e-5)
    assert len({round(values[-1], 4) for values in losses["stacked"].values()}) == 6


def test_a_stacked_search_beats_for_its_trials_and_takes_back_another_machines_lost_one(
    cli, tmp_path
):
    """Stacked trials train outside `Study.optimize`, so the search records their heartbeats
    itself (and Optuna's warning that it would not stays unsaid); a trial another machine left
    RUNNING, silent for over the grace period, is failed and asked again, as a fit's is."""
    import sqlite3

    import optuna

    from test_search import search_args

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}
    first = cli.run(["search", *search_args(tmp_path, 2), "--stack", "2"], tmp_path, env)
    assert first.code == 0, first.stderr[-2000:]
    assert "Heartbeat" not in first.stderr
    database = tmp_path / "mlruns" / "optuna.db"
    (name,) = optuna.get_all_study_names(f"sqlite:///{database}")
    with sqlite3.connect(database) as db:
        beaten = {n for (n,) in db.execute(
            "SELECT number FROM trials JOIN trial_heartbeats USING (trial_id)")}  # fmt: skip
    assert beaten == {0, 1}

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{database}")
    lost = study.ask()  # another machine's trial, whose process died: RUNNING, silent
    lost.set_user_attr("mlplab.host", "elsewhere")
    lost.set_user_attr("mlplab.pid", 1)
    with sqlite3.connect(database) as db:
        (trial_id,) = db.execute("SELECT trial_id FROM trials WHERE number = 2").fetchone()
        db.execute("INSERT INTO trial_heartbeats (trial_id, heartbeat) "
                   "VALUES (?, datetime('now', '-300 seconds'))", (trial_id,))  # fmt: skip
    again = cli.run(["search", *search_args(tmp_path, 3), "--stack", "2"], tmp_path, env)
    assert again.code == 0, again.stderr[-2000:]
    assert "mlplab: trial 2 was lost with its process: it runs again" in again.said
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{database}").trials
    assert trials[2].state.name == "FAIL"
    (retry,) = [t for t in trials if t.user_attrs.get("mlplab.retry_of") == 2]
    assert retry.state.is_finished() and retry.state.name != "FAIL"


def parent_of(client, experiment: str, command: str = "search") -> str:
    (parent,) = client.search_runs([experiment], f"tags.`mlplab.command` = '{command}'")
    return parent.info.run_id


def test_a_trial_varied_from_the_last_parsed_is_built_as_its_parse_builds():
    """A search's trial set on a copy of the last parsed config (its arguments not parsed)
    has the config, hparams, initial weights and random state its own fit's parse gives;
    a class, another type, another set of keys or other arguments are parsed."""
    import random

    from jsonargparse import ArgumentError

    from mlplab.commands.sweep import point_args
    from mlplab.speed.stacked import Builder

    def point(seed, lr, size=16, activation="tanh", norm=False, **more):
        return {"seed_everything": seed, "model.lr": lr, "data.batch_size": size,
                "model.net.activation": activation, "model.net.batch_norm": norm, **more}

    cases = [  # (arguments before the point, the point, whether it is set on a copy)
        (BASE, point(3, 0.01, run_name="a"), False),  # the first with these keys: parsed
        (BASE, point(4, 0.02, 32, "relu", True, run_name="b"), True),
        (BASE, point(5, 0.03, 8, run_name="c"), True),  # twice in a row
        (BASE, point(6, 1, run_name="d"), False),  # an int for a float
        (BASE, point(7, "fast", run_name="e"), False),  # refused by the parse
        (BASE, point(8, 0.04, run_name="f"), True),  # from the last parsed config
        ([*BASE, "--model.optimizer.weight_decay=0.1"], point(9, 0.05, run_name="g"), False),
        (BASE, {"model.lr": 0.06, "run_name": "h"}, False),  # another set of keys
        ([*BASE, "--seed_everything=true"], {"model.lr": 0.07, "run_name": "i"}, False),
        ([*BASE, "--seed_everything=true"], {"model.lr": 0.08, "run_name": "j"}, True),
        (BASE, point(10, 0.09, model__optimizer="torch.optim.SGD"), False),
        (BASE, point(11, 0.1, model__optimizer="torch.optim.Adam"), False),  # a class
    ]
    varied = Builder()
    varied.build(BASE)  # the config as written, as a search starts
    parse, parsed = varied.check.parse, []
    varied.check.parse = lambda args: parsed.append(args) or parse(args)
    for number, (args, values, copied) in enumerate(cases):
        values = {k.replace("__", "."): v for k, v in values.items()}
        args = [*args, *point_args(values)]
        del parsed[:]
        random.seed(number)  # `seed_everything: true` draws the seed from Python's stream
        if values["model.lr"] == "fast":
            with pytest.raises(ArgumentError):
                varied.build(args, checked=values)
            continue
        mine = varied.build(args, checked=values)
        assert (not parsed) == copied, values
        random.seed(number)
        theirs = build(args)  # a CLI of its own, as the trial's fit builds it
        assert mine.config.as_dict() == theirs.config.as_dict(), values
        assert dict(mine.module.hparams) == dict(theirs.module.hparams), values
        assert torch.equal(mine.rng, theirs.rng)
        for (key, value), other in zip(mine.module.state_dict().items(),
                                       theirs.module.state_dict().values(), strict=True):
            assert torch.equal(value, other), key
    assert mine.config.model.init_args.optimizer.class_path == "torch.optim.Adam"


def test_batch_norm_trials_are_sized_without_touching_their_statistics():
    trial = build([*BASE, "--model.net.batch_norm=true"])
    before = {k: v.clone() for k, v in trial.module.state_dict().items()}
    check_memory(trial, 2)  # runs one sample through the network (batch norm: in eval mode)
    assert trial.module.training
    for key, value in trial.module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_stack_that_would_not_fit_says_the_size_that_does():
    trial = build(BASE)
    trial.datamodule.setup("fit")
    need = bytes_per_trial(trial)
    assert need > 4 * sum(p.numel() for p in trial.module.parameters())
    with pytest.raises(UserError, match=r"^--stack 64: a stack of 64 needs about [\d.]+ GiB "
                       r"and [\d.]+ GiB are free; --stack 8 fits$"):  # fmt: skip
        check_memory(trial, 64, available=need * 10)
    check_memory(trial, 8, available=need * 10)
    with pytest.raises(UserError, match="not even one trial fits: train it alone"):
        check_memory(trial, 2, available=need)


def test_a_diverging_trial_leaves_the_stack_failed_and_its_mate_goes_on():
    base = ["--config", config("iris_regression"), "--trainer.max_epochs=5",
            "--trainer.callbacks=[]", "--model.optimizer=torch.optim.SGD"]  # fmt: skip
    calm, wild = StackedFit([build([*base, "--model.lr=0.001"]),
                             build([*base, "--model.lr=10"])]).run()  # fmt: skip
    assert calm.failure is None and calm.epochs == 5
    assert any(key == "val/mae" for key, _, _ in calm.metrics)
    assert wild.failure == ("training diverged: train/loss is nan (model.lr is 10.0: lower it, "
                            "or standardize the inputs; divergence.factor sets the limit)")
    assert wild.epochs == 1 and not any(key.startswith("train/") for key, _, _ in wild.metrics)


def test_a_configs_own_metrics_are_a_stacked_trials_and_may_pick_its_best():
    """`model.metrics` join a stacked trial's metrics, as its fit's, and the checkpoint's
    monitor may be one of them: the tested weights are those of the highest val/f1."""
    from test_my_project import METRICS

    trial = build(["--config", config("iris_classification"), "--trainer.max_epochs=4",
                   "--trainer.callbacks=[]", "--model.init_args.metrics", METRICS,
                   "--checkpoint.monitor", "val/f1"])  # fmt: skip
    assert refusal(trial) is None
    (record,) = StackedFit([trial]).run()
    keys = {key for key, _, _ in record.metrics}
    assert {"train/f1", "train/auroc", "val/f1", "val/auroc"} <= keys
    f1 = [(step, value) for key, value, step in record.metrics if key == "val/f1"]
    assert record.best_step == max(f1, key=lambda sv: (sv[1], -sv[0]))[0]


def test_checkpoint_settings_a_stack_cannot_keep_are_refused():
    def why(*args: str) -> str | None:
        return refusal(build([*BASE, *args]))

    assert why("--trainer.enable_checkpointing=false") == (
        "trainer.enable_checkpointing False is not kept by a stack"
    )
    assert why("--checkpoint.save_top_k=3") == "checkpoint.save_top_k 3 is not kept by a stack"
    assert why("--checkpoint.dirpath=shared") == (  # one folder for every trial's files
        "checkpoint.dirpath shared is not kept by a stack"
    )
    assert why("--checkpoint.monitor=train/loss") == (
        "checkpoint.monitor train/loss: a stack keeps the best by val/loss, val/acc"
    )
    assert why("--checkpoint.monitor=val/acc") is None
