"""The project's own package: its networks and tasks (loss, metrics, output) and the seed
experiments they reproduce. `mlplab new NAME` copies this file to tests/test_NAME.py."""

import math
from functools import partial

import pytest
import torch

from conftest import config, experiment_runs, fit_in_own_store, run_mlplab, store_uri
from mlplab.errors import UserError
from mlplab.serving import inference_module
from my_project.data import IrisClassificationDataModule
from my_project.models import MLP, Classifier, Regressor, count_parameters


@pytest.mark.parametrize(
    "in_features, hidden, out, kwargs, expected",
    [
        (2, [2], 1, {}, (9, 9, 0)),  # seed 001, XOR 2-2-1
        (2, [4, 4], 1, {}, (37, 37, 0)),  # seed 000, XOR 2-4-4-1
        (784, [300, 100], 10, {}, (266_610, 266_610, 0)),  # seed 002
        (
            784,
            [300, 100],
            10,
            {"batch_norm": True, "input_batch_norm": True},
            (271_346, 268_978, 2_368),  # seed 002 with batch norm, as Keras counts it
        ),
        (784, [256], 1, {}, (201_217, 201_217, 0)),  # seed 003
        (784, [500] * 4, 10, {}, (1_149_010, 1_149_010, 0)),  # seed 004
    ],
)
def test_parameter_counts_match_the_seeds_model_summary(in_features, hidden, out, kwargs, expected):
    assert count_parameters(MLP(in_features, out, hidden, **kwargs)) == expected


def test_images_are_flattened_and_outputs_have_one_column_per_unit():
    net = MLP(784, 10, [32], activation="leaky_relu", dropout=0.2, input_dropout=0.2)
    assert net(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert net(torch.rand(5, 784)).shape == (5, 10)


def test_block_order_is_linear_activation_batchnorm_dropout():
    net = MLP(4, 3, [8], activation="elu", batch_norm=True, dropout=0.5, input_batch_norm=True)
    names = [type(m).__name__ for m in net]
    assert names == ["Flatten", "BatchNorm1d", "Linear", "ELU", "BatchNorm1d", "Dropout", "Linear"]


@pytest.mark.parametrize(
    "activation", ["relu", "leaky_relu", "elu", "selu", "tanh", "sigmoid", "linear"]
)
def test_every_activation_builds_and_runs(activation):
    out = MLP(3, 2, [5], activation=activation)(torch.randn(4, 3))
    assert out.shape == (4, 2) and torch.isfinite(out).all()


def test_unknown_activation_is_named_in_the_error():
    with pytest.raises(ValueError, match="swish"):
        MLP(3, 2, [5], activation="swish")


def test_he_normal_has_keras_std_and_zero_bias():
    torch.manual_seed(0)
    layer = MLP(784, 10, [300], init="he_normal")[1]
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 784), rel=0.05)
    assert layer.weight.abs().max() <= 2 * math.sqrt(2 / 784) / 0.8796 + 1e-6  # truncated at 2 std
    assert torch.count_nonzero(layer.bias) == 0


def test_leaky_relu_slope_is_configurable():
    net = MLP(1, 1, [1], activation="leaky_relu", negative_slope=0.3)
    assert net[2].negative_slope == 0.3


def mlp(*hidden: int):
    return partial(MLP, hidden_sizes=list(hidden))


def test_binary_classifier_has_one_logit_and_sigmoid_probabilities():
    task = Classifier(mlp(4), num_features=2, num_classes=2)
    x = torch.randn(6, 2)
    assert task(x).shape == (6, 1)
    probs = inference_module(task)(x)
    assert probs.shape == (6, 1) and ((probs > 0) & (probs < 1)).all()
    loss = task.loss(task(x), torch.tensor([0, 1, 1, 0, 1, 0]))
    assert loss.ndim == 0 and loss > 0


