from functools import partial

import pytest
import torch

from conftest import config, experiment_runs, fit_in_own_store
from mlplab.errors import UserError
from my_project.data import IrisClassificationDataModule
from my_project.models import MLP, Classifier, Regressor


def mlp(*hidden: int):
    return partial(MLP, hidden_sizes=list(hidden))


def test_binary_classifier_has_one_logit_and_sigmoid_probabilities():
    task = Classifier(mlp(4), num_features=2, num_classes=2)
    x = torch.randn(6, 2)
    assert task(x).shape == (6, 1)
    probs = task.inference_module()(x)
    assert probs.shape == (6, 1) and ((probs > 0) & (probs < 1)).all()
    loss = task.loss(task(x), torch.tensor([0, 1, 1, 0, 1, 0]))
    assert loss.ndim == 0 and loss > 0


def test_multiclass_classifier_outputs_a_softmax():
    task = Classifier(mlp(8), num_features=4, num_classes=3)
    probs = task.inference_module()(torch.randn(5, 4))
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
    from my_project.models.tasks import EpochMean

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
