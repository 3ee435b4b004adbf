"""The seed experiments' data: XOR, moons, iris, digits (scikit-learn), MNIST, Fashion-MNIST."""

from my_project.data.images import FashionMNISTDataModule, MNISTDataModule
from my_project.data.tabular import (
    DigitsDataModule,
    IrisClassificationDataModule,
    IrisRegressionDataModule,
    IrisSetosaDataModule,
    MoonsDataModule,
    XORDataModule,
)

__all__ = [
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "IrisClassificationDataModule",
    "IrisRegressionDataModule",
    "IrisSetosaDataModule",
    "MNISTDataModule",
    "MoonsDataModule",
    "XORDataModule",
]
