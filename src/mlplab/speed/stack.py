"""Many small networks of one architecture trained as one: their parameters stacked along a
leading trial dimension, the forward pass vmapped (`torch.func`), and each optimiser's update
written once over the stack with every trial's own settings (learning rate, momentum, betas,
eps, weight decay, ...). The update is torch.optim's single-tensor one (the CPU default) term
for term, so a stacked trial's weights equal its own run's to float32 rounding.

    stack = Stack([make_net(seed) for seed in seeds])
    optimizer = StackedOptimizer(stack, "torch.optim.Adam", [{"lr": 0.01}, {"lr": 0.02}])
    loss = per_trial_losses(stack(x), y).sum()  # trials are independent: each gets its gradient
    loss.backward(); optimizer.step(); optimizer.zero_grad()

Exact for networks without random layers: batch norm normalises each trial's batch by its own
statistics and keeps each trial's running statistics (updated in place under vmap). Dropout
is stacked, each trial with masks of its own drawn from the
stack's one random stream (vmap's `randomness="different"`): not the masks its own run would
draw, so such a trial ends as its run would in distribution, not to float32 rounding
(`Stack.random` says so). Other buffers (a fixed input standardisation) are shared: the first
network's serve all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

# the optimisers stacked exactly, with their settings' torch.optim defaults
DEFAULTS = {
    "torch.optim.SGD": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                        "nesterov": False},
    "torch.optim.Adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "torch.optim.AdamW": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
    "torch.optim.RMSprop": {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0,
                            "momentum": 0.0, "centered": False},
    "torch.optim.Adagrad": {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0,
                            "initial_accumulator_value": 0.0, "eps": 1e-10},
}  # fmt: skip
# settings that change the update's form, not its numbers: one value for the whole stack
SHARED = ("nesterov", "centered")
# layers that draw a random mask each step: a stacked trial's masks are its own, not its run's
RANDOM = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
          nn.FeatureAlphaDropout)  # fmt: skip


def draws_masks(module: nn.Module) -> bool:
    """Whether the network has layers that draw random masks (`RANDOM`)."""
    return any(isinstance(m, RANDOM) for m in module.modules())


def architecture(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The trials at `index` (the leading dimension), in `tensor`'s own memory layout."""
    kept = torch.empty_like(tensor[: len(index)])  # a slice of the leading dimension: its strides
    return kept.copy_(tensor[index.to(tensor.device)])


class Stack(nn.Module):
    """N networks as one module: `forward(x)` takes (N, B, F) per-trial inputs (or (B, F)
    shared by all) and answers (N, B, ...). `trial(i)` is trial i's own `state_dict`."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        if not modules:
            raise ValueError("a stack needs at least one network")
        shape = architecture(modules[0])
        for i, module in enumerate(modules[1:], 1):
            if architecture(module) != shape:
                differ = sorted(set(architecture(module).items()) ^ set(shape.items()))
                raise ValueError(f"trial {i} is another architecture than trial 0: "
                                 f"{', '.join(name for name, _ in differ)}")  # fmt: skip
        # dropout: each trial's masks its own, drawn from one stream (not its run's)
        self.random = draws_masks(modules[0])
        self.randomness = "different" if self.random else "error"
        params, buffers = stack_module_state(list(modules))
        self.names = list(params)
        self.weights = nn.ParameterList(nn.Parameter(params[name]) for name in self.names)
        # running statistics (batch norm's): each trial's own, updated in place under vmap
        self.running_names = [
            f"{prefix}.{name}" if prefix else name
            for prefix, module in modules[0].named_modules()
            if getattr(module, "track_running_stats", False)
            for name, _ in module.named_buffers(recurse=False)
        ]
        self.running = [buffers[name] for name in self.running_names]
        self.bases = (modules[0],)  # the architecture and shared buffers (not a submodule)
        self.size = len(modules)

    def state(self) -> dict[str, torch.Tensor]:
        """Every trial's weights and running statistics, stacked, by name (`functional_call`'s)."""
        return {**dict(zip(self.names, self.weights, strict=True)),
                **dict(zip(self.running_names, self.running, strict=True))}  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def one(state: dict, inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(self.bases[0], state, (inputs,))

        shared = x.dim() < 3 or x.shape[0] != self.size
        return vmap(one, in_dims=(0, None if shared else 0), randomness=self.randomness)(
            self.state(), x
        )

    def lay_out(self, strides: list[tuple[int, ...]]) -> None:
        """Each weight in memory with these strides (its gradient's), values unchanged."""
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty_strided(w.shape, stride, dtype=w.dtype, device=w.device)
                         .copy_(w.detach()))
            for w, stride in zip(self.weights, strides, strict=True)
        )  # fmt: skip

    def keep(self, index: torch.Tensor) -> None:
        """Only the trials at `index` stay (pruned mates leave the stack), each weight in its
        memory layout."""
        self.weights = nn.ParameterList(nn.Parameter(rows(w.detach(), index))
                                        for w in self.weights)  # fmt: skip
        self.running = [rows(b, index) for b in self.running]
        self.size = len(index)

    def trial(self, i: int) -> dict[str, torch.Tensor]:
        """Trial `i`'s weights and running statistics, as in its own network's `state_dict`."""
        return {name: w[i].detach().clone() for name, w in self.state().items()}


