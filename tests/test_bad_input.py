"""Bad input through the real CLI, every command and family: settings out of range, configs that
do not fit together or are no YAML, broken stores, bad files for predict and export, malformed
sweeps and searches. Each case: the exit status, one line (a `tip:` line at most) that says what
was wrong, no traceback, and the store as it was: its earlier run readable, no run left RUNNING,
SQLite's integrity check passing. Commands run as real processes forked from a process that has
imported everything once (tests/forkserver.py), so the table costs seconds, not minutes."""

from __future__ import annotations

import shlex
import shutil
import sqlite3
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import ROOT, config

XOR = config("xor")
FIT = ["fit", "--config", XOR, "--trainer.max_epochs", "1"]
COMMON = {"fit": " ".join(FIT), "xor": XOR, "iris": config("iris_classification"),
          "iris_r": config("iris_regression"),
          "perceptron": str(ROOT / "configs" / "baselines" / "iris_perceptron.yaml")}  # fmt: skip


@pytest.fixture(scope="module")
def template(cli, tmp_path_factory) -> Path:
    """A working folder whose store holds one finished run (copied for each case)."""
    folder = tmp_path_factory.mktemp("template")
    done = cli.run([*FIT, "--run_name", "earlier"], folder, {"MLFLOW_TRACKING_URI": ""})
    assert done.code == 0, done.stderr
    return folder


def files(folder: Path) -> dict[str, Path]:
    """Inputs the cases name by their stem ({syntax} is syntax.yaml), written into `folder`."""
    made = {
        "empty.yaml": b"", "binary.yaml": bytes(range(256)), "syntax.yaml": b"model:\n  lr: [1, 2\n",
        "list.yaml": b"- model\n- data\n", "grid_list.yaml": b"- 1\n",
        "space.yaml": b"model.lr: {low: 0.01, high: 0.1, log: true}\n",
        "space_bad.yaml": b"model.lr: {low: 1, high: 0.1}\n",
        "space_key.yaml": b"model.lrr: {low: 0.01, high: 0.1}\n",
        "csv.csv": b"0,1\n1,0\n", "header_typo.csv": b"0,abc\n1,1\n", "short_rows.csv": b"0,1\n1\n",
        "notdb.db": b"not a database\n", "zeros.npy": bytes(128), "text.ckpt": b"not a checkpoint\n",
        "afile": b"x",
    }  # fmt: skip
    for name, content in made.items():
        (folder / name).write_bytes(content)
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "dbfolder" / "mlflow.db").mkdir(parents=True)
    paths = {Path(name).stem: folder / name for name in [*made, "objects.npy"]}
    best = next((folder / "mlruns").rglob("best-*.ckpt"))
    saved = torch.load(best)  # as `--checkpoint.save_weights_only true` writes it
    for key in ("optimizer_states", "lr_schedulers", "callbacks"):
        del saved[key]
    torch.save(saved, folder / "weights.ckpt")
    return {**paths, "dir": folder, "best": best, "weights": folder / "weights.ckpt"}


