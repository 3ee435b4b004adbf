"""MNIST and Fashion-MNIST from torchvision's folder layout, loaded once into tensors."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mlplab.data.base import ArrayDataModule, Split
from mlplab.errors import DatasetError

DATA_DIR_ENV = "MLPLAB_DATA_DIR"


def parse_idx(raw: bytes, path: Path, expected_dims: int) -> np.ndarray:
    """Parse an uncompressed IDX file (unsigned bytes), checking its header against its size."""
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    dims = raw[3]
    if dims != expected_dims:
        raise DatasetError(f"{path} has {dims} dimensions, expected {expected_dims}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    offset = 4 + 4 * dims
    if len(raw) != offset + int(np.prod(shape)):
        raise DatasetError(
            f"{path} is truncated or corrupt: its header announces {shape} "
            f"({offset + int(np.prod(shape))} bytes) but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


class MNISTDataModule(ArrayDataModule):
    """MNIST as the seeds use it: pixels scaled to [0, 1], flattened to 784 features.

    `data_dir` holds torchvision's layout (`<data_dir>/MNIST/raw/*-ubyte`); unset, it is
    `$MLPLAB_DATA_DIR`, else `data/`. Missing files are downloaded by torchvision in
    `prepare_data` when `download` is on. Validation is the first `val_size` training images (the
    seeds' 55,000 / 5,000 split) or, with `split_seed`, a random draw seeded by it. `classes`
    keeps a subset and relabels it by position: `[7, 1]` makes 7 -> 0 and 1 -> 1 (seed 003).
    """

    folder = "MNIST"
    all_class_names: tuple[str, ...] = tuple(str(d) for d in range(10))
    files = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "t10k_images": "t10k-images-idx3-ubyte",  # the IDX files call the test split t10k
        "t10k_labels": "t10k-labels-idx1-ubyte",
    }
    #: MD5 of the official uncompressed files; `verify` checks them, so a damaged file is caught
    md5 = {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }
    num_features = 784
    image_shape = (28, 28)
    splits = ("train", "val", "test")

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 32,
        val_size: int = 5000,
        split_seed: int | None = None,
        classes: Sequence[int] | None = None,
        download: bool = True,
        verify: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.data_dir = data_dir
        self.val_size, self.split_seed = val_size, split_seed
        self.classes = list(classes) if classes is not None else None
        self.download, self.verify = download, verify

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else len(self.all_class_names)

    @property
    def class_names(self) -> list[str]:
        if self.classes is None:
            return list(self.all_class_names)
        return [self.all_class_names[c] for c in self.classes]

    @property
    def root(self) -> Path:
        return Path(self.data_dir or os.environ.get(DATA_DIR_ENV) or "data")

    @property
    def raw_dir(self) -> Path:
        return self.root / self.folder / "raw"

    def file(self, name: str) -> Path:
        """An IDX file, or its gzip (`name.gz`, as the datasets are published: a quarter of the
        size, for a machine the data must be carried to)."""
        path = self.raw_dir / name
        packed = path.with_name(f"{name}.gz")
        return packed if not path.is_file() and packed.is_file() else path

    def missing_files(self) -> list[Path]:
        return [
            self.raw_dir / name for name in self.files.values() if not self.file(name).is_file()
        ]

    def prepare_data(self) -> None:
        """Download with torchvision (which checks its archives' MD5) when files are missing."""
        missing = self.missing_files()
        if not missing:
            return
        problem = (
            f"{self.folder} files missing in {self.raw_dir}: {', '.join(p.name for p in missing)}"
        )
        fix = (
            f"download them elsewhere (torchvision.datasets.{self.folder}(root, download=True))"
            f" and point data_dir (or ${DATA_DIR_ENV}) at the folder holding {self.folder}/raw/"
        )
        if not self.download:
            raise DatasetError(f"{problem}; {fix}")
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, self.folder)
        try:
            for train in (True, False):
                dataset_class(str(self.root), train=train, download=True)
        except Exception as err:  # noqa: BLE001 - urllib, HTTP and checksum errors alike
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise DatasetError(f"{problem}, and the download failed ({reason}); {fix}") from None

    def _read(self, key: str, dims: int) -> np.ndarray:
        name = self.files[key]
        if not self.file(name).is_file():
            self.prepare_data()  # raises with the fix when it cannot get the file
        path = self.file(name)
        raw = path.read_bytes()
        if path.suffix == ".gz":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as err:
                raise DatasetError(f"{path} is not a whole gzip file ({err})") from None
        array = parse_idx(raw, path, dims)
        if self.verify and name in self.md5:  # the digest of the IDX bytes, packed or not
            digest = hashlib.md5(raw).hexdigest()
            if digest != self.md5[name]:
                raise DatasetError(
                    f"{path} is corrupt or not the official file (MD5 {digest}, expected "
                    f"{self.md5[name]}); delete it to download it again, or set verify: false "
                    "for a dataset of your own in this format"
                )
        return array

    def _split(self, prefix: str) -> Split:
        images, labels = self._read(f"{prefix}_images", 3), self._read(f"{prefix}_labels", 1)
        if len(images) != len(labels):
            raise DatasetError(
                f"{self.raw_dir}: {len(images)} {prefix} images but {len(labels)} labels"
            )
        x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)  # (N, 784)
        y = torch.from_numpy(labels.astype(np.int64))
        if self.classes is not None:
            keep = torch.isin(y, torch.tensor(self.classes))
            lookup = torch.full((10,), -1, dtype=torch.int64)
            lookup[torch.tensor(self.classes)] = torch.arange(len(self.classes))
            x, y = x[keep], lookup[y[keep]]
        return x, y

    def load_splits(self) -> dict[str, Split]:
        x, y = self._split("train")
        if self.split_seed is None:
            order = torch.arange(len(x))
        else:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        val, train = order[: self.val_size], order[self.val_size :]
        return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": self._split("t10k")}


class FashionMNISTDataModule(MNISTDataModule):
    """Zalando's Fashion-MNIST: the same format and splits, ten kinds of clothing."""

    folder = "FashionMNIST"
    all_class_names = (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )  # fmt: skip
    md5 = {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    }
