"""In-memory datamodules: every split is a pair of tensors, batches are built by indexing them."""

from __future__ import annotations

from typing import ClassVar

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

Split = tuple[torch.Tensor, torch.Tensor]  # features (N, F) float32, targets (N,) int64 or (N, T)


class TensorPairDataset(Dataset):
    """Features and targets held as tensors.

    `__getitems__` lets the DataLoader fetch a whole batch with one indexing operation instead of
    one `__getitem__` per sample plus a collate; samplers (also Lightning's `DistributedSampler`)
    work unchanged because only the fetch differs.
    """

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        if len(features) != len(targets):
            raise ValueError(f"{len(features)} feature rows but {len(targets)} targets")
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Split:
        return self.features[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> Split:
        index = torch.as_tensor(indices)
        return self.features[index], self.targets[index]


def _batch_as_is(batch: Split) -> Split:
    """The dataset already returns a batch: nothing to collate (module-level, so it pickles)."""
    return batch


class ArrayDataModule(LightningDataModule):
    """Base of every mlplab datamodule.

    Subclasses set `num_features` (and `num_classes` or `num_targets`) without touching the data,
    list the splits they have in `splits`, and build them in `load_splits` (seeded where random).
    `batch_size` 0 means the whole split as one batch.
    """

    num_features: int
    splits: ClassVar[tuple[str, ...]] = ("train", "val")

    def __init__(self, batch_size: int = 32, standardize: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.batch_size = batch_size
        self.standardize = standardize
        self.data: dict[str, Split] = {}

    def load_splits(self) -> dict[str, Split]:
        """Return every split named in `splits` as (features, targets)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.data:
            self.data = self.load_splits()

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and std of the training split (std of constant features set to 1)."""
        self.setup()
        x = self.data["train"][0].flatten(1)
        std = x.std(dim=0)
        return x.mean(dim=0), torch.where(std > 0, std, torch.ones_like(std))

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.data:
            raise ValueError(
                f"{type(self).__name__} has no {split!r} split (it has: {', '.join(self.splits)})"
            )
        dataset = TensorPairDataset(*self.data[split])
        batch_size = max(len(dataset), 1) if self.batch_size <= 0 else self.batch_size
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=_batch_as_is)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test" if "test" in self.splits else "val")
