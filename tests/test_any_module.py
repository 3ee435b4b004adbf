"""Any LightningModule and LightningDataModule, written as Lightning's docs and examples write
them, through `mlplab fit --model M --data D`: their own metric names, optimisers, loaders and
batches, manual optimisation, no validation step. Each fit has one MLflow run with the module's
metrics, a checkpoint, a test where the module and the data have one, and a logged model (or one
line saying why not).

The module files are written into the working directory, where `mlplab` imports class paths
from. Fits that several tests look at run once (module-scoped fixtures)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import experiment_runs, run_mlplab, store_uri

# Lightning's examples/pytorch/basics/backbone_image_classifier.py, on the 8x8 digits (64
# pixels) instead of MNIST; and modules and data of the same style for the other cases
MODULES = '''
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint


class Backbone(nn.Module):
    def __init__(self, in_features: int = 64, num_outputs: int = 10):
        super().__init__()
        self.l1 = nn.Linear(in_features, num_outputs)

    def forward(self, x):
        return self.l1(x.view(x.size(0), -1))


class LitClassifier(LightningModule):
    def __init__(self, backbone: Backbone | None = None, learning_rate: float = 0.01):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone or Backbone()

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("valid_loss", F.cross_entropy(self(x), y), on_step=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx, dataloader_idx=None):
        x, y = batch
        return self(x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


class Sentences(LightningDataModule):
    """Batches of text: nothing a network takes as it is."""

    def train_dataloader(self):
        return DataLoader([{"text": f"{i} words"} for i in range(32)], batch_size=8)


class WordCounter(LightningModule):
    """No validation step (and the data has no validation loader)."""

    def __init__(self):
        super().__init__()
        self.words = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        counts = torch.tensor([float(text.split()[0]) for text in batch["text"]])
        loss = ((self.words - counts) ** 2).mean()
        self.log("count_error", loss, on_epoch=True, on_step=False, batch_size=len(counts))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class DigitDicts(Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"y": self.y[i], "x": self.x[i]}


class DictDigitsDataModule(LightningDataModule):
    """Batches as dicts, splits built in `setup`, its own DataLoaders."""

    def __init__(self, batch_size: int = 32):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage):
        x, y = load_digits(return_X_y=True)
        self.train = DigitDicts(x[:300], y[:300])
        self.val = DigitDicts(x[300:400], y[300:400])
        self.test = DigitDicts(x[400:500], y[400:500])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=self.batch_size)


class DictClassifier(LightningModule):
    """Reads dict batches; declares its own checkpoint (Lightning's way)."""

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def step(self, batch):
        logits = self(batch["x"])
        return F.cross_entropy(logits, batch["y"]), (logits.argmax(1) == batch["y"]).float().mean()

    def training_step(self, batch, batch_idx):
        loss, _ = self.step(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self.step(batch)
        self.log_dict({"val_loss": loss, "val_acc": acc})

    def test_step(self, batch, batch_idx):
        self.log("test_acc", self.step(batch)[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def configure_callbacks(self):
        return [ModelCheckpoint(monitor="val_acc", mode="max", filename="top-{epoch}")]
'''

BORING = "lightning.pytorch.demos.boring_classes"
DIGITS = "my_project.data.DigitsDataModule"


class Fit:
    """`mlplab fit ARGS` in a folder of its own, with its store, and what it left."""

    def __init__(self, folder: Path, *args: str, experiment: str, epochs: int = 2) -> None:
        (folder / "mymodule.py").write_text(textwrap.dedent(MODULES))
        self.folder, self.uri = folder, store_uri(folder)
        self.result = self.mlplab("fit", *args, "--trainer.max_epochs", str(epochs))
        self.client, runs = experiment_runs(self.uri, experiment)
        assert len(runs) == 1, self.result.stderr[-3000:]
        self.run = runs[0]
        self.experiment_id = self.run.info.experiment_id

    def mlplab(self, *args: str):
        env = {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
        return run_mlplab(*args, cwd=self.folder, env=env)

    @property
    def checkpoints(self) -> list[str]:
        folder = next((self.folder / "mlruns").glob(f"*/{self.run.info.run_id}/checkpoints"))
        return sorted(path.name for path in folder.glob("*.ckpt"))

    def checkpoint(self, name: str) -> Path:
        return next((self.folder / "mlruns").glob(f"*/{self.run.info.run_id}/checkpoints/{name}"))

    def history(self, key: str) -> list[float]:
        points = self.client.get_metric_history(self.run.info.run_id, key)
        return [m.value for m in sorted(points, key=lambda m: m.step)]

    def logged_models(self) -> list[str]:
        found = self.client.search_logged_models(experiment_ids=[self.experiment_id])
        return sorted(m.name for m in found if m.source_run_id == self.run.info.run_id)

    def assert_finished(self) -> None:
        assert self.result.returncode == 0, self.result.stderr[-3000:]
        assert "Traceback" not in self.result.stderr, self.result.stderr[-3000:]
        assert self.run.info.status == "FINISHED"


def fit_once(tmp_path_factory, name: str, *args: str, experiment: str, epochs: int = 2) -> Fit:
    return Fit(tmp_path_factory.mktemp(name), *args, experiment=experiment, epochs=epochs)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Fit:
    """Lightning's backbone classifier on mlplab's digits, no checkpoint setting given."""
    return fit_once(tmp_path_factory, "backbone", "--model", "mymodule.LitClassifier",
                    "--data", DIGITS, "--data.n_train", "300", experiment="digits")  # fmt: skip


@pytest.fixture(scope="module")
def dicts(tmp_path_factory) -> Fit:
    return fit_once(tmp_path_factory, "dicts", "--model", "mymodule.DictClassifier",
                    "--data", "mymodule.DictDigitsDataModule",
                    "--trainer.log_every_n_steps", "5", experiment="dictdigits")  # fmt: skip


def test_boring_model_and_data_log_nothing_and_still_get_a_run_checkpoint_and_model(
    tmp_path_factory,
):
    fit = fit_once(tmp_path_factory, "boring", "--model", f"{BORING}.BoringModel",
                   "--data", f"{BORING}.BoringDataModule", experiment="boring")  # fmt: skip
    fit.assert_finished()
    # BoringModel returns its losses as dicts and logs none: no metric of its own in the run
    assert set(fit.run.data.metrics) <= {"epoch"}
    # no val/loss to rank by: Lightning's default, the latest checkpoint only
    assert fit.checkpoints == ["best-epoch=1.ckpt", "last.ckpt"]
    assert fit.logged_models() == ["model"]  # the best; both checkpoints are run artifacts
    saved = {a.path for a in fit.client.list_artifacts(fit.run.info.run_id, "checkpoints")}
    assert saved == {"checkpoints/best-epoch=1.ckpt", "checkpoints/last.ckpt"}
    assert f"mlplab: run {fit.run.info.run_id} (boring), model models:/" in fit.result.stdout


def test_manual_optimisation_trains_and_is_checkpointed(tmp_path_factory):
    fit = fit_once(tmp_path_factory, "manual", "--model", f"{BORING}.ManualOptimBoringModel",
                   "--data", f"{BORING}.BoringDataModule", experiment="boring")  # fmt: skip
    fit.assert_finished()
    assert fit.checkpoints == ["best-epoch=1.ckpt", "last.ckpt"]
    state = torch.load(fit.checkpoint("best-epoch=1.ckpt"), weights_only=True)
    assert state["global_step"] == 2 * 64  # one manual optimiser step per batch, 64 an epoch
    assert "model" in fit.logged_models()


def test_a_module_with_its_own_metric_names_trains_keeps_the_latest_and_logs_a_model(backbone):
    backbone.assert_finished()
    metrics = backbone.run.data.metrics
    assert {"train_loss_epoch", "valid_loss_epoch"} <= set(metrics)
    assert not any(k.startswith("test") for k in metrics)  # the digits have no test split
    # it logs no val/loss: no monitor, the latest checkpoint is the best
    assert backbone.checkpoints == ["best-epoch=1.ckpt", "last.ckpt"]
    state = torch.load(backbone.checkpoint("best-epoch=1.ckpt"), weights_only=False)
    (kept,) = [v for k, v in state["callbacks"].items() if k.startswith("Checkpoint{")]
    assert kept["monitor"] is None and kept["best_model_path"].endswith("best-epoch=1.ckpt")
    assert backbone.logged_models() == ["model"]
    assert "valid_loss=" in backbone.result.stdout and "train_loss=" in backbone.result.stdout


def test_a_checkpoint_of_such_a_module_validates_with_no_config(backbone):
    result = backbone.mlplab("validate", "--ckpt_path", str(backbone.checkpoint("best-*.ckpt")),
                             "--weights_only", "false")  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "valid_loss" in result.stdout


def test_the_monitor_given_keeps_the_lowest_of_the_modules_own_metric(tmp_path_factory):
    # 20 training images and a high rate: the validation loss goes up and down (seed 0)
    fit = fit_once(tmp_path_factory, "monitored", "--model", "mymodule.LitClassifier",
                   "--data", DIGITS, "--data.n_train", "20", "--model.learning_rate", "0.5",
                   "--checkpoint.monitor", "valid_loss", experiment="digits", epochs=4)  # fmt: skip
    fit.assert_finished()
    losses = fit.history("valid_loss_epoch")
    assert len(losses) == 4
    best = losses.index(min(losses))
    assert best < 3, f"the latest is the best here: {losses}"  # else nothing is told apart
    assert fit.checkpoints == [f"best-epoch={best}.ckpt", "last.ckpt"]
    state = torch.load(fit.checkpoint(f"best-epoch={best}.ckpt"), weights_only=False)
    kept = [v for k, v in state["callbacks"].items() if k.startswith("Checkpoint{")]
    assert float(kept[0]["best_model_score"]) == pytest.approx(min(losses), rel=1e-5)


def test_a_monitor_the_module_never_logs_is_one_line_naming_what_it_logs(tmp_path_factory):
    fit = fit_once(tmp_path_factory, "nope", "--model", "mymodule.LitClassifier",
                   "--data", DIGITS, "--data.n_train", "100",
                   "--checkpoint.monitor", "nope", experiment="digits")  # fmt: skip
    stderr = fit.result.stderr
    assert fit.result.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr and "MisconfigurationException" not in stderr
    said = [line for line in stderr.splitlines() if line.startswith("mlplab: error:")]
    assert len(said) == 1 and "nope" in said[0]
    assert "valid_loss" in said[0] and "train_loss" in said[0]
    assert fit.run.info.status == "FAILED"


def test_a_module_without_validation_trains_and_says_why_its_text_is_not_logged(
    tmp_path_factory,
):
    fit = fit_once(tmp_path_factory, "text", "--model", "mymodule.WordCounter",
                   "--data", "mymodule.Sentences", experiment="sentences")  # fmt: skip
    fit.assert_finished()
    errors = fit.history("count_error")
    assert len(errors) == 2 and errors[1] < errors[0]
    assert fit.checkpoints == ["best-epoch=1.ckpt", "last.ckpt"]
    why = "no tensor of inputs in a training batch (a dict of 'text')"
    assert f"mlplab: the model was not logged: {why}" in fit.result.stderr
    assert fit.logged_models() == []


def test_dict_batches_and_the_modules_own_checkpoint(dicts):
    dicts.assert_finished()
    metrics = dicts.run.data.metrics
    assert {"train_loss", "val_loss", "val_acc", "test_acc"} <= set(metrics)  # tested after fit
    accuracies = dicts.history("val_acc")
    best = max(range(len(accuracies)), key=lambda i: (accuracies[i], -i))  # the first best
    # the module's ModelCheckpoint replaces mlplab's (no best-*.ckpt); last.ckpt is kept beside
    assert dicts.checkpoints == ["last.ckpt", f"top-epoch={best}.ckpt"]
    # the test ran on the checkpoint the module's callback kept
    assert f"top-epoch={best}.ckpt" in dicts.result.stderr
    models = dicts.client.search_logged_models(experiment_ids=[dicts.experiment_id])
    model = next(m for m in models if m.name == "model")
    mlflow.set_tracking_uri(dicts.uri)
    loaded = mlflow.pyfunc.load_model(model.model_uri)
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 64)  # the "x" of a batch


def test_a_checkpoint_of_a_module_of_ones_own_tests_with_no_config(dicts):
    # `--weights_only false`: the file is trusted (mlplab.safety.trust builds classes of mlplab,
    # the packages it is built on and the project's packages only; mymodule is none of them)
    path = str(dicts.checkpoint("top-*.ckpt"))
    result = dicts.mlplab("test", "--ckpt_path", path, "--weights_only", "false")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "test_acc" in result.stdout
    _, runs = experiment_runs(dicts.uri, "dictdigits")
    tested = [run for run in runs if run.data.tags.get("mlplab.command") == "test"]
    assert tested and "test_acc" in tested[-1].data.metrics


def test_the_input_example_is_taken_from_any_form_of_batch():
    from torch.utils.data import DataLoader

    from mlplab.tracking.logged_models import input_example

    x = torch.arange(12.0).reshape(6, 2)

    class Data:
        def __init__(self, batches):
            self.batches = batches

        def train_dataloader(self):
            return self.batches

    def example(*batches):
        return input_example(Data(DataLoader(list(batches), batch_size=None)))

    assert torch.equal(example(x), x[:5])
    assert torch.equal(example((x, x.sum(1))), x[:5])
    assert torch.equal(example({"y": x.sum(1), "x": x}), x[:5])  # by name
    assert torch.equal(example({"names": ["a"] * 6, "pixels": x}), x[:5])  # the first tensor
    assert torch.equal(example(((x, x), x.sum(1))), x[:5])  # nested: the first
    assert torch.equal(example(x[:1], x[1:2], x[2:3]), x[:3])  # batches of one, joined
    assert torch.equal(input_example(Data([DataLoader(x, batch_size=4)])), x[:5])  # 4, then 2
    with pytest.raises(ValueError, match=r"no tensor of inputs.*dict of 'text', 'label'"):
        example({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match="loader is empty"):
        example()
