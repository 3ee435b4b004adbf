"""Through the real entry point: every config runs, seed numbers are reached, MLflow has it all."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from conftest import (
    CONFIGS,
    ROOT,
    config,
    experiment_runs,
    fit_in_own_store,
    real_data,
    run_mlplab,
    store_uri,
)
from mlplab.main import main

XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)


def only_run(store: str, experiment: str):
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1, f"expected one run in {experiment!r}, found {len(runs)}"
    return runs[0]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_runs_fit_with_fast_dev_run(path, store, monkeypatch):
    configs = ["--config", str(path)]
    if path.parent.name == "trainer":  # launch settings, on top of any experiment: they parse
        with pytest.raises(SystemExit) as done:  # (tests/test_ddp.py runs DDP for real)
            main(["fit", "--config", config("xor"), *configs, "--print_config"])
        assert done.value.code in (0, None)
        return
    if path.parent.name == "baselines":  # scikit-learn runs: they parse and instantiate
        from mlplab.commands.baseline import parser

        init = parser().instantiate_classes(parser().parse_args(["--config", str(path)]))
        assert init.estimator.fit and init.data.splits
        return
    if path.parent.name == "sweeps":  # grids over configs: every file they name exists
        from mlplab.commands.sweep import load_sweep_file

        spec = load_sweep_file(str(path))
        named = [spec["config"], *spec["grid"].get("config", [])]
        assert all((ROOT / name).is_file() for name in named), named
        return
    if path.parent.name == "searches":  # Optuna searches: their spaces fit their configs
        from mlplab.commands.search.command import check_config, settings

        monkeypatch.chdir(ROOT)  # a search file names its config from the project's root
        is_file = "space" in yaml.safe_load(path.read_text())
        args = [str(path)] if is_file else ["--config", config("moons"), "--space", str(path)]
        assert check_config(settings(args)[0])  # trial 0: the config's values
        return
    if path.parent.name == "examples":  # the user's-own-data examples: their data written here
        from mlplab.data.examples import write_examples

        write_examples(Path.cwd())
    if path.parent.name == "mnist_optimizers":  # overrides of the seed model: used on top of it
        configs = ["--config", config("mnist"), *configs]
    text = path.read_text() + (ROOT / "configs" / "mnist.yaml").read_text() * (len(configs) > 2)
    for folder in ("FashionMNIST", "MNIST"):
        if f"{folder}DataModule" in text and not real_data(folder):
            pytest.skip(f"no {folder} files: set MLPLAB_DATA_DIR")
    if "ThresholdNet" in text:  # seed 000's hand-set weights: nothing to train, only to test
        main(["test", *configs])
        assert only_run(store, path.stem).data.metrics["test/acc"] == 1.0  # 4/4, as the seed
        return
    main(["fit", *configs, "--trainer.fast_dev_run", "true"])


def test_a_network_with_nothing_to_train_is_one_line(tmp_path):
    result = run_mlplab("fit", "--config", config("xor_threshold"), cwd=tmp_path,
                        env={"MLFLOW_TRACKING_URI": store_uri(tmp_path)})  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "mlplab: error: ThresholdNet has no trainable weights: nothing to fit; evaluate it as it "
        "is with `mlplab test --config ...`"
    )
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def xor_module_run(tmp_path_factory):
    """One real XOR training run (seed 000's config) in its own store, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("xor")
    uri = fit_in_own_store(tmp, "--config", config("xor"), "--run_name", "xor-e2e")
    return only_run(uri, "xor"), tmp, uri


@pytest.fixture
def xor_run(xor_module_run, monkeypatch):
    """The XOR run, with its store as the current one."""
    run, tmp, uri = xor_module_run
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return run, tmp


def test_xor_reaches_all_four_points(xor_run):
    run, _ = xor_run
    assert run.data.metrics["test/acc"] == 1.0
    assert run.info.status == "FINISHED" and run.info.run_name == "xor-e2e"


def test_run_records_where_it_comes_from(xor_run):
    """The commit of the config's repository, the user, one source name, the config files, the
    command line, and the config's header comment as the run's description."""
    run, _ = xor_run
    tags = run.data.tags
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["mlplab.git.dirty"] in ("True", "False")
    assert tags["mlflow.source.name"] == "mlplab fit" and tags["mlflow.user"]
    assert tags["mlplab.configs"] == config("xor")
    assert tags["mlplab.command_line"].startswith("mlplab fit --config ")
    assert tags["mlflow.note.content"].startswith("Seed 000: 2-4-4-1 tanh network")


def test_run_records_flattened_params_and_the_resolved_config(xor_run):
    run, _ = xor_run
    params = run.data.params
    assert params["model"] == "my_project.models.Classifier"
    assert params["model.net"] == "my_project.models.MLP"
    assert params["model.net.hidden_sizes"] == "[4, 4]"
    assert float(params["model.lr"]) == 0.02
    assert params["model.optimizer"] == "torch.optim.Adam"
    assert params["data"] == "my_project.data.XORDataModule"
    assert params["trainer.max_epochs"] == "100"
    assert params["data.num_features"] == "2" and params["data.num_classes"] == "2"  # linked
    # what the config sets, in one dotted scheme; no bookkeeping, no Trainer default untouched
    assert params["trainer.callbacks.0"] == "my_project.figures.DecisionBoundary"
    assert not [key for key in params if "/" in key]
    assert not {"tracking_uri", "run_name", "experiment_name", "ckpt_path"} & params.keys()
    assert not {"trainer.barebones", "trainer.accelerator", "checkpoint.verbose"} & params.keys()
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    resolved = yaml.safe_load(text)
    assert resolved["model"]["init_args"]["net"]["init_args"]["hidden_sizes"] == [4, 4]
    assert resolved["experiment_name"] == "xor"  # fed back, the config lands in the same place
    assert resolved["trainer"]["max_epochs"] == 100


def test_metrics_are_per_epoch_at_the_global_step(xor_run):
    run, _ = xor_run
    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train/loss")
    # 4 batches of 1 per epoch: the step axis counts optimiser steps, one point per epoch
    assert [m.step for m in history] == [4 * (e + 1) for e in range(100)]
    assert history[-1].value < history[0].value / 5
    epochs = client.get_metric_history(run.info.run_id, "epoch")
    assert [m.value for m in epochs] == [float(e) for e in range(100)]


def test_figures_are_logged(xor_run):
    run, _ = xor_run
    paths = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "figures")}
    assert paths == {"figures/decision_boundary.png", "figures/learning_curves.png"}


