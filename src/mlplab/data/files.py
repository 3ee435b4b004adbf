"""The base of the datamodules for the user's own files: where they are and how they split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlplab.data.base import ArrayDataModule
from mlplab.errors import DatasetError


class FileDataModule(ArrayDataModule):
    """One `path` split by fractions (seeded, stratified by class where every class has enough
    rows), or a `train_path` with an optional `val_path` (else `val_fraction` of the training
    rows) and `test_path`. The files are read once, on first use: the CLI asks for the shapes
    as soon as the datamodule exists, so a bad file stops the command before a run starts."""

    def __init__(
        self,
        path: str | None = None,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        val_fraction: float = 0.2,
        test_fraction: float | None = None,
        seed: int = 0,
        batch_size: int = 32,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if (path is None) == (train_path is None):
            raise DatasetError(
                "give data.path (one file or folder, split by fractions) or data.train_path "
                "(with data.val_path and data.test_path where you have them), not both or neither"
            )
        if path is not None and (val_path or test_path):
            raise DatasetError("data.val_path and data.test_path go with data.train_path, not path")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if value is not None and not 0 < value < 1:
                raise DatasetError(
                    f"data.{name} is {value}; a fraction of the rows lies strictly between 0 and 1"
                )
        if val_fraction + (test_fraction or 0) >= 1:
            raise DatasetError(
                f"data.val_fraction {val_fraction} and data.test_fraction {test_fraction} leave "
                "no rows to train on; their sum must be below 1"
            )
        self.path, self.train_path, self.val_path, self.test_path = (
            path,
            train_path,
            val_path,
            test_path,
        )
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.loaded())

    @property
    def source(self) -> str:
        """Where the data comes from, for the run's dataset inputs."""
        return str(self.path or self.train_path)

    def loaded(self):
        if not self.data:
            self.data = self.load_splits()
        return self.data

    def files(self) -> dict[str, Path]:
        """The paths given, by split (`all` for one path to split), each checked to exist."""
        given = {"all": self.path, "train": self.train_path, "val": self.val_path,
                 "test": self.test_path}  # fmt: skip
        found = {split: Path(p).expanduser() for split, p in given.items() if p is not None}
        for split, path in found.items():
            if not path.exists():
                key = "path" if split == "all" else f"{split}_path"
                raise DatasetError(f"data.{key}: {path} does not exist; check the path")
        return found

    def split_rows(self, n: int, labels: np.ndarray | None, has_val: bool = False,
                   has_test: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
        """Row indices of each split drawn from `n` rows with `seed` (the splits the files do not
        give already), stratified by `labels` when every class can be."""
        from sklearn.model_selection import train_test_split

        rows = np.arange(n)
        out: dict[str, np.ndarray] = {}
        wanted = {"test": None if has_test else self.test_fraction,
                  "val": None if has_val else self.val_fraction}  # fmt: skip
        left = 1.0
        for split, fraction in wanted.items():
            if not fraction:
                continue
            size = fraction / left  # of the rows left after the splits taken before
            strata = labels[rows] if labels is not None else None
            if strata is not None and np.unique(strata, return_counts=True)[1].min() < 2:
                strata = None  # a class of one row cannot be split: draw plainly
            for stratify in (strata, None):  # too few rows per class: draw plainly
                try:
                    rows, taken = train_test_split(
                        rows, test_size=size, random_state=self.seed, stratify=stratify
                    )
                    break
                except ValueError:
                    continue
            else:
                raise DatasetError(
                    f"{self.source} has {n} rows: too few to split off data.{split}_fraction "
                    f"{fraction}; give more rows or a larger fraction"
                )
            out[split] = np.sort(taken)
            left -= fraction
        out["train"] = np.sort(rows)
        return out