# id -> (the command line, {name} a file of the case's folder; what its one line says)
CASES = {
    # fit: values their classes or Lightning refuse
    "negative width": ("{fit} --model.net.hidden_sizes [-2]", "Classifier: hidden_sizes must be positive widths, got [-2]"),
    "zero width": ("{fit} --model.net.hidden_sizes '[4, 0]'", "hidden_sizes must be positive widths, got [4, 0]"),
    "dropout 1.5": ("{fit} --model.net.dropout 1.5", "dropout must be in [0, 1), got 1.5"),
    "input dropout 1": ("{fit} --model.net.input_dropout 1", "input_dropout must be in [0, 1), got 1.0"),
    "negative lr": ("{fit} --model.lr -0.1", "lr must be a positive finite number, got -0.1"),
    "nan lr": ("{fit} --model.lr nan", "model.lr: Expected a <class 'float'>. (got 'nan')"),
    "text lr": ("{fit} --model.lr fast", "model.lr: Expected a <class 'float'>. (got 'fast')"),
    "negative batch": ("{fit} --data.batch_size -5", "XORDataModule: batch_size must be positive"),
    "text batch": ("{fit} --data.batch_size abc", "data.batch_size: Expected a <class 'int'>. (got 'abc')"),
    "zero chunk": ("{fit} --data.chunk 0", "chunk must be at least 1, got 0"),
    "negative epochs": ("{fit} --trainer.max_epochs -3", "trainer: `max_epochs` must be a non-negative integer or -1"),
    "fractional epochs": ("{fit} --trainer.max_epochs 1.5", "trainer.max_epochs: Expected a <class 'int'>"),
    "gpu without one": ("{fit} --trainer.accelerator gpu", "trainer: No supported gpu backend found"),
    "unknown precision": ("{fit} --trainer.precision 7", "trainer.precision: Expected a typing.Literal["),
    "text seed": ("{fit} --seed_everything abc", "seed_everything: Expected a"),
    "unknown activation": ("{fit} --model.net.activation swish", "model.net.activation: Expected a typing.Literal['relu'"),
    "unknown model key": ("{fit} --model.lrr 0.1", "model: Option 'lrr' is not accepted (got '0.1')"),
    "unknown flag": ("{fit} --epochs 3", "unrecognized arguments: --epochs 3"),
    "unknown optimizer": ("{fit} --model.optimizer Adamm", "model.optimizer: Expected a path but Adamm"),
    "unknown model class": ("{fit} --model my_project.models.Nope", "model: module 'my_project.models' has no attribute 'Nope'"),
    "abstract data class": ("{fit} --data mlplab.data.ArrayDataModule", "data: Expected an instantiatable class, but is abstract"),
    # fit: parts that do not fit together
    "regressor on classes": ("{fit} --model my_project.models.Regressor", "the data holds classes (2), not numeric targets: use my_project.models.Classifier"),
    "classifier on numbers": ("fit --config {iris_r} --model my_project.models.Classifier", "the data has no num_classes (regression data?): use my_project.models.Regressor"),
    "missing checkpoint": ("{fit} --ckpt_path {dir}/nope.ckpt", "nope.ckpt does not exist; give a .ckpt file or `last`"),
    "text checkpoint": ("{fit} --ckpt_path {text}", "text.ckpt is not a readable checkpoint"),
    "cuda graph on cpu": ("{fit} --fast_path.cuda_graph true", "fast_path.cuda_graph: it needs a CUDA device and this run trains on cpu (or set it false)"),
    "cuda graph, single batches": ("{fit} --fast_path.cuda_graph true --data.chunk 1", "this run trains on cpu; it replays over the fast path's chunks: set data.chunk above 1"),
    "resume weights only": ("{fit} --ckpt_path {weights}", "weights.ckpt holds weights only (checkpoint.save_weights_only), not the state a fit resumes from"),
    "xor checkpoint into iris": ("fit --config {iris} --ckpt_path {best}", "belongs to another model (net.1.weight"),
    # fit: config files
    "missing config": ("fit --config {dir}/nope.yaml", "config: File does not exist:"),
    "empty config": ("fit --config {empty}", "empty.yaml is empty; write its settings, or leave it out"),
    "binary config": ("fit --config {binary}", "binary.yaml is not a text file; give a YAML config"),
    "YAML syntax": ("fit --config {syntax}", "syntax.yaml: YAML syntax error at line 3, column 1"),
    "config a list": ("fit --config {list}", "list.yaml is not a mapping of settings"),
    "config a folder": ("fit --config {dir}", "config: Path is not a file:"),
    # fit: stores
    "sqlite with one slash": ("{fit} --tracking_uri sqlite:/x.db", "tracking URI 'sqlite:/x.db' names no database file: write sqlite:///"),
    "unknown scheme": ("{fit} --tracking_uri foo://bar", "tracking URI 'foo://bar': MLflow has no store for foo"),
    "in-memory store": ("{fit} --tracking_uri sqlite://", "tracking URI 'sqlite://' names no database file"),
    "store not a database": ("{fit} --tracking_uri sqlite:///{notdb}", "notdb.db is not an SQLite database; move it aside"),
    "store a folder": ("{fit} --tracking_uri sqlite:///{dir}/dbfolder/mlflow.db", "dbfolder/mlflow.db is a folder, not an SQLite database"),
    "store under a file": ("{fit} --tracking_uri sqlite:///{afile}/mlflow.db", "afile (File exists); choose a writable place"),
    "server not answering": ("{fit} --tracking_uri http://127.0.0.1:9", "the MLflow tracking server http://127.0.0.1:9 does not answer"),
    # validate / test / predict through Lightning
    "test missing checkpoint": ("test --ckpt_path {dir}/nope.ckpt", "nope.ckpt does not exist; give a .ckpt file or `last`"),
    "test text checkpoint": ("test --ckpt_path {text}", "text.ckpt is not a readable checkpoint"),
    "validate no config": ("validate", "mlplab validate: error: no model and data: give --config CONFIG.yaml"),
    "predict missing checkpoint": ("predict --config {xor} --ckpt_path {dir}/x.ckpt", "x.ckpt does not exist; give a .ckpt file or `last`"),
    # predict --input
    "predict missing model": ("predict --model {dir}/nope --input {csv}", "cannot load model"),
    "predict missing input": ("predict --model {best} --input {dir}/no.csv", "no.csv does not exist (or is not a file)"),
    "predict header typo": ("predict --model {best} --input {header_typo}", "header_typo.csv: row 1, column 2 is 'abc', not a number"),
    "predict short row": ("predict --model {best} --input {short_rows}", "short_rows.csv: row 2, column 2 is empty; every row needs 2 numbers"),
    "predict zero-filled npy": ("predict --model {best} --input {zeros}", "zeros.npy is not a .npy file (no NumPy header)"),
    "predict objects npy": ("predict --model {best} --input {objects}", "objects.npy is not a numeric .npy array (Object arrays"),
    "predict unknown model": ("predict --model models:/nope/1 --input {csv}", "cannot load model models:/nope/1: Registered Model with name=nope not found"),
    "predict output under a file": ("predict --model {best} --input {csv} --output {afile}/p.csv", "cannot create the folder of"),
    # export
    "export missing checkpoint": ("export --model {dir}/x.ckpt --output m.onnx", "x.ckpt does not exist"),
    "export text checkpoint": ("export --model {text} --output m.onnx", "text.ckpt is not a readable checkpoint (not a PyTorch file)"),
    "export under a file": ("export --model {best} --output {afile}/m.onnx", "cannot create the folder of"),
    "export to a folder": ("export --model {best} --output {dir}", "is a folder; give the path of the file to write in it"),
    "export tolerance -1": ("export --model {best} --output m.onnx --tolerance -1", "--tolerance -1.0: the largest difference allowed is a finite number above 0"),
    "export tolerance nan": ("export --model {best} --output m.onnx --tolerance nan", "--tolerance nan: the largest difference allowed"),
    "predict to a folder": ("predict --model {best} --input {csv} --output {dir}", "is a folder; give the path of the file to write in it"),
    # sweep
    "sweep missing file": ("sweep {dir}/nope.yaml", "nope.yaml does not exist (or is not a file)"),
    "sweep a config as file": ("sweep {xor}", "expected keys config, grid (a mapping)"),
    "sweep file a list": ("sweep {grid_list}", "grid_list.yaml: expected keys config, grid (a mapping)"),
    "sweep grid no values": ("sweep --config {xor} --grid model.lr=", "--grid 'model.lr=': write KEY=[VALUE, ...]"),
    "sweep grid split": ("sweep --config {xor} --grid model.lr=[0.1, 0.01]", "--grid 'model.lr=[0.1,': write KEY=[VALUE, ...]"),
    "sweep no grid": ("sweep --config {xor}", "mlplab sweep: error: give --config and --grid, or a sweep file"),
    "sweep workers -1": ("sweep --config {xor} --grid model.lr=[0.1] --workers -1", "--workers -1: at least 1"),
    "sweep unknown grid key": ("sweep --config {xor} --grid model.lrr=[0.1,0.2]", "--grid model.lrr: not a setting of this config; did you mean model.lr?"),
    "sweep value of a wrong type": ("sweep --config {xor} --grid data.batch_size=[4,abc]", "--grid data.batch_size: 'abc' is refused: data.batch_size: Expected a <class 'int'>"),
    "sweep value refused by its class": ("sweep --config {xor} --grid model.lr=[0.1,-1]", "--grid model.lr: -1 is refused"),
    "sweep stack -1": ("sweep --config {xor} --grid model.lr=[0.1] --stack -1", "--stack -1: the number of trials trained together (0: each alone)"),
    "sweep goal text": ("sweep --config {xor} --grid model.lr=[0.1] --goal abc", "--goal: invalid float value: 'abc'"),
    "sweep bad store": ("sweep --config {xor} --grid model.lr=[0.1] --tracking_uri foo://x", "tracking URI 'foo://x': MLflow has no store for foo"),
    # search
    "search no space": ("search --config {xor}", "give --config and --space, or a search file"),
    "search low above high": ("search --config {xor} --space {space_bad}", "search space model.lr: the range 1..0.1 is inverted"),
    "search unknown key": ("search --config {xor} --space {space_key}", "model.lrr is not a setting of this config; did you mean model.lr?"),
    "search unknown sampler": ("search --config {xor} --space {space} --sampler nope", "unknown sampler 'nope'; choose one of tpe"),
    "search stack -1": ("search --config {xor} --space {space} --stack -1", "--stack -1: the number of trials trained together (0: each alone)"),
    "search zero trials": ("search --config {xor} --space {space} --n_trials 0", "--n_trials must be a positive integer, got 0"),
    "search in mlflow's db": ("search --config {xor} --space {space} --storage sqlite:///mlruns/mlflow.db", "the Optuna study cannot live in MLflow's database"),
    # the other commands
    "baseline missing config": ("baseline --config {dir}/nope.yaml --experiment_name x", "mlplab baseline: error: config: File does not exist"),
    "baseline unknown estimator": ("baseline --config {perceptron} --estimator sklearn.linear_model.Nope", "estimator: module 'sklearn.linear_model' has no attribute 'Nope'"),
    "runs unknown experiment": ("runs --experiment nope", "no experiment 'nope' in the store (it has: Default, xor)"),
    "runs unknown sort": ("runs --experiment xor --sort nope", "--sort nope: not a column"),
    "runs bad store": ("runs --experiment xor --tracking_uri sqlite:/x", "tracking URI 'sqlite:/x' names no database file"),
    "sync no journal": ("sync {dir}", "no run journal in"),
    "reproduce unknown name": ("reproduce --experiments my_project.experiments --only nope", "unknown experiment(s) nope; choose from xor"),
    "server bad port": ("server --port 99999", "--port 99999: a TCP port is 1 to 65535"),
    "server root a file": ("server --root {afile}", "afile is a file; give the folder for the database and the artifacts"),
    "unknown command": ("train", "unknown command 'train'; `mlplab --help` lists them"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_and_the_store_stays_whole(cli, template, tmp_path, case):
    command, message = CASES[case]
    folder = tmp_path / "work"
    shutil.copytree(template, folder, ignore=shutil.ignore_patterns(".std*"))
    names = {**files(folder), **COMMON}
    done = cli.run(shlex.split(command.format(**names)), folder, {"MLFLOW_TRACKING_URI": ""})
    assert done.code == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    said = done.said
    assert 1 <= len(said) <= 2 and (len(said) == 1 or said[1].startswith("tip: ")), said
    assert message in said[0], said
    # the store as it was
    database = folder / "mlruns" / "mlflow.db"
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    client = mlflow.MlflowClient(f"sqlite:///{database}")
    runs = [
        run for e in client.search_experiments() for run in client.search_runs([e.experiment_id])
    ]
    assert [(run.info.run_name, run.info.status) for run in runs] == [("earlier", "FINISHED")]
