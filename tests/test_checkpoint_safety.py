"""A checkpoint is data: through every command that reads one, a file that carries code (a
pickled `__reduce__` payload) or names a class, module or instantiator outside mlplab's
allow-list is refused in one line, exit 2, and nothing of it runs; mlplab's own checkpoints
(also of a task built in Python) hold nothing but data and still resume, test, predict and
export. Commands run as real processes forked from one that imported everything
(tests/forkserver.py)."""

from __future__ import annotations

import os
import pickle
import shutil
from functools import partial
from pathlib import Path

import lightning as L
import numpy
import pytest
import torch
import yaml

from conftest import CONFIGS, config, experiment_runs, real_data, store_uri
from mlplab.data.examples import write_examples
from mlplab.errors import UserError
from mlplab.safety import metadata
from mlplab.safety.metadata import CheckpointMetadata, load_module
from mlplab.safety.trust import refusal
from my_project.data import XORDataModule
from my_project.models import MLP, Classifier

XOR = config("xor")
SLURM = {"SLURM_JOB_ID": "99", "SLURM_JOB_NAME": "mlplab", "SLURM_NTASKS": "1",
         "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_NODELIST": "node1",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
# every command that reads a checkpoint; {ckpt} is the bad file, planted where the command
# looks for it: `last` is the experiment's newest last.ckpt (how sweeps and searches resume a
# trial), under SLURM the job's requeue checkpoint
ENTRY_POINTS = {
    "test": ("test --ckpt_path {ckpt}", {}),
    "validate": ("validate --ckpt_path {ckpt}", {}),
    "test with config": (f"test --config {XOR} --ckpt_path {{ckpt}}", {}),
    "test with -c": (f"test -c {XOR} --ckpt_path {{ckpt}}", {}),
    "predict with config": (f"predict --config {XOR} --ckpt_path {{ckpt}}", {}),
    "fit resume": (f"fit --config {XOR} --ckpt_path {{ckpt}}", {}),
    "fit resume last": (f"fit --config {XOR} --ckpt_path last", {}),
    "SLURM requeue": (f"fit --config {XOR}", SLURM),
    "predict --model": ("predict --model {ckpt} --input x.csv", {}),
    "export": ("export --model {ckpt} --output model.onnx", {}),
}


class Payload:
    """Unpickling it runs a shell command (what an attacker's checkpoint carries)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# a module in the working directory (where mlplab finds a user's classes) that marks its import
SIDE_EFFECT = "from pathlib import Path\nPath('{marker}').touch()\nclass Net: pass\nrun = print\n"


def bad_checkpoint(kind: str, good: dict, marker: Path) -> dict:
    checkpoint = {**good, "hyper_parameters": dict(good["hyper_parameters"])}
    hparams = checkpoint["hyper_parameters"]
    if kind == "reduce payload":
        checkpoint["extra"] = Payload(marker)
    elif kind == "class outside the allow-list":
        hparams["net"] = {"class_path": "sideeffect.Net", "init_args": {}}
    elif kind == "instantiator outside the allow-list":
        hparams["_instantiator"] = "sideeffect.run"
    elif kind == "private module":
        hparams["net"] = {"class_path": "mlplab.__main__.main", "init_args": {}}
    elif kind.startswith("config"):  # jsonargparse builds a class_path given for an `Any`
        popen = {"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}",
                                                                  "shell": True}}  # fmt: skip
        header = popen if kind == "config payload in an Any setting" else yaml.safe_dump(popen)
        config = yaml.safe_load(good[metadata.CONFIG])
        config["trainer"]["profiler"] = {
            "class_path": "lightning.pytorch.profilers.PyTorchProfiler",
            "init_args": {"table_kwargs": {"header": header}},
        }
        checkpoint[metadata.CONFIG] = yaml.safe_dump(config)
    return checkpoint


@pytest.fixture(scope="module")
def trained(cli, tmp_path_factory) -> Path:
    """A folder whose store holds one XOR fit (copied for each case)."""
    folder = tmp_path_factory.mktemp("trained")
    done = cli.run(["fit", "--config", XOR, "--trainer.max_epochs", "1"], folder,
                   {"MLFLOW_TRACKING_URI": ""})  # fmt: skip
    assert done.code == 0, done.stderr
    return folder


def plant(folder: Path, name: str, checkpoint: dict, env: dict) -> str:
    """The bad file where the entry point reads it; returns its path for {ckpt}."""
    if env:  # SLURM: the job's requeue checkpoint, which a fit resumes by itself
        path = folder / "mlruns" / f"slurm-{env['SLURM_JOB_ID']}" / "hpc_ckpt_1.ckpt"
    elif name == "fit resume last":  # the experiment's newest last.ckpt
        path = next((folder / "mlruns" / "xor").glob("*/checkpoints/last.ckpt"))
    else:
        path = folder / "bad.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return str(path)


KINDS = ["reduce payload", "class outside the allow-list", "instantiator outside the allow-list",
         "private module", "config payload in an Any setting",
         "config payload as YAML text"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_bad_checkpoint_is_refused_in_one_line_and_nothing_runs(cli, trained, tmp_path, entry,
                                                                  kind):  # fmt: skip
    folder = tmp_path / "work"
    shutil.copytree(trained, folder)
    marker = tmp_path / "ran"
    (folder / "sideeffect.py").write_text(SIDE_EFFECT.format(marker=marker))
    (folder / "x.csv").write_text("0,1\n1,0\n")
    good = torch.load(next(folder.rglob("last.ckpt")), weights_only=True)
    command, env = ENTRY_POINTS[entry]
    path = plant(folder, entry, bad_checkpoint(kind, good, marker), env)

    done = cli.run(command.format(ckpt=path).split(), folder, {"MLFLOW_TRACKING_URI": "", **env})

    assert done.code == 2, done.stderr
    assert not marker.exists(), f"the checkpoint's code ran: {done.stderr}"
    assert len(done.said) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "if you trust this file, add --weights_only false" in done.said[0]
    expected = {"reduce payload": "holds a posix.system object, which is code, not data",
                "class outside the allow-list": "names sideeffect.Net, a class outside",
                "instantiator outside the allow-list": "names sideeffect.run, an instantiator",
                "private module": "names mlplab.__main__.main, which is not a public class",
                "config payload in an Any setting": "names subprocess.Popen, which is not a net",
                "config payload as YAML text": "names subprocess.Popen, which is not a network"}
    assert expected[kind] in done.said[0]
    assert not (folder / "model.onnx").exists() and not (folder / "predictions.csv").exists()


def test_the_opt_in_is_lightnings_weights_only_switch(cli, trained, tmp_path):
    """`--weights_only false` trusts the file: the payload refused above then runs, which is
    what trusting a pickle means."""
    marker = tmp_path / "ran"
    good = torch.load(next(trained.rglob("last.ckpt")), weights_only=True)
    bad = tmp_path / "bad.ckpt"
    torch.save(bad_checkpoint("reduce payload", good, marker), bad)
    refused = cli.run(["test", "--ckpt_path", str(bad)], tmp_path, {"MLFLOW_TRACKING_URI": ""})
    assert refused.code == 2 and not marker.exists()

    done = cli.run(["test", "--ckpt_path", str(bad), "--weights_only", "false"], tmp_path,
                   {"MLFLOW_TRACKING_URI": ""})  # fmt: skip
    assert done.code == 0, done.stderr
    assert marker.exists()


def test_a_checkpoint_from_a_config_is_plain_data_and_works_everywhere(cli, trained, tmp_path):
    """No global beyond PyTorch's weights-only set; test, predict, export and resume read it."""
    last = next(trained.rglob("last.ckpt"))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(last)) == []
    (tmp_path / "x.csv").write_text("0,1\n1,0\n")
    env = {"MLFLOW_TRACKING_URI": ""}
    for command in (f"test --ckpt_path {last}", f"predict --model {last} --input x.csv",
                    f"export --model {last} --output m.onnx"):  # fmt: skip
        done = cli.run(command.split(), tmp_path, env)
        assert done.code == 0, (command, done.stderr)
    assert (tmp_path / "m.onnx").is_file()
    folder = tmp_path / "resume"
    shutil.copytree(trained, folder)
    done = cli.run(["fit", "--config", XOR, "--ckpt_path", "last", "--trainer.max_epochs", "2"],
                   folder, env)  # fmt: skip
    assert done.code == 0, done.stderr
    assert "mlplab: resuming run" in done.stderr