def test_checkpoints_live_in_the_runs_folder(xor_run):
    run, tmp = xor_run
    folder = tmp / "mlruns" / "xor" / run.info.run_id
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert any((folder / "checkpoints").glob("best-*.ckpt"))
    assert not (tmp / "lightning_logs").exists() and not list(tmp.glob("*.ckpt"))


def test_logged_model_loads_with_pyfunc_and_solves_xor(xor_run):
    run, _ = xor_run
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    probabilities = np.asarray(model.predict(XOR)).reshape(-1)
    assert (probabilities > 0.5).astype(int).tolist() == [0, 1, 1, 0]
    assert model.metadata.signature is not None
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 2)


def test_the_splits_are_the_runs_dataset_inputs(xor_run):
    run, _ = xor_run
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    found = {i.tags[0].value: i.dataset for i in inputs}
    assert set(found) == {"train", "val", "test"}
    assert found["train"].name == "xor-train" and len(found["train"].digest) >= 8
    assert '"features_shape": [4, 2]' in found["train"].profile


def test_system_metrics_are_in_the_run(xor_run):
    run, _ = xor_run
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    # sampled while it trains (every second unless MLflow's settings say otherwise): a run of
    # seconds has several points, not only the one at its end
    key = "system/cpu_utilization_percentage"
    history = MlflowClient().get_metric_history(run.info.run_id, key)
    assert len({m.step for m in history}) >= 3


