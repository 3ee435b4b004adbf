"""The small tabular datasets of seeds 000 and 001, held in memory."""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np
import torch

from mlplab.data.base import ArrayDataModule, Split


def _split(x: np.ndarray, y: np.ndarray, y_dtype: torch.dtype) -> Split:
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=y_dtype)


class WholeDataModule(ArrayDataModule):
    """Data the seed holds nothing out of: every split is all of it, one sample a batch."""

    splits = ("train", "val", "test")

    def __init__(self, batch_size: int = 1, **kwargs) -> None:
        super().__init__(batch_size=batch_size, **kwargs)

    @abc.abstractmethod
    def everything(self) -> Split:
        """All the samples."""

    def load_splits(self) -> dict[str, Split]:
        return dict.fromkeys(self.splits, self.everything())


class XORDataModule(WholeDataModule):
    """The four points of the XOR truth table: the whole domain."""

    num_features = 2
    num_classes = 2

    def everything(self) -> Split:
        x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
        return _split(x, x.sum(axis=1) == 1, torch.int64)


class MoonsDataModule(ArrayDataModule):
    """scikit-learn's two moons: `n_samples` to train on (the seed's 400), fresh draws to validate
    and test, each split from its own seed so none overlaps."""

    num_features = 2
    num_classes = 2
    splits = ("train", "val", "test")

    def __init__(
        self,
        n_samples: int = 400,
        n_holdout: int = 200,
        noise: float = 0.1,
        batch_size: int = 32,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.n_samples, self.n_holdout, self.noise, self.seed = n_samples, n_holdout, noise, seed

    def load_splits(self) -> dict[str, Split]:
        from sklearn.datasets import make_moons

        sizes = {"train": self.n_samples, "val": self.n_holdout, "test": self.n_holdout}
        return {
            split: _split(*make_moons(n, noise=self.noise, random_state=self.seed + i), torch.int64)
            for i, (split, n) in enumerate(sizes.items())
        }


class IrisDataModule(ArrayDataModule):
    """Iris split 2/3 train, 1/3 validation with the seed's `train_test_split(random_state=999)`."""

    def __init__(self, batch_size: int = 1, seed: int = 999, **kwargs) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.seed = seed

    @abc.abstractmethod
    def xy(self) -> tuple[np.ndarray, np.ndarray, torch.dtype]:
        """Features, targets and the targets' dtype."""

    def load_splits(self) -> dict[str, Split]:
        from sklearn.model_selection import train_test_split

        x, y, y_dtype = self.xy()
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=1 / 3, random_state=self.seed
        )
        return {"train": _split(x_train, y_train, y_dtype), "val": _split(x_val, y_val, y_dtype)}


class IrisClassificationDataModule(IrisDataModule):
    """The four measurements -> one of three species."""

    num_features = 4
    num_classes = 3

    def xy(self):
        from sklearn.datasets import load_iris

        iris = load_iris()
        return iris.data, iris.target, torch.int64


class IrisRegressionDataModule(IrisDataModule):
    """Sepal length, sepal width, petal length -> petal width."""

    num_features = 3
    num_targets = 1

    def xy(self):
        from sklearn.datasets import load_iris

        data = load_iris().data
        return data[:, :3], data[:, 3:], torch.float32  # targets (N, 1)


class IrisSetosaDataModule(WholeDataModule):
    """Seed 004's perceptron data: petal length and width -> Iris setosa (1) or not (0), all
    150 flowers (the seed holds none out)."""

    num_features = 2
    num_classes = 2

    def everything(self) -> Split:
        from sklearn.datasets import load_iris

        iris = load_iris()
        return _split(iris.data[:, 2:4], iris.target == 0, torch.int64)


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's 8x8 digits, pixels 0..16 as the seed uses them: the first `n_train` images
    train, the rest are the held-out validation split."""

    num_features = 64
    num_classes = 10
    image_shape = (8, 8)
    splits: ClassVar[tuple[str, ...]] = ("train", "val")

    def __init__(self, n_train: int = 1000, batch_size: int = 16, **kwargs) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.n_train = n_train

    def load_splits(self) -> dict[str, Split]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y, n = digits.data, digits.target, self.n_train
        return {
            "train": _split(x[:n], y[:n], torch.int64),
            "val": _split(x[n:], y[n:], torch.int64),
        }