def test_multiclass_classifier_outputs_a_softmax():
    task = Classifier(mlp(8), num_features=4, num_classes=3)
    probs = inference_module(task)(torch.randn(5, 4))
    torch.testing.assert_close(probs.sum(1), torch.ones(5))


def test_mse_classifier_has_a_linear_output_thresholded_at_one_half():
    task = Classifier(mlp(2), num_features=2, num_classes=2, loss="mse")
    logits = torch.tensor([[1.7], [0.4], [-0.3], [0.6]])
    labels, _ = task.metric_inputs(logits, torch.zeros(4, dtype=torch.long))
    assert labels.tolist() == [1, 0, 0, 1]
    assert task.loss(logits, torch.tensor([1, 0, 0, 1])).item() == pytest.approx(
        ((0.7**2) + 0.4**2 + 0.3**2 + 0.4**2) / 4
    )


def test_regressor_reports_mae_rmse_r2():
    task = Regressor(mlp(8), num_features=3, num_targets=1, loss="huber")
    assert set(task.val_metrics.keys()) == {"val/mae", "val/rmse", "val/r2"}
    assert task(torch.randn(7, 3)).shape == (7, 1)


def test_one_learning_rate_whatever_the_optimizer():
    task = Classifier(mlp(8), num_features=4, num_classes=3, lr=0.05, optimizer=torch.optim.SGD)
    optimizer = task.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.05


def test_scheduler_is_built_around_the_optimizer():
    task = Classifier(
        mlp(8),
        num_features=4,
        num_classes=3,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2),
    )
    config = task.configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "epoch"  # Lightning steps it


def test_standardisation_statistics_come_from_the_datamodule_and_travel_with_the_model():
    dm = IrisClassificationDataModule(standardize=True)
    dm.setup("fit")
    task = Classifier(mlp(8), num_features=4, num_classes=3, standardize=True)
    task.trainer = type("T", (), {"datamodule": dm})()  # the one attribute setup() reads
    task.setup("fit")
    mean, std = dm.feature_stats()
    torch.testing.assert_close(task.input_norm.mean, mean)
    assert "input_norm.std" in task.state_dict()
    x = dm.data["train"][0]
    torch.testing.assert_close(task.input_norm(x).mean(0), torch.zeros(4), atol=1e-5, rtol=0)


def test_num_classes_below_two_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        Classifier(mlp(8), num_features=4, num_classes=1)


def test_epoch_loss_is_sample_weighted_and_keeps_nan():
    from my_project.models.components import EpochMean

    mean = EpochMean()
    mean.update(torch.tensor(2.0), weight=3)  # a batch of 3 with mean loss 2
    mean.update(torch.tensor(1.0), weight=1)
    assert mean.compute().item() == 1.75
    mean.update(torch.tensor(float("nan")), weight=1)
    assert mean.compute().isnan()


def test_a_built_network_is_taken_as_it_is_and_its_width_checked_by_the_loss():
    net = torch.nn.Linear(4, 3)
    task = Classifier(net, num_features=4, num_classes=3)
    assert task.net is net and "net" not in task.hparams  # pass net= to load_from_checkpoint
    assert task(torch.randn(2, 4)).shape == (2, 3)


def test_the_perceptron_steps_and_learns_by_the_perceptron_rule():
    """Seed 004's unit: a step output; the rule moves the weights only for a wrong side or the
    boundary, by the input (learning rate 1), as scikit-learn's Perceptron does."""
    task = Classifier(mlp(), num_features=2, num_classes=2, loss="perceptron")
    steps = task.output(torch.tensor([[-1.0], [0.0], [2.0]]))
    assert torch.equal(steps, torch.tensor([[0.0], [0.0], [1.0]]))
    logits = torch.tensor([[0.0], [3.0], [-1.0]], requires_grad=True)
    task.loss(logits, torch.tensor([1, 1, 1])).backward()
    assert logits.grad.squeeze(1).tolist() == pytest.approx([-1 / 3, 0.0, -1 / 3])
    with pytest.raises(UserError, match="perceptron is binary"):
        Classifier(mlp(), num_features=4, num_classes=3, loss="perceptron")


