"""`make bench`: how fast mlplab trains the MNIST seed MLP, against two baselines.

Same model (784-300-100-10 LeakyReLU, he_normal, SGD 1e-3), same data (55,000 training and 5,000
validation images), batch 32, one epoch = one pass over the training split plus a validation pass:

1. plain    a hand-written PyTorch loop over in-memory tensors (the floor);
2. idiom    the usual Lightning template: torchvision's MNIST with `ToTensor` in a DataLoader;
3. mlplab   `mlplab fit --config configs/mnist.yaml` with everything a user gets by default
            (MLflow logging to SQLite, checkpoints, progress bar): the fast path (`data.chunk:
            32`, 32 batches per Lightning step); the same with `--data.chunk 1`, the idiomatic
            path (Lightning's automatic optimisation, one batch per step); and variants.

This shared machine's speed drifts by 30-40 % within an hour, so every contender epoch is timed
right after an epoch of the plain loop in the same process and compared with it: the ratios hold
where the seconds do not. Prints, after a warm-up epoch, the median seconds and ratios; the
MLflow write cost; the plain loop's own levers (fused SGD, torch.compile); the thread policy;
and XOR end to end.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

from mlplab.cli import MLPLabCLI  # noqa: E402
from my_project.data import MNISTDataModule  # noqa: E402
from my_project.models import MLP  # noqa: E402


def seed_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # leaves the contender's random stream alone
        torch.manual_seed(0)
        return MLP(
            784, 10, [300, 100], activation="leaky_relu", negative_slope=0.3, init="he_normal"
        )


class PlainLoop:
    """The floor: a hand-written loop over in-memory tensors, with its own model, optimiser and
    random generator, so that it can run between another contender's epochs without touching
    them. `compiled` wraps the model ("model") or also the optimiser step ("step") in
    `torch.compile`. On a GPU the data and model live on the device."""

    def __init__(
        self, data_dir: str, fused: bool = False, compiled: str | None = None, device: str = "cpu"
    ) -> None:
        dm = MNISTDataModule(data_dir=data_dir)
        dm.setup()
        self.device = torch.device(device)
        (self.x, self.y), (self.xv, self.yv) = (
            tuple(t.to(self.device) for t in dm.data[split]) for split in ("train", "val")
        )
        self.model = seed_model().to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, fused=fused or None)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.step = self.optimizer.step
        if compiled == "step":
            self.step = torch.compile(self.step)
        self.generator = torch.Generator().manual_seed(0)

    def epoch(self) -> float:
        """Seconds for one pass over the training split plus a validation pass."""
        start = time.perf_counter()
        self.model.train()
        order = torch.randperm(len(self.x), generator=self.generator).to(self.device)
        for index in order.split(32):
            loss = nn.functional.cross_entropy(self.forward(self.x[index]), self.y[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.step()
        self.model.eval()
        with torch.no_grad():
            (self.model(self.xv).argmax(1) == self.yv).float().mean().item()
        return time.perf_counter() - start


def synchronize() -> None:
    """Wait for the GPU's queued work, so that an epoch's time includes it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PairedEpochs(Callback):
    """Times a contender's epochs, each right after one epoch of the plain loop run in the same
    process on the same data: a slow spell of this shared machine hits both sides of a ratio.

    An epoch runs from one `on_train_epoch_start` to the next (validation, checkpoints and
    logging included); the last ends with training.
    """

    def __init__(self, plain: PlainLoop) -> None:
        self.plain = plain
        self.pairs: list[tuple[float, float]] = []  # (plain, contender) seconds
        self._plain_seconds, self._start = 0.0, None

    def _close(self) -> None:
        synchronize()
        if self._start is not None:
            self.pairs.append((self._plain_seconds, time.perf_counter() - self._start))
            self._start = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._close()
        self._plain_seconds = self.plain.epoch()
        synchronize()
        self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()


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


def unpacked(data_dir: str) -> str:
    """torchvision reads MNIST's IDX files only unpacked: a gzipped copy (as `make gpu-carry`
    writes it) is unpacked into a temporary folder."""
    raw = Path(data_dir) / "MNIST" / "raw"
    if (raw / "train-images-idx3-ubyte").exists() or not any(raw.glob("*-ubyte.gz")):
        return data_dir
    folder = Path(tempfile.mkdtemp(prefix="mlplab-mnist-"))
    (folder / "MNIST" / "raw").mkdir(parents=True)
    for packed in raw.glob("*-ubyte.gz"):
        (folder / "MNIST" / "raw" / packed.stem).write_bytes(gzip.decompress(packed.read_bytes()))
    return str(folder)


