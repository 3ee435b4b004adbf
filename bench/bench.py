"""`make bench`: how fast mlplab trains the MNIST seed MLP, against two baselines.

Same model (784-300-100-10 LeakyReLU, he_normal, SGD 1e-3), same data (55,000 training and 5,000
validation images), batch 32, one epoch = one pass over the training split plus a validation pass:

1. plain    a hand-written PyTorch loop over in-memory tensors (the floor);
2. idiom    the usual Lightning template: torchvision's MNIST with `ToTensor` in a DataLoader;
3. mlplab   `mlplab fit --config configs/mnist.yaml` with everything a user gets by default
            (MLflow logging to SQLite, checkpoints, progress bar), and variants.

Prints the median epoch time after a warm-up epoch, and the ratios; then XOR end to end.
Usage: python bench/bench.py [--epochs N] [--data-dir DIR] [--skip-idiom]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

from mlplab.cli import MLPLabCLI  # noqa: E402
from mlplab.data import MNISTDataModule  # noqa: E402
from mlplab.models import MLP  # noqa: E402


def seed_model() -> nn.Module:
    torch.manual_seed(0)
    return MLP(784, 10, [300, 100], activation="leaky_relu", negative_slope=0.3, init="he_normal")


class EpochTimer(Callback):
    """Seconds from one training epoch's start to the next (validation and epoch-end work
    included); the last epoch ends when training does."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = time.perf_counter()

    @property
    def epochs(self) -> list[float]:
        marks = [*self.starts, self.end]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def steady(times: list[float]) -> float:
    """Median epoch time, the first (warm-up) epoch left out."""
    return statistics.median(times[1:])


def plain_loop(epochs: int, data_dir: str) -> list[float]:
    dm = MNISTDataModule(data_dir=data_dir)
    dm.setup()
    (x, y), (xv, yv) = dm.data["train"], dm.data["val"]
    model = seed_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for index in torch.randperm(len(x)).split(32):
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            (model(xv).argmax(1) == yv).float().mean().item()
        times.append(time.perf_counter() - start)
    return times


class IdiomModule(LightningModule):
    """What a Lightning tutorial writes: log the loss every step, accuracy every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = seed_model()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def lightning_idiom(epochs: int, data_dir: str) -> list[float]:
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    mnist = datasets.MNIST(data_dir, train=True, transform=transforms.ToTensor())
    train = DataLoader(Subset(mnist, range(5000, 60000)), batch_size=32, shuffle=True)
    val = DataLoader(Subset(mnist, range(5000)), batch_size=32)
    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(IdiomModule(), train, val)
    return timer.epochs


class BackwardListener(Callback):
    """Any callback with a backward hook: mlplab then steps through Lightning's wrappers
    (`manual_backward`, `LightningOptimizer.step`), as it does under DDP or mixed precision."""

    def on_after_backward(self, trainer, pl_module) -> None:
        pass


def mlplab_fit(
    epochs: int, data_dir: str, store: str, *extra: str, wrapped: bool = False
) -> list[float]:
    timer = EpochTimer()

    class TimedCLI(MLPLabCLI):
        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.extend([timer, BackwardListener()] if wrapped else [timer])
            return trainer

    args = [
        "fit", "--config", f"{ROOT}/configs/mnist.yaml", "--trainer.max_epochs", str(epochs),
        "--data.data_dir", data_dir, "--tracking_uri", store, "--test_after_fit", "false", *extra,
    ]  # fmt: skip
    TimedCLI(args=args)
    return timer.epochs


def xor_end_to_end(store: str, repeats: int = 3) -> tuple[float, float]:
    """Median wall time of `mlplab fit --config configs/xor.yaml`, and of importing the CLI."""

    def wall(cmd: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        return time.perf_counter() - start

    python = sys.executable
    fit = [python, "-m", "mlplab", "fit", "--config", "configs/xor.yaml", "--tracking_uri", store]
    imports = [python, "-c", "import mlplab.cli"]
    return (
        statistics.median(wall(fit) for _ in range(repeats)),
        statistics.median(wall(imports) for _ in range(repeats)),
    )


def thread_study(data_dir: str, epochs: int = 3) -> dict[str, float]:
    """The plain loop with 1 and 2 torch threads, on an idle machine and with the other core
    kept busy by a spinning process (as when a second job, or the OS, wants a core)."""
    results = {}
    for busy in (False, True):
        spinner = None
        if busy:
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                state = "other core busy" if busy else "idle"
                results[f"{threads} thread(s), {state}"] = steady(plain_loop(epochs, data_dir))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    torch.set_num_threads(1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs per contender")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MLPLAB_DATA_DIR", str(ROOT.parent / "shared" / "datasets")),
    )
    parser.add_argument("--skip-idiom", action="store_true", help="leave out the slow idiom run")
    parser.add_argument("--skip-threads", action="store_true", help="leave out the thread study")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same for every contender; mlplab's default
    tmp = tempfile.mkdtemp(prefix="mlplab-bench-")
    store = f"sqlite:///{tmp}/mlflow.db"

    # Interleaved rounds, so that a slow spell of this shared machine hits every contender.
    epochs: dict[str, list[float]] = {}
    contenders = {
        "plain PyTorch loop": lambda: plain_loop(args.epochs, args.data_dir),
        "mlplab fit (defaults)": lambda: mlplab_fit(args.epochs, args.data_dir, store),
        "mlplab fit, no MLflow logger": lambda: mlplab_fit(
            args.epochs, args.data_dir, store, "--trainer.logger", "false"
        ),
        "mlplab fit, Lightning-wrapped steps": lambda: mlplab_fit(
            args.epochs, args.data_dir, store, wrapped=True
        ),
        "mlplab fit, fused SGD": lambda: mlplab_fit(
            args.epochs, args.data_dir, store, "--model.optimizer.fused", "true"
        ),
    }
    for _ in range(args.rounds):
        for name, run in contenders.items():
            epochs.setdefault(name, []).extend(run()[1:])  # each run's first epoch is warm-up
    if not args.skip_idiom:
        epochs["Lightning + torchvision DataLoader"] = lightning_idiom(args.epochs, args.data_dir)[
            1:
        ]
    results = {name: statistics.median(times) for name, times in epochs.items()}
    plain = results["plain PyTorch loop"]
    print("\nMNIST seed MLP, batch 32, epoch = 55,000 train + 5,000 val images;")
    print(f"median of epochs 2..{args.epochs} of {args.rounds} interleaved runs, 1 torch thread")
    print(f"{'':40} {'s/epoch':>8} {'vs plain':>9}")
    for name, seconds in results.items():
        print(f"{name:40} {seconds:8.2f} {seconds / plain:8.2f}x")
    if "Lightning + torchvision DataLoader" in results:
        ratio = results["Lightning + torchvision DataLoader"] / results["mlplab fit (defaults)"]
        print(f"mlplab is {ratio:.1f}x faster per epoch than the torchvision-DataLoader idiom")
    logging_cost = results["mlplab fit (defaults)"] - results["mlplab fit, no MLflow logger"]
    print(f"MLflow logging costs {logging_cost * 1000:+.0f} ms per epoch")
    if not args.skip_threads:
        print("\nThread policy, plain loop (s/epoch):")
        for label, seconds in thread_study(args.data_dir).items():
            print(f"  {label:30} {seconds:6.2f}")
    fit, imports = xor_end_to_end(store)
    print(f"\nXOR end to end (mlplab fit --config configs/xor.yaml): {fit:.1f} s")
    print(f"of which importing the CLI (torch, Lightning, torchmetrics): {imports:.1f} s")


if __name__ == "__main__":
    main()
