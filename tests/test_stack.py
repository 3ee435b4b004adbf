"""Stacked trials (`mlplab.speed.stack`): N networks trained as one end where each trial's own
run ends, to float32 rounding, for every optimiser it stacks, with settings mixed in a stack."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from mlplab.speed.stack import Stack, StackedOptimizer


def net(seed: int, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def optimizer_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


CASES = {
    "SGD": ("torch.optim.SGD", [{"lr": 0.1}, {"lr": 0.05}, {"lr": 0.3}]),
    "SGD momentum": ("torch.optim.SGD", [{"lr": 0.1, "momentum": 0.9},
                     {"lr": 0.05, "momentum": 0.5, "dampening": 0.1},
                     {"lr": 0.02, "dampening": 0.3, "weight_decay": 1e-2}]),
    "Nesterov": ("torch.optim.SGD", [{"lr": 0.05, "momentum": 0.9, "nesterov": True},
                 {"lr": 0.1, "momentum": 0.7, "nesterov": True, "weight_decay": 1e-3}]),
    "Adam": ("torch.optim.Adam", [{"lr": 0.01}, {"lr": 0.003, "betas": (0.8, 0.99)},
             {"lr": 0.02, "eps": 1e-6, "weight_decay": 1e-2}]),
    "AdamW": ("torch.optim.AdamW", [{"lr": 0.01}, {"lr": 0.005, "weight_decay": 0.1}]),
    "RMSprop": ("torch.optim.RMSprop", [{"lr": 0.01}, {"lr": 0.005, "alpha": 0.9, "momentum": 0.5},
                {"lr": 0.002, "weight_decay": 1e-3, "eps": 1e-6}]),
    "RMSprop centered": ("torch.optim.RMSprop", [{"lr": 0.01, "centered": True},
                         {"lr": 0.003, "centered": True, "momentum": 0.9}]),
    "Adagrad": ("torch.optim.Adagrad", [{"lr": 0.1}, {"lr": 0.05, "lr_decay": 0.01},
                {"lr": 0.2, "initial_accumulator_value": 0.1, "weight_decay": 1e-3}]),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_stacked_trial_ends_where_its_own_run_ends(case):
    path, settings = CASES[case]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    y = torch.randint(0, 3, (32,), generator=generator)
    alone = [net(seed) for seed in range(len(settings))]
    stack = Stack([net(seed) for seed in range(len(settings))])
    stacked = StackedOptimizer(stack, path, settings)
    optimizers = [optimizer_class(path)(m.parameters(), **s) for m, s in zip(alone, settings,
                                                                             strict=True)]
    for _ in range(40):
        outputs = stack(x)  # (trials, batch, classes)
        loss = sum(nn.functional.cross_entropy(out, y) for out in outputs)
        loss.backward()
        stacked.step()
        stacked.zero_grad()
        for model, optimizer in zip(alone, optimizers, strict=True):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    moved = 0.0
    for i, model in enumerate(alone):
        mine = stack.trial(i)
        for name, weight in model.state_dict().items():
            torch.testing.assert_close(mine[name], weight, rtol=0, atol=1e-5)
            moved = max(moved, (weight - net(i).state_dict()[name]).abs().max().item())
    assert moved > 1e-2  # the trials trained: their weights are not where they began


def test_per_trial_inputs_and_what_cannot_be_stacked():
    stack = Stack([net(0), net(1)])
    x = torch.randn(2, 5, 4)
    out = stack(x)
    assert out.shape == (2, 5, 3)
    torch.testing.assert_close(out[1], net(1)(x[1]))
    with pytest.raises(ValueError, match="trial 1 is another architecture than trial 0: 0.bias"):
        Stack([net(0), net(1, hidden=9)])
    with pytest.raises(ValueError, match="nesterov differs within the stack"):
        StackedOptimizer(stack, "torch.optim.SGD", [{"momentum": 0.9, "nesterov": True},
                                                    {"momentum": 0.9}])  # fmt: skip
    with pytest.raises(ValueError, match="torch.optim.LBFGS cannot be stacked"):
        StackedOptimizer(stack, "torch.optim.LBFGS", [{}, {}])


def test_dropout_draws_each_trials_masks_and_is_off_in_eval():
    same = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5))
    stack = Stack([same, same])
    assert stack.random
    x = torch.randn(5, 4)
    torch.manual_seed(0)
    out = stack(x)
    zeros = out == 0
    assert zeros.float().mean().item() == pytest.approx(0.5, abs=0.1)  # masks drawn
    assert not torch.equal(zeros[0], zeros[1])  # each trial its own
    same.eval()  # the base network's mode rules the stack's (`functional_call`)
    torch.testing.assert_close(stack(x)[1], same(x))


def test_batch_norm_keeps_each_trials_statistics():
    nets = [nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)) for _ in range(2)]
    for i, one in enumerate(nets):
        torch.manual_seed(i)
        one[0].reset_parameters()
    stack = Stack(nets)
    x = torch.randn(2, 8, 4)
    out = stack(x)  # training mode: each trial's batch, normalised by its own statistics
    for i, one in enumerate(nets):
        torch.testing.assert_close(out[i], one(x[i]))  # and the nets' own running statistics
        torch.testing.assert_close(stack.trial(i)["1.running_mean"], one[1].running_mean)
    assert stack.trial(0)["1.num_batches_tracked"] == 1