@pytest.mark.parametrize(
    "switch, env",
    [(["--log_system_metrics", "false"], {}),
     ([], {"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"})],  # fmt: skip
    ids=["flag", "mlflow-switch"],
)
def test_system_metrics_can_be_switched_off(switch, env, tmp_path, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    uri = fit_in_own_store(tmp_path, "--config", config("xor"), "--trainer.max_epochs", "1",
                           "--trainer.callbacks", "[]", *switch)  # fmt: skip
    _, (run,) = experiment_runs(uri, "xor")
    assert "val/loss" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("system/")]


def test_logged_model_carries_its_checkpoints_metrics_and_the_test_metrics(xor_run):
    run, tmp = xor_run
    (best,) = (tmp / "mlruns" / "xor" / run.info.run_id / "checkpoints").glob("best-*.ckpt")
    step = __import__("torch").load(best, weights_only=True)["global_step"]
    (model,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string="name = 'model'",
        output_format="list")  # fmt: skip
    metrics = {m.key: m for m in model.metrics}
    client = MlflowClient()
    val_acc = next(m for m in client.get_metric_history(run.info.run_id, "val/acc")
                   if m.step == step)  # fmt: skip
    assert metrics["val/acc"].value == val_acc.value == 1.0 and metrics["val/acc"].step == step
    assert metrics["test/acc"].value == run.data.metrics["test/acc"]
    # tested with the best checkpoint's weights: drawn at its step, not the last epoch's
    (tested,) = client.get_metric_history(run.info.run_id, "test/acc")
    assert tested.step == metrics["test/acc"].step == step


def test_predict_from_the_mlflow_model_and_from_the_checkpoint(xor_run, tmp_path):
    run, tmp = xor_run
    np.savetxt(tmp_path / "x.csv", XOR, delimiter=",", header="x1,x2", comments="")
    best = next((tmp / "mlruns" / "xor" / run.info.run_id / "checkpoints").glob("best-*.ckpt"))
    for source in (f"runs:/{run.info.run_id}/model", str(best)):
        out = tmp_path / "predictions" / Path(source).stem / "p.csv"  # folders made as needed
        main(
            ["predict", "--model", source, "--input", str(tmp_path / "x.csv"), "--output", str(out)]
        )
        predicted = pd.read_csv(out)
        assert list(predicted.columns) == ["predicted", "prob_0", "prob_1"], source
        assert predicted["predicted"].tolist() == [0, 1, 1, 0]


def test_predict_subcommand_with_a_config_writes_the_test_split_predictions(
    xor_run, tmp_path, monkeypatch
):
    run, tmp = xor_run
    monkeypatch.chdir(tmp_path)
    best = next((tmp / "mlruns" / "xor" / run.info.run_id / "checkpoints").glob("best-*.ckpt"))
    main(["predict", "--config", config("xor"), "--ckpt_path", str(best)])
    predicted = pd.read_csv(tmp_path / "predictions.csv")
    assert predicted["predicted"].tolist() == [0, 1, 1, 0]
    assert (predicted["prob_1"] > 0.5).astype(int).tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize(
    "name, metric, check",
    [
        ("iris_classification", "val/acc", lambda v: v >= 0.93),  # seed: 0.96
        ("iris_regression", "val/r2", lambda v: v >= 0.85),  # seed: 0.90
        ("digits", "val/acc", lambda v: 1 - v <= 0.08),  # seed: held-out error 0.068
        ("moons", "test/acc", lambda v: v >= 0.97),  # seed: ~100 % training accuracy
    ],
)
def test_seed_experiment_reaches_its_reference(name, metric, check, store):
    main(["fit", "--config", config(name)])
    run = only_run(store, name)
    value = run.data.metrics[metric]
    assert check(value), f"{name}: {metric} = {value:.4f}"