def lightning_idiom(
    epochs: int, data_dir: str, plain: PlainLoop, accelerator: str = "cpu"
) -> list[tuple[float, float]]:
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    mnist = datasets.MNIST(unpacked(data_dir), train=True, transform=transforms.ToTensor())
    train = DataLoader(Subset(mnist, range(5000, 60000)), batch_size=32, shuffle=True)
    val = DataLoader(Subset(mnist, range(5000)), batch_size=32)
    timer = PairedEpochs(plain)
    trainer = Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
        accelerator=accelerator, devices=1,
    )  # fmt: skip
    trainer.fit(IdiomModule(), train, val)
    return timer.pairs


class Stopwatch:
    """Seconds spent in a callable, summed over its calls."""

    def __init__(self, function) -> None:
        self.function, self.seconds = function, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def mlplab_fit(
    epochs: int, data_dir: str, store: str, plain: PlainLoop, *extra: str
) -> dict:
    """`mlplab fit --config configs/mnist.yaml`, each epoch paired with a plain one; also the
    time spent writing metrics to MLflow and in the end-of-fit model logging."""
    timer = PairedEpochs(plain)
    seen: dict = {}

    class TimedCLI(MLPLabCLI):
        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.append(timer)
            if trainer.logger is not None:
                seen["metric logging"] = trainer.logger.log_metrics = Stopwatch(
                    trainer.logger.log_metrics
                )
            return trainer

        def after_fit(self) -> None:
            seen["val/acc"] = float(self.trainer.callback_metrics["val/acc"])
            start = time.perf_counter()
            super().after_fit()
            seen["after fit"] = time.perf_counter() - start

    # No model summary: the table prints once, before any timed epoch, and only clutters the report.
    args = [
        "fit", "--config", f"{ROOT}/configs/mnist.yaml", "--trainer.max_epochs", str(epochs),
        "--data.data_dir", data_dir, "--tracking_uri", store, "--test_after_fit", "false",
        "--trainer.enable_model_summary", "false", *extra,
    ]  # fmt: skip
    TimedCLI(args=args)
    return {"pairs": timer.pairs, **seen}


def stretch_study(data_dir: str, epochs: int) -> dict[str, tuple[float, list[float]]]:
    """The plain loop's own levers, each against the plain loop epoch by epoch: a fused SGD
    kernel, and `torch.compile` of the model (and of the optimiser step). Returns, per variant,
    its first-epoch time (compilation included) and its per-epoch ratios."""
    plain = PlainLoop(data_dir)
    plain.epoch()
    results = {}
    for name, variant in {
        "fused SGD": PlainLoop(data_dir, fused=True),
        "torch.compile(model)": PlainLoop(data_dir, compiled="model"),
        "torch.compile(model and optimizer.step)": PlainLoop(data_dir, compiled="step"),
    }.items():
        first = variant.epoch()
        ratios = []
        for _ in range(epochs - 1):
            base = plain.epoch()
            ratios.append(variant.epoch() / base)
        results[name] = (first, ratios)
    return results


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
    plain = PlainLoop(data_dir)
    for busy in (False, True):
        spinner = None
        if busy:
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                state = "other core busy" if busy else "idle"
                times = [plain.epoch() for _ in range(epochs)]
                results[f"{threads} thread(s), {state}"] = statistics.median(times[1:])
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    torch.set_num_threads(1)
    return results


def summary(pairs: list[tuple[float, float]]) -> tuple[float, float, float, float, float]:
    """Median plain and contender seconds, and the median, lowest and highest ratio of a
    contender epoch to the plain epoch just before it; the first (warm-up) pair left out."""
    pairs = pairs[1:]
    ratios = [contender / plain for plain, contender in pairs]
    return (
        statistics.median(p for p, _ in pairs),
        statistics.median(c for _, c in pairs),
        statistics.median(ratios),
        min(ratios),
        max(ratios),
    )