def test_a_checkpoint_keeps_its_model_and_data_not_where_runs_go(cli, trained, tmp_path):
    """`test --ckpt_path X` alone takes the model, the data and the experiment from X's config;
    the store, logger and folders stay the user's (a foreign file's tracking URI would be sent
    the user's credentials)."""
    good = torch.load(next(trained.rglob("last.ckpt")), weights_only=True)
    config = yaml.safe_load(good[metadata.CONFIG])
    config["tracking_uri"] = "http://127.0.0.1:9"  # nothing listens there
    config["trainer"]["default_root_dir"] = str(tmp_path / "elsewhere")
    checkpoint = tmp_path / "moved.ckpt"
    torch.save({**good, metadata.CONFIG: yaml.safe_dump(config)}, checkpoint)
    done = cli.run(["test", "--ckpt_path", str(checkpoint)], tmp_path, {"MLFLOW_TRACKING_URI": ""})
    assert done.code == 0, done.stderr
    assert (tmp_path / "mlruns" / "mlflow.db").is_file() and not (tmp_path / "elsewhere").exists()
    (run,) = experiment_runs(store_uri(tmp_path), "xor")[1]
    assert "test/acc" in run.data.metrics


@pytest.mark.parametrize("name, kind, allowed", [
    ("my_project.models.MLP", "class", True), ("torch.optim.Adam", "class", True),
    ("my_project.figures.ConfusionMatrix", "class", True),
    ("lightning.pytorch.profilers.SimpleProfiler", "class", True),
    ("lightning.pytorch.loggers.CSVLogger", "class", True),
    ("mlplab.data.base.batch_size", "callable", True), ("torch.float32", "callable", True),
    ("subprocess.Popen", "class", False), ("os.system", "callable", False),
    ("mlplab.main.main", "callable", False), ("mlplab.__main__.main", "class", False),
    ("torch.distributed.elastic.multiprocessing.subprocess_handler.SubprocessHandler", "class",
     False),
    ("notimported.Net", "class", False), ("lightning.pytorch.cli.instantiate_module",
                                           "instantiator", True),
    ("subprocess.run", "instantiator", False),
])  # fmt: skip
def test_what_a_checkpoint_may_name(name, kind, allowed):
    assert (refusal(name, kind) is None) == allowed, refusal(name, kind)


