"""`--fast_path.cuda_graph` on CPU: everything around the capture. `make_graphed_callables` is
replaced by an emulator that keeps the eager forward pass and counts what a real capture would
launch; on a GPU `tests/test_gpu.py` replays real graphs."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from mlplab.speed import cuda_graph
from my_project.models import MLP, Classifier
from test_fast_path import FEATURES, assert_same_training, train


class EmulatedGraph(cuda_graph.GraphedForward):
    """Counts what a real GraphedForward would run: side-stream warm-up, captures, replays."""

    made: list[EmulatedGraph] = []

    def __init__(self, module, warmup: int = 3) -> None:
        super().__init__(module, warmup)
        self.counts = {"side stream": 0, "eager": 0, "capture": 0, "replay": 0}
        EmulatedGraph.made.append(self)

    def __call__(self, x, *args, **kwargs):
        replays = self.graphed is not None or self.calls >= self.warmup
        full = self.shape is None or x.shape == self.shape
        if self.module.training and torch.is_grad_enabled() and not (full and replays):
            self.counts["eager"] += 1
        return super().__call__(x, *args, **kwargs)

    def on_side_stream(self, x):
        self.counts["side stream"] += 1
        return self.eager(x)

    def capture(self, x) -> None:
        self.counts["capture"] += 1
        self.captured_on = cuda_graph.memory_in_use(self.module)

        def replay(x):
            self.counts["replay"] += 1
            return self.eager(x)

        self.graphed = replay


@pytest.fixture
def emulated(monkeypatch):
    EmulatedGraph.made.clear()
    monkeypatch.setattr(cuda_graph, "GraphedForward", EmulatedGraph)
    monkeypatch.setattr(cuda_graph, "blockers", lambda *args: [])
    return EmulatedGraph.made


@pytest.mark.parametrize("feature", FEATURES)
def test_replays_train_exactly_as_the_eager_fast_path(feature, emulated):
    """Same weights, global step, learning rate and metrics as eager chunks: accumulation,
    clipping, max_steps and schedulers act between replays as between eager steps."""
    trainer_options, task_options = FEATURES[feature]
    eager, eager_metrics = train(8, task_options=task_options, **trainer_options)
    graphed, graphed_metrics = train(
        8, task_options=task_options, cuda_graph=True, **trainer_options
    )
    assert_same_training(eager, graphed)
    assert graphed_metrics == pytest.approx(eager_metrics, abs=1e-6)
    (graph,) = emulated
    assert graph.counts["capture"] == 1 and graph.counts["replay"] > 0
    assert "forward" not in vars(graphed)  # the module's own forward again after the fit


def test_warm_up_then_one_capture_and_the_short_batch_eagerly(emulated):
    train(8, epochs=2, cuda_graph=True)
    (graph,) = emulated
    # 300 samples in batches of 16: 18 full batches and one of 12 an epoch; validation eager
    assert graph.counts == {"side stream": 3, "eager": 3 + 2, "capture": 1, "replay": 36 - 3}


class FreezeFirstLayer(Callback):
    """Between epochs, as a fine-tuning callback does: the first layer stops training."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            next(pl_module.net.parameters()).requires_grad_(False)


FROZEN = {"optimizer": torch.optim.Adam}  # its running means would move a zero gradient's weight


def test_a_layer_frozen_between_epochs_is_captured_again_and_stays_put(emulated):
    """A graph replays the backward pass it captured: with a parameter frozen, a new one."""
    eager, _ = train(8, epochs=3, callbacks=[FreezeFirstLayer()], task_options=FROZEN)
    graphed, _ = train(8, epochs=3, callbacks=[FreezeFirstLayer()], task_options=FROZEN,
                       cuda_graph=True)  # fmt: skip
    (graph,) = emulated
    assert graph.counts["capture"] == 2
    assert_same_training(eager, graphed)


def blocked(chunk: int = 1, chunks_off=(), **trainer_options) -> list[str]:
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, **trainer_options
    )
    task = Classifier(partial(MLP, hidden_sizes=[4]), num_features=64, num_classes=10)
    return cuda_graph.blockers(trainer, task, chunk, list(chunks_off))


@pytest.mark.parametrize(
    "options, reason",
    [
        ({}, "it needs a CUDA device and this run trains on cpu"),
        ({}, "it replays over the fast path's chunks: set data.chunk above 1"),
        (
            {"chunk": 8, "chunks_off": ["SimpleProfiler"]},
            "it replays over the fast path's chunks, which SimpleProfiler turns off",
        ),
        ({"precision": "bf16-mixed"}, "it captures 32-bit steps, not trainer.precision bf16-mixed"),
        ({"strategy": "ddp", "devices": 1}, "it runs on one device, not under DDPStrategy"),
    ],
)
def test_what_a_graph_cannot_replay_is_named(options, reason):
    assert reason in blocked(**options)


def test_no_chunks_reason_when_they_are_on():
    assert not any("chunks" in reason for reason in blocked(chunk=8))