def test_seed_004s_perceptron_classifies_every_flower(tmp_path):
    uri = fit_in_own_store(tmp_path, "--config", config("iris_setosa_perceptron"),
                           "--trainer.callbacks", "[]")  # fmt: skip
    (run,) = experiment_runs(uri, "iris_setosa_perceptron")[1]
    assert run.data.metrics["train/acc"] == 1.0 and run.data.metrics["test/acc"] == 1.0


METRICS = (
    "{f1: {class_path: torchmetrics.F1Score, init_args: {task: multiclass, num_classes: 3,"
    " average: macro}}, auroc: {class_path: torchmetrics.AUROC, init_args: {task: multiclass,"
    " num_classes: 3}}}"
)


def test_metrics_from_yaml_are_logged_per_stage_and_may_be_monitored(tmp_path):
    """Any torchmetrics class by class_path joins the task's metrics (AUROC gets the
    probabilities it needs) and the checkpoint keeps the highest val/f1."""
    uri = fit_in_own_store(tmp_path, "--config", config("iris_classification"),
                           "--trainer.max_epochs", "4", "--model.init_args.metrics", METRICS,
                           "--checkpoint.monitor", "val/f1")  # fmt: skip
    client, (run,) = experiment_runs(uri, "iris_classification")
    assert {"train/f1", "val/f1", "train/auroc", "val/auroc"} <= run.data.metrics.keys()
    assert 0.5 < run.data.metrics["val/auroc"] <= 1.0
    history = [m.value for m in client.get_metric_history(run.info.run_id, "val/f1")]
    (best,) = (tmp_path / "mlruns" / "iris_classification" / run.info.run_id / "checkpoints").glob(
        "best-*.ckpt"
    )
    saved = torch.load(best, weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if "best_model_score" in v]
    assert state["best_model_score"].item() == pytest.approx(max(history), abs=1e-6)


PLAIN_DATA = '''
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset


class Points(LightningDataModule):
    """Lightning's own kind of datamodule: DataLoaders, nothing held for figures."""

    num_features, num_classes = 2, 2

    def loader(self):
        x = torch.randn(64, 2)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)

    def train_dataloader(self):
        return self.loader()

    def val_dataloader(self):
        return self.loader()

    def test_dataloader(self):
        return self.loader()
'''


def test_figures_the_data_cannot_give_are_skipped_with_one_line(tmp_path):
    (tmp_path / "points.py").write_text(PLAIN_DATA)
    done = run_mlplab(
        "fit", "--model", "my_project.models.Classifier", "--model.net", "my_project.models.MLP",
        "--data", "points.Points", "--trainer.max_epochs", "1",
        "--trainer.callbacks+=my_project.figures.DecisionBoundary",
        "--trainer.callbacks+=my_project.figures.ConfusionMatrix",
        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": store_uri(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mlplab: no decision_boundary figure: Points holds no train split in memory" in (
        done.stderr
    )
    assert "mlplab: no confusion_matrix figure: Points holds no test split in memory" in (
        done.stderr
    )
    (run,) = experiment_runs(store_uri(tmp_path), "points")[1]
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics


def test_the_served_copy_stands_apart_from_the_trained_module():
    """What is logged and exported is a copy: training on does not move it, also where a
    strategy left a forward method on the instance (DDP does)."""
    task = Classifier(mlp(4), num_features=2, num_classes=2)
    task.forward = task.forward  # a bound method on the instance, as DDP's redirection leaves it
    served = inference_module(task)
    x = torch.randn(3, 2)
    before = served(x).clone()
    with torch.no_grad():
        for p in task.parameters():
            p.add_(1.0)
    torch.testing.assert_close(served(x), before)
