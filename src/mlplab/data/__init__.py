from mlplab.data.base import ArrayDataModule
from mlplab.data.images import FashionMNISTDataModule, MNISTDataModule
from mlplab.data.tabular import (
    DigitsDataModule,
    IrisClassificationDataModule,
    IrisRegressionDataModule,
    MoonsDataModule,
    XORDataModule,
)

__all__ = [
    "ArrayDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "IrisClassificationDataModule",
    "IrisRegressionDataModule",
    "MNISTDataModule",
    "MoonsDataModule",
    "XORDataModule",
]