@pytest.mark.parametrize("command, metric", [("validate", "val/acc"), ("test", "test/acc")])
def test_validate_and_test_subcommands_log_their_own_run(xor_run, store, command, metric):
    run, tmp = xor_run
    best = next((tmp / "mlruns" / "xor" / run.info.run_id / "checkpoints").glob("best-*.ckpt"))
    main(
        [command, "--config", config("xor"), "--ckpt_path", str(best), "--experiment_name", "eval"]
    )
    evaluated = only_run(store, "eval")
    assert evaluated.data.metrics[metric] == 1.0
    assert evaluated.data.tags["mlplab.command"] == command


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.init_args.nope", "3"], "nope"),
        (["--model.net.activation", "swish"], "swish"),
        (["--model.lr", "fast"], "fast"),
        (["--trainer.max_epochs", "-x"], "max_epochs"),
    ],
)
def test_bad_config_exits_non_zero_with_jsonargparse_message_and_no_traceback(
    args, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store, here
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", config("xor"), *args])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert message in err and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "mlruns").exists()  # nothing written to a store


def test_missing_config_file_is_named(tmp_path):
    result = run_mlplab("fit", "--config", "configs/none.yaml", cwd=tmp_path)
    assert (
        result.returncode == 2 and "none.yaml" in result.stderr and "Traceback" not in result.stderr
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("1,2,3\n", "3 features per row but the model takes 2"),
        ("0,1\n1,x\n", "row 2, column 2 is 'x', not a number"),
        ("", "is empty"),
        ("0,1\n1,\n", "row 2, column 2 is empty"),
    ],
)
def test_predict_rejects_bad_input_in_one_line(xor_run, tmp_path, content, message, capsys):
    run, _ = xor_run
    (tmp_path / "x.csv").write_text(content)
    with pytest.raises(SystemExit) as done:
        main(["predict", "--model", f"runs:/{run.info.run_id}/model", "--input",
              str(tmp_path / "x.csv")])  # fmt: skip
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_predict_names_a_missing_checkpoint(tmp_path):
    (tmp_path / "x.csv").write_text("0,1\n")
    result = run_mlplab("predict", "--model", "nope.ckpt", "--input", "x.csv", cwd=tmp_path)
    assert result.returncode == 2 and "checkpoint nope.ckpt does not exist" in result.stderr


def test_console_script_trains_into_the_default_store(tmp_path):
    """`mlplab fit` from a project folder writes to ./mlruns/mlflow.db, nowhere else."""
    env = {"MLFLOW_TRACKING_URI": ""}
    result = run_mlplab(
        "fit", "--config", config("xor"), "--trainer.max_epochs", "2", cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns"]
    assert Path(tmp_path / "mlruns" / "xor").is_dir()


def test_checkpointing_can_be_turned_off(tmp_path, monkeypatch):
    # mlplab adds a ModelCheckpoint; Lightning refuses one beside enable_checkpointing=false
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    main(["fit", "--config", config("xor"), "--trainer.max_epochs", "3",
          "--trainer.enable_checkpointing", "false", "--tracking_uri", uri])  # fmt: skip
    run = only_run(uri, "xor")
    assert run.data.metrics["val/acc"] >= 0  # trained, logged
    assert not list(tmp_path.rglob("*.ckpt"))
    assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model") is not None


def test_a_printed_config_fed_back_lands_in_the_same_experiment(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", config("xor"), "--print_config"])
    printed = tmp_path / "my-xor-run.yaml"
    printed.write_text(capsys.readouterr().out)
    assert "experiment_name: xor" in printed.read_text()
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    main(["fit", "--config", str(printed), "--trainer.max_epochs", "1", "--tracking_uri", uri])
    client = mlflow.MlflowClient(uri)
    assert {e.name for e in client.search_experiments()} == {"xor", "Default"}