def test_trust_is_the_last_word_of_each_command(tmp_path):
    """`--weights_only false` trusts one command's checkpoints, not the next command's; an
    explicit `weights_only=True` wins over it."""
    from mlplab.cli import with_weights_only
    from mlplab.safety.trust import checkpoints_trusted

    with_weights_only(["test", "--weights_only", "true", "--weights_only=false"])
    assert checkpoints_trusted()
    _, path = fit_in_python(tmp_path)
    bad = tmp_path / "bad.ckpt"
    marker = tmp_path / "ran"
    torch.save(bad_checkpoint("reduce payload", torch.load(path, weights_only=True), marker), bad)
    with pytest.raises(pickle.UnpicklingError):  # Lightning's own read, weights only
        Classifier.load_from_checkpoint(bad, weights_only=True)
    with_weights_only(["test", "--ckpt_path", str(bad)])
    assert not checkpoints_trusted()
    with pytest.raises(UserError):
        load_module(bad)
    assert not marker.exists()


def fit_in_python(folder: Path, **options) -> Path:
    task = Classifier(partial(MLP, hidden_sizes=[4]), num_features=2, num_classes=2, **options)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=folder,
                        callbacks=[CheckpointMetadata()])  # fmt: skip
    trainer.fit(task, datamodule=XORDataModule(batch_size=4))
    path = folder / "python.ckpt"
    trainer.save_checkpoint(path)
    return task, path