def quiet_libraries() -> None:
    """Lightning's and torch's notes would interleave with the report."""
    for name in ("lightning.pytorch", "pytorch_lightning", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger(f"{name}.utilities.rank_zero").setLevel(logging.ERROR)


def parser_for(description: str) -> argparse.ArgumentParser:
    """The options every benchmark of this folder takes."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5, help="per run; the first is warm-up")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MLPLAB_DATA_DIR", str(ROOT.parent / "shared" / "datasets")),
    )
    parser.add_argument("--skip-idiom", action="store_true", help="leave out the slow idiom run")
    return parser


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--skip-threads", action="store_true", help="leave out the thread study")
    parser.add_argument(
        "--skip-stretch", action="store_true", help="leave out the plain loop's own levers"
    )
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI runs below get their own arguments
    warnings.filterwarnings("ignore")
    quiet_libraries()
    if args.epochs < 3:
        parser.error("--epochs must be at least 3: the first is warm-up")
    torch.set_num_threads(1)  # the same for every contender; mlplab's default
    tmp = tempfile.mkdtemp(prefix="mlplab-bench-")
    store = f"sqlite:///{tmp}/mlflow.db"
    plain = PlainLoop(args.data_dir)

    runs = {
        "mlplab fit (defaults)": mlplab_fit(args.epochs, args.data_dir, store, plain),
        "mlplab fit, idiomatic path (--data.chunk 1)": mlplab_fit(
            args.epochs, args.data_dir, store, plain, "--data.chunk", "1"
        ),
        "mlplab fit, --model.optimizer.fused true": mlplab_fit(
            args.epochs, args.data_dir, store, plain, "--model.optimizer.fused", "true"
        ),
        # the defaults sample system metrics every second: what that costs an epoch
        "mlplab fit, --log_system_metrics false": mlplab_fit(
            args.epochs, args.data_dir, store, plain, "--log_system_metrics", "false"
        ),
    }
    pairs = {name: run["pairs"] for name, run in runs.items()}
    if not args.skip_idiom:
        pairs["Lightning + torchvision DataLoader"] = lightning_idiom(
            args.epochs, args.data_dir, plain
        )
    rows = {name: summary(p) for name, p in pairs.items()}

    print("\nMNIST seed MLP, batch 32; an epoch is 55,000 training + 5,000 validation images.")
    print("Each contender epoch is timed right after a plain-loop epoch in the same process;")
    print(f"epochs 2..{args.epochs} of one run each, 1 torch thread.")
    print(f"{'':42} {'s/epoch':>8} {'plain':>6} {'ratio':>6}  {'range':>11}")
    for name, (base, seconds, ratio, low, high) in rows.items():
        print(f"{name:42} {seconds:8.2f} {base:6.2f} {ratio:5.2f}x  {low:.2f}-{high:.2f}x")
    if "Lightning + torchvision DataLoader" in rows:
        speedup = rows["Lightning + torchvision DataLoader"][2] / rows["mlplab fit (defaults)"][2]
        print(f"mlplab is {speedup:.1f}x faster per epoch than the torchvision-DataLoader idiom")
    default = runs["mlplab fit (defaults)"]
    per_epoch = default["metric logging"].seconds / args.epochs
    print(
        f"MLflow metric logging (one write per epoch): {per_epoch * 1000:.0f} ms per epoch, "
        f"{per_epoch / rows['mlplab fit (defaults)'][1]:.1%} of one; end of fit (the model "
        f"logged with signature and input example): {default['after fit']:.1f} s"
    )

    if not args.skip_stretch:
        print("\nThe plain loop's own levers, each epoch against a plain epoch (first epoch "
              "includes compilation):")  # fmt: skip
        for name, (first, ratios) in stretch_study(args.data_dir, args.epochs).items():
            print(
                f"  {name:42} first epoch {first:6.2f} s, then {statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f}x)"
            )
    if not args.skip_threads:
        print("\nThread policy, plain loop (s/epoch):")
        for label, seconds in thread_study(args.data_dir).items():
            print(f"  {label:30} {seconds:6.2f}")
    fit, imports = xor_end_to_end(store)
    print(f"\nXOR end to end (mlplab fit --config configs/xor.yaml): {fit:.1f} s")
    print(f"of which importing the CLI (torch, Lightning, torchmetrics): {imports:.1f} s")


if __name__ == "__main__":
    main()
