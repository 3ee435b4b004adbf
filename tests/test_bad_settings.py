"""Settings out of range and config files that are no YAML settings: refused in one line
naming the key, class or file (a `tip:` line at most), before any store or run exists."""

from __future__ import annotations

import mlflow
import pytest

from conftest import config, run_mlplab
from mlplab.main import main

XOR = config("xor")
CASES = {
    # values their classes refuse when built: before a Trainer or a run exists
    "negative width": (["--model.net.hidden_sizes", "[-2]"],
                       "cannot build mlplab.models.Classifier: hidden_sizes must be positive"),
    "zero width": (["--model.net.hidden_sizes", "[4, 0]"], "hidden_sizes must be positive"),
    "dropout 1.5": (["--model.net.dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
    "dropout 1": (["--model.net.input_dropout", "1"], "input_dropout must be in [0, 1)"),
    "negative lr": (["--model.lr", "-0.1"], "lr must be a positive finite number, got -0.1"),
    "negative batch": (["--data.batch_size", "-5"],
                       "cannot build mlplab.data.XORDataModule: batch_size must be positive"),
    "zero chunk": (["--data.chunk", "0"], "chunk must be at least 1, got 0"),
    # jsonargparse's reports, cut to the dotted key and the cause
    "nan lr": (["--model.lr", "nan"], "model.lr: Expected a <class 'float'>. (got 'nan')"),
    "unknown activation": (["--model.net.activation", "swish"],
                           "model.net.activation: Expected a typing.Literal["),
    "unknown model key": (["--model.lrr", "0.1"], "model: Option 'lrr' is not accepted"),
    "unknown optimizer": (["--model.optimizer", "Adamm"], "model.optimizer: Expected a path"),
    "abstract data class": (["--data", "mlplab.data.ArrayDataModule"],
                            "data: Expected an instantiatable class, but is abstract"),
}  # fmt: skip
FILES = {
    "empty": (b"", "is empty; write its settings, or leave it out"),
    "binary": (bytes(range(256)), "is not a text file; give a YAML config"),
    "YAML syntax": (b"model:\n  lr: [1, 2\n", "YAML syntax error at line 3, column 1"),
    "a list": (b"- model\n- data\n", "is not a mapping of settings"),
}


def refused(capfd, args: list[str]) -> list[str]:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args])
    assert exit_.value.code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    return [line for line in err if not line.startswith(("INFO", "Seed set"))]


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_setting_out_of_range_is_one_line_and_no_run(store, tmp_path, capfd, case):
    args, message = CASES[case]
    lines = refused(capfd, ["--config", XOR, *args])
    assert 1 <= len(lines) <= 2 and message in lines[0], lines
    assert len(lines) == 1 or lines[1].startswith("tip: ")
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # no store, so no run


def test_lightnings_own_check_of_a_trainer_setting_is_one_line_and_no_run(store, tmp_path):
    """Lightning checks its settings when the Trainer is built, after the store is opened:
    the store may exist, no run does. (A real process: in-process, loggers that earlier tests
    bound to pytest's closed capture streams would add their own complaints.)"""
    done = run_mlplab("fit", "--config", XOR, "--trainer.max_epochs", "-3", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    mine = [line for line in done.stderr.splitlines() if line.startswith("mlplab: ")]
    assert len(mine) == 1 and "trainer: `max_epochs` must be" in mine[0], done.stderr
    assert done.stderr.strip().splitlines()[-1] == mine[0]  # the last thing said
    client = mlflow.MlflowClient(store)
    assert not any(client.search_runs([e.experiment_id]) for e in client.search_experiments())


@pytest.mark.parametrize("case", FILES, ids=list(FILES))
def test_a_config_file_that_is_no_settings_is_named(store, tmp_path, capfd, case):
    content, message = FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    lines = refused(capfd, ["--config", str(path)])
    assert len(lines) == 1 and lines[0].startswith(f"mlplab: error: config {path}"), lines
    assert message in lines[0]


OUTPUTS = {
    # a fit override's value is no sweep file (was "cannot read sweep file 2")
    "sweep override": (["sweep", "--trainer.max_epochs", "2"], "give --config and --grid"),
    # a grid value split by the shell
    "sweep grid": (["sweep", "--config", XOR, "--grid", "model.lr=[0.1,", "0.01]"],
                   "--grid 'model.lr=[0.1,': write KEY=[VALUE, ...]"),
}  # fmt: skip


@pytest.mark.parametrize("case", OUTPUTS, ids=list(OUTPUTS))
def test_sweep_arguments_are_one_line(store, capfd, case):
    args, message = OUTPUTS[case]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
