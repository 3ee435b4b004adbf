"""The benchmark's harness: each contender epoch is paired with the plain epoch just before it."""

from __future__ import annotations

import importlib.util
import time
from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer

from conftest import ROOT
from my_project.data import XORDataModule
from my_project.models import MLP, Classifier

spec = importlib.util.spec_from_file_location("bench", ROOT / "bench" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


class SleepyPlain:
    """Stands in for the plain loop: a known epoch time, and a count of its epochs."""

    def __init__(self) -> None:
        self.epochs = 0

    def epoch(self) -> float:
        self.epochs += 1
        time.sleep(0.05)
        return 0.05


def test_every_contender_epoch_is_paired_with_a_plain_epoch_just_before_it():
    plain = SleepyPlain()
    timer = bench.PairedEpochs(plain)
    task = Classifier(partial(MLP, hidden_sizes=[4]), num_features=2, num_classes=2)
    trainer = Trainer(
        max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(task, XORDataModule(batch_size=1))
    assert plain.epochs == 4 and len(timer.pairs) == 4
    # the plain epoch's own time is not counted in the contender's
    assert all(0 < contender < 1.0 for _, contender in timer.pairs)
    base, seconds, ratio, low, high = bench.summary(timer.pairs)
    assert base == pytest.approx(0.05) and low <= ratio <= high
    assert ratio == pytest.approx(seconds / base, rel=0.5)


def test_plain_loop_leaves_the_global_random_stream_alone():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    bench.seed_model()
    assert torch.equal(torch.rand(3), expected)