class StackedOptimizer:
    """`optimizer` (a class path in `DEFAULTS`) over a `Stack`, each trial with its own
    settings (`per_trial[i]`, the class's keyword arguments; missing ones take torch's
    defaults). Settings in `SHARED` must agree across the stack."""

    def __init__(self, stack: Stack, optimizer: str, per_trial: Sequence[dict]) -> None:
        if optimizer not in DEFAULTS:
            raise ValueError(f"{optimizer} cannot be stacked; these can: {', '.join(DEFAULTS)}")
        if len(per_trial) != stack.size:
            raise ValueError(f"{len(per_trial)} trials' settings for a stack of {stack.size}")
        unknown = sorted({k for s in per_trial for k in s} - set(DEFAULTS[optimizer]))
        if unknown:
            raise ValueError(f"{optimizer}: {', '.join(unknown)} cannot be stacked")
        settings = [{**DEFAULTS[optimizer], **s} for s in per_trial]
        for key in SHARED:
            if len({s.get(key) for s in settings}) > 1:
                raise ValueError(f"{optimizer}: {key} differs within the stack; stack apart")
        self.kind, self.stack, self.settings = optimizer.rsplit(".", 1)[1], stack, settings
        self.values: dict[tuple, torch.Tensor] = {}  # `value`'s, until the stack changes
        self.steps = 0
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in stack.weights]

    def keep(self, positions: list[int]) -> None:
        """Only the trials at `positions` stay: their settings and their rows of the state
        (call with the stack's own `keep`)."""
        index = torch.tensor(positions)
        self.settings = [self.settings[i] for i in positions]
        self.values.clear()
        self.state = [{k: rows(v, index) for k, v in state.items()} for state in self.state]

    def trial(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """Trial `i`'s optimiser state, by weight name (what `Stack.trial` is to weights)."""
        return {name: {key: value[i].detach().clone() for key, value in state.items()}
                for name, state in zip(self.stack.names, self.state, strict=True)}  # fmt: skip

    def value(self, key: str, like: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """Each trial's setting `key` (element `index` of a tuple) shaped to broadcast over
        a stacked parameter like `like` (made once, until the stack changes)."""
        cached = (key, index, like.dim(), like.dtype, like.device)
        if cached not in self.values:
            self.values[cached] = self.per_trial(
                [s[key] if index is None else s[key][index] for s in self.settings], like
            )
        return self.values[cached]

    def per_trial(self, values: list[float], like: torch.Tensor) -> torch.Tensor:
        """One value per trial, shaped to broadcast over a stacked parameter like `like`."""
        shape = (len(values),) + (1,) * (like.dim() - 1)
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)

    def zero_grad(self) -> None:
        for weight in self.stack.weights:
            weight.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for weight, state in zip(self.stack.weights, self.state, strict=True):
            if weight.grad is not None:
                getattr(self, self.kind.lower())(weight, weight.grad, state)

    def decayed(self, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The gradient with L2 weight decay added, as torch.optim adds it."""
        if all(s["weight_decay"] == 0 for s in self.settings):
            return g
        return g.add(p * self.value("weight_decay", p))

    def sgd(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        g = self.decayed(p, g)
        if any(s["momentum"] != 0 for s in self.settings):
            momentum = self.value("momentum", p)
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = g.detach().clone()
            else:
                kept = [1 - s["dampening"] if s["momentum"] else 1.0 for s in self.settings]
                state["momentum_buffer"].mul_(momentum).add_(g * self.per_trial(kept, p))
            buf = state["momentum_buffer"]
            g = g.add(buf * momentum) if self.settings[0]["nesterov"] else buf
        p.addcmul_(g, self.value("lr", p), value=-1)

    def adam(self, p: torch.Tensor, g: torch.Tensor, state: dict, decoupled: bool = False) -> None:
        if decoupled:
            p.mul_(self.per_trial([1 - s["lr"] * s["weight_decay"] for s in self.settings], p))
        else:
            g = self.decayed(p, g)
        if not state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        beta1, beta2 = self.value("betas", p, 0), self.value("betas", p, 1)
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g * (1 - beta2))
        step_size = self.per_trial(
            [s["lr"] / (1 - s["betas"][0] ** self.steps) for s in self.settings], p
        )
        correction = self.per_trial(
            [math.sqrt(1 - s["betas"][1] ** self.steps) for s in self.settings], p
        )
        denom = (state["exp_avg_sq"].sqrt() / correction).add_(self.value("eps", p))
        p.sub_(state["exp_avg"] / denom * step_size)  # addcdiv's order of rounding

    def adamw(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        self.adam(p, g, state, decoupled=True)

    def rmsprop(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        g = self.decayed(p, g)
        if not state:
            state["square_avg"] = torch.zeros_like(p)
            state["grad_avg"] = torch.zeros_like(p)
            state["momentum_buffer"] = torch.zeros_like(p)
        alpha = self.value("alpha", p)
        state["square_avg"].mul_(alpha).addcmul_(g, g * (1 - alpha))
        if self.settings[0]["centered"]:
            state["grad_avg"].lerp_(g, 1 - alpha)
            avg = state["square_avg"].addcmul(state["grad_avg"], state["grad_avg"], value=-1)
            avg = avg.sqrt_().add_(self.value("eps", p))
        else:
            avg = state["square_avg"].sqrt().add_(self.value("eps", p))
        if any(s["momentum"] > 0 for s in self.settings):
            buf = state["momentum_buffer"]
            buf.mul_(self.value("momentum", p)).add_(g / avg)
            p.sub_(self.value("lr", p) * buf)
        else:
            p.sub_(g / avg * self.value("lr", p))

    def adagrad(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        if not state:
            state["sum"] = self.value("initial_accumulator_value", p).expand_as(p).clone()
        g = self.decayed(p, g)
        clr = self.per_trial(
            [s["lr"] / (1 + (self.steps - 1) * s["lr_decay"]) for s in self.settings], p
        )
        state["sum"].addcmul_(g, g)
        std = state["sum"].sqrt().add_(self.value("eps", p))
        p.sub_(g / std * clr)
