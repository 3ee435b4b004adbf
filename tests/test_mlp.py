import math

import pytest
import torch

from my_project.models import MLP, count_parameters


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
