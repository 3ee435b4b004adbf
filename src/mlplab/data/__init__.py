from mlplab.data.base import ArrayDataModule
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
    "IrisClassificationDataModule",
    "IrisRegressionDataModule",
    "MoonsDataModule",
    "XORDataModule",
]
