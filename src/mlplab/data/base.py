"""In-memory datamodules: every split is a pair of tensors, batches are built by indexing them."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mlplab.errors import UserError
from mlplab.speed.fast_path import chunk_size

# features (N, F) float32, targets (N,) int64 or (N, T) float32, and optionally per-sample
# weights (N,) float32 that scale each sample's loss
Split = tuple[torch.Tensor, ...]


class TensorsDataset(Dataset):
    """Features, targets (and sample weights) held as tensors.

    `__getitems__` lets the DataLoader fetch a whole batch with one indexing operation instead of
    one `__getitem__` per sample plus a collate; samplers (also Lightning's `DistributedSampler`)
    work unchanged because only the fetch differs.
    """

    def __init__(self, *tensors: torch.Tensor, split_size: int | None = None) -> None:
        if len({len(t) for t in tensors}) != 1:
            raise ValueError(f"tensors of different lengths: {[len(t) for t in tensors]}")
        self.tensors, self.split_size = tensors, split_size

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> Split:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]):
        """(x, y[, w]) for these indices; with `split_size`, a chunk: a list of consecutive
        batches (x, y[, w]) of that size, which the fast path steps through one at a time."""
        index = torch.as_tensor(indices, device=self.tensors[0].device)
        picked = tuple(t[index] for t in self.tensors)
        if self.split_size is None:
            return picked
        return list(zip(*(t.split(self.split_size) for t in picked), strict=True))


class ShardSampler(DistributedSampler):
    """Evaluation under DDP: rank r takes samples r, r + world, r + 2 world, ... so every sample
    is evaluated exactly once (the stock sampler pads the last round with repeats, counting a
    few samples twice). Ranks may hold one sample more than others; metrics are synced as sums
    of states, so uneven shards are exact. Lightning leaves a `DistributedSampler` in place."""

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def _batch_as_is(batch: Split) -> Split:
    """The dataset already returns a batch: nothing to collate (module-level, so it pickles)."""
    return batch


class ArrayDataModule(LightningDataModule, abc.ABC):
    """Base of every mlplab datamodule.

    Subclasses set `num_features` (and `num_classes` or `num_targets`) without touching the data,
    list the splits they have in `splits`, and build them in `load_splits` (seeded where random).

    `batch_size` is the optimisation batch of one device (0: the whole split); under DDP each
    step sees `batch_size * world_size` samples, unless `global_batch` splits `batch_size` over
    the devices so a config trains with the same batch on any device count. `chunk` above 1 is
    the fast path (`mlplab.speed.fast_path`, which decides whether this run may take it):
    training batches come `chunk` at a time, drawn from one shuffled order, so the optimiser
    sees exactly the batches a plain loader of `batch_size` gives while Lightning's per-step
    overhead is paid once per chunk; evaluation then uses batches of `batch_size * chunk`
    (the same metrics, sooner). `on_device` keeps the
    tensors on the accelerator (no copy per batch); otherwise CUDA batches come from pinned
    memory.
    """

    num_features: int
    splits: ClassVar[tuple[str, ...]] = ("train", "val")

    def __init__(
        self,
        batch_size: int = 32,
        standardize: bool = False,
        chunk: int = 1,
        on_device: bool = False,
        global_batch: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        if batch_size < 0:
            raise ValueError(
                f"batch_size must be positive (or 0: the whole split), got {batch_size}"
            )
        self.batch_size = batch_size
        self.standardize = standardize
        self.chunk = chunk
        self.on_device = on_device
        self.global_batch = global_batch
        self.data: dict[str, Split] = {}

    @abc.abstractmethod
    def load_splits(self) -> dict[str, Split]:
        """Every split named in `splits` as (features, targets[, sample weights])."""

    def setup(self, stage: str | None = None) -> None:
        if not self.data:
            self.data = self.load_splits()
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if self.on_device and device is not None:
            self.data = {k: tuple(t.to(device) for t in split) for k, split in self.data.items()}

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and std of the training split (std of constant features set to 1)."""
        self.setup()
        x = self.data["train"][0].flatten(1)
        std = x.std(dim=0)
        return x.mean(dim=0), torch.where(std > 0, std, torch.ones_like(std))

    def loader(self, split: str, train: bool = False) -> DataLoader:
        """Batches of `split`: shuffled for training; on the fast path, `chunk` batches at once
        (for training as a tuple of batches); under DDP, evaluation sharded without padding."""
        if split not in self.data:
            stage = {"val": "validate", "train": "fit"}.get(split, split)
            raise UserError(
                f"{type(self).__name__} has no {split!r} split (it has: "
                f"{', '.join(self.splits)}); run another command than `mlplab {stage}`"
            )
        x = self.data[split][0]
        world = self.trainer.world_size if self.trainer is not None else 1
        whole = self.batch_size <= 0 or self.batch_size >= len(x)
        batch_size = max(len(x), 1) if whole else self.device_batch_size(world)
        chunk = chunk_size(self.trainer)  # 1 where the fast path is off for this run
        dataset = TensorsDataset(
            *self.data[split], split_size=batch_size if train and chunk > 1 else None
        )
        cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        sampler = None
        if world > 1 and not train:  # training gets Lightning's DistributedSampler
            sampler = ShardSampler(dataset, num_replicas=world, rank=self.trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=batch_size * chunk if not whole else batch_size,
            shuffle=train,
            sampler=sampler,
            collate_fn=_batch_as_is,
            pin_memory=cuda and x.device.type == "cpu",
        )

    def device_batch_size(self, world_size: int) -> int:
        if not self.global_batch:
            return self.batch_size
        if self.batch_size % world_size:
            raise UserError(
                f"data.global_batch: batch_size {self.batch_size} does not split evenly over "
                f"{world_size} devices; choose a multiple of {world_size}"
            )
        return self.batch_size // world_size

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test" if "test" in self.splits else "val")


def batch_size(batch) -> int:
    """How many samples a batch holds, a chunk of batches included: the `batch_size_fn` for
    Lightning's `ThroughputMonitor` (`mlplab.data.base.batch_size`)."""
    return sum(len(b[0]) for b in batch) if isinstance(batch, list) else len(batch[0])