def test_a_task_built_in_python_is_saved_as_data(tmp_path):
    """Its network, optimizer and scheduler classes are stored as `class_path` settings, so
    `load_from_checkpoint` rebuilds them from a weights-only read."""
    scheduler = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    task, path = fit_in_python(tmp_path, optimizer=torch.optim.SGD, lr_scheduler=scheduler)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hparams["net"] == {"class_path": "my_project.models.mlp.MLP",
                              "init_args": {"hidden_sizes": [4]}}  # fmt: skip
    assert hparams["optimizer"] == {"class_path": "torch.optim.sgd.SGD"}

    for loaded in (Classifier.load_from_checkpoint(path), load_module(path)):
        pairs = zip(task.state_dict().values(), loaded.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
        optimizer = loaded.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        assert isinstance(optimizer, torch.optim.SGD)


def test_load_from_checkpoint_refuses_code_unless_trusted(tmp_path):
    _, path = fit_in_python(tmp_path)
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.ckpt"
    torch.save(bad_checkpoint("reduce payload", torch.load(path, weights_only=True), marker), bad)
    with pytest.raises(UserError, match="holds a posix.system object"):
        load_module(bad)
    with pytest.raises(pickle.UnpicklingError):  # Lightning's own read, weights only
        Classifier.load_from_checkpoint(bad)
    assert not marker.exists()
    Classifier.load_from_checkpoint(bad, weights_only=False)  # the caller's explicit trust
    assert marker.exists()


MODEL_CONFIGS = sorted(
    path for path in CONFIGS if "model:" in path.read_text() and "mnist_optimizers" not in str(path)
    and "ThresholdNet" not in path.read_text()  # nothing to train, so no checkpoint
)
# one of each kind of model and data in `make test`; every config with `pytest -m slow`
QUICK = {"xor", "wine", "digits_folder"}
LIMITS = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
          "--trainer.limit_test_batches", "2", "--trainer.limit_predict_batches", "2"]  # fmt: skip


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=p.stem, marks=[] if p.stem in QUICK else [pytest.mark.slow])
     for p in MODEL_CONFIGS],
)  # fmt: skip
def test_every_configs_checkpoint_is_data_and_resumes_tests_predicts_exports(cli, tmp_path, path):
    if "MNIST" in path.read_text() and not real_data("FashionMNIST" if "Fashion" in
                                                     path.read_text() else "MNIST"):  # fmt: skip
        pytest.skip("no MNIST data: set MLPLAB_DATA_DIR")
    write_examples(tmp_path)
    env = {"MLFLOW_TRACKING_URI": ""}
    fit = ["fit", "--config", str(path), *LIMITS]
    done = cli.run([*fit, "--trainer.max_epochs", "1"], tmp_path, env)
    assert done.code == 0, done.stderr[-3000:]
    # the run's own, not the copy among its artifacts
    (last,) = [p for p in (tmp_path / "mlruns").rglob("last.ckpt") if "artifacts" not in p.parts]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(last)) == []

    done = cli.run([*fit, "--trainer.max_epochs", "2", "--ckpt_path", "last"], tmp_path, env)
    assert done.code == 0 and "mlplab: resuming run" in done.stderr, done.stderr[-3000:]
    assert torch.load(last, weights_only=True)["epoch"] == 1
    width = torch.load(last, weights_only=True)["hyper_parameters"]["num_features"]
    numpy.save(tmp_path / "x.npy", numpy.zeros((3, width), dtype="float32"))
    done = cli.run(["test", "--ckpt_path", str(last), *LIMITS], tmp_path, env)
    if done.code == 2:  # the data has no test split (seed 000's digits): one line says so
        assert "has no 'test' split" in done.said[-1] and "Traceback" not in done.stderr
    for command in (["validate", "--ckpt_path", str(last), *LIMITS],
                    ["predict", "--ckpt_path", str(last), *LIMITS],
                    ["export", "--model", str(last), "--output", "m.onnx"]):  # fmt: skip
        done = cli.run(command, tmp_path, env)
        assert done.code == 0, (command, done.stderr[-3000:])
    assert (tmp_path / "predictions.csv").is_file() and (tmp_path / "m.onnx").is_file()
    if "TableDataModule" not in path.read_text():  # a table's model takes named columns
        done = cli.run(["predict", "--model", str(last), "--input", "x.npy"], tmp_path, env)
        assert done.code == 0 and len(done.stdout.splitlines()) == 4, done.stderr[-3000:]
