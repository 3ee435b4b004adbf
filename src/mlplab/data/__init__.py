from mlplab.data.base import ArrayDataModule
from mlplab.data.folders import ImageFolderDataModule
from mlplab.data.images import FashionMNISTDataModule, MNISTDataModule
from mlplab.data.table import TableDataModule
from mlplab.data.tabular import (
    DigitsDataModule,
    IrisClassificationDataModule,
    IrisRegressionDataModule,
    IrisSetosaDataModule,
    MoonsDataModule,
    XORDataModule,
)

__all__ = [
    "ArrayDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "IrisClassificationDataModule",
    "IrisRegressionDataModule",
    "IrisSetosaDataModule",
    "MNISTDataModule",
    "MoonsDataModule",
    "TableDataModule",
    "XORDataModule",
]
