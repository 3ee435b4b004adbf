"""Your own images with no code: torchvision's `ImageFolder` layout, decoded once into memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mlplab.data.base import Split
from mlplab.data.files import FileDataModule
from mlplab.errors import DatasetError


class ImageFolderDataModule(FileDataModule):
    """Images in `<path>/<class>/*.png|jpg|...` (the folder names are the class names, sorted):
    decoded once, converted to grayscale or RGB, resized to `image_size` and held as pixel rows
    scaled to [0, 1] (C x H x W features), so batches are tensor slices as for MNIST. One
    `path` is split by fractions (stratified by class); or `train_path` / `val_path` /
    `test_path` each hold the class folders."""

    def __init__(
        self, image_size: int | tuple[int, int] = 28, grayscale: bool = True, **kwargs
    ) -> None:
        """The files, splits and batches: `FileDataModule`'s and `ArrayDataModule`'s settings."""
        super().__init__(**kwargs)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise DatasetError(f"data.image_size {image_size}: give a side or [height, width]")
        self.size, self.grayscale = size, grayscale
        self.classes: list[str] | None = None
        self.paths: dict[str, list[str]] = {}  # each split's image files, once loaded

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    @property
    def image_shape(self) -> tuple[int, ...]:
        """For figures: (H, W), or (C, H, W) in colour."""
        return self.size if self.grayscale else (self.channels, *self.size)

    @property
    def num_features(self) -> int:
        return self.channels * self.size[0] * self.size[1]

    @property
    def num_classes(self) -> int:
        """Asked for by the CLI as the datamodule is made: every image is read here, so a bad
        one stops the command before its run exists."""
        self.loaded()
        return len(self.class_names)

    def files(self) -> dict[str, Path]:
        found = super().files()
        for split, path in found.items():
            if not path.is_dir():
                key = "path" if split == "all" else f"{split}_path"
                raise DatasetError(
                    f"data.{key}: {path} is a file; give the folder that holds the class "
                    f"folders ({path.parent}/<class>/<image>)"
                )
        return found

    @property
    def class_names(self) -> list[str]:
        if self.classes is None:
            self.classes = self.find_classes(self.files().get("all") or self.files()["train"])
        return self.classes

    def find_classes(self, root: Path) -> list[str]:
        from torchvision.datasets.folder import find_classes

        try:
            classes, _ = find_classes(str(root))
        except (FileNotFoundError, NotADirectoryError):
            raise DatasetError(
                f"{root} has no class subfolders; lay the images out as {root}/<class>/<image>"
            ) from None
        if len(classes) < 2:
            raise DatasetError(
                f"{root} has one class folder ({classes[0]}); a classifier needs at least two"
            )
        return classes

    def scan(self, root: Path) -> tuple[list[str], np.ndarray]:
        """The image files under `root` and their labels by this module's class names."""
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        names = self.find_classes(root)
        unknown = sorted(set(names) - set(self.class_names))
        if unknown:
            raise DatasetError(
                f"{root} has class folder(s) {', '.join(unknown)} that the training images lack"
            )
        index = {name: i for i, name in enumerate(self.class_names)}
        refuse_folder_links(root)
        try:
            samples = make_dataset(str(root), {n: index[n] for n in names}, IMG_EXTENSIONS)
        except FileNotFoundError as err:  # a class folder without images
            raise DatasetError(f"{root}: {str(err).splitlines()[0]}") from None
        paths = [p for p, _ in samples]
        refuse_twice({"": paths})
        return paths, np.array([label for _, label in samples], dtype=np.int64)

    def decode(self, paths: list[str]) -> torch.Tensor:
        """(N, C*H*W) float32 pixels in [0, 1], read with PIL as `ImageFolder` reads them and
        resized as torchvision's `Resize` does; an unreadable image is named."""
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor, resize

        pixels = torch.empty((len(paths), self.channels, *self.size), dtype=torch.uint8)
        for i, path in enumerate(paths):
            try:
                with Image.open(path) as file:
                    image = pil_to_tensor(file.convert("L" if self.grayscale else "RGB"))
            except OSError as err:  # PIL's UnidentifiedImageError and truncated files
                reason = str(err).strip().splitlines()[0] if str(err).strip() else "undecodable"
                raise DatasetError(
                    f"{path} is not a readable image ({reason}); remove or replace it"
                ) from None
            if tuple(image.shape[1:]) != self.size:
                image = resize(image, list(self.size), antialias=True)
            pixels[i] = image
        return pixels.flatten(1).float().div_(255.0)

    def load_splits(self) -> dict[str, Split]:
        files = self.files()
        found = {split: self.scan(root) for split, root in files.items()}
        if "all" in found:
            paths, labels = found.pop("all")
            rows = self.split_rows(len(paths), labels)
        else:
            paths, labels = found.pop("train")
            rows = self.split_rows(len(paths), labels, has_val="val" in found,
                                   has_test="test" in found)  # fmt: skip
        splits = {
            split: ([paths[i] for i in index], labels[index]) for split, index in rows.items()
        }
        splits.update(found)
        order = [s for s in ("train", "val", "test") if s in splits]
        self.paths = {split: splits[split][0] for split in order}
        refuse_twice(self.paths)  # a file in two split folders
        return {
            split: (self.decode(splits[split][0]), torch.from_numpy(splits[split][1]))
            for split in order
        }


def refuse_folder_links(root: Path) -> None:
    """A link to a folder inside an image folder is refused: torchvision follows it, so it
    counts images twice (`a/sideways -> ../b`) or loops (`a/up -> ..`)."""
    for folder, subfolders, _ in os.walk(root):
        for name in subfolders:
            link = Path(folder) / name
            if link.is_symlink():
                raise DatasetError(
                    f"{link} links to the folder {os.readlink(link)}; links to folders inside "
                    "an image folder count images twice or loop: copy the images in, or link "
                    "each file"
                )


def refuse_twice(paths: dict[str, list[str]]) -> None:
    """One image file (by what its path resolves to) is one sample, in one split."""
    seen: dict[str, tuple[str, str]] = {}
    for split, listed in paths.items():
        for path in listed:
            real = os.path.realpath(path)
            if real in seen:
                first, where = seen[real]
                place = f" (in {where} and {split})" if where != split else ""
                raise DatasetError(
                    f"{first} and {path} are the same image file{place}; remove one of them: "
                    "a sample counted twice, or in two splits, inflates the scores"
                )
            seen[real] = (path, split)
