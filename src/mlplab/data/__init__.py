"""Data machinery every project shares: the in-memory datamodule base (`ArrayDataModule`, its
batches and chunks) and the datamodules for your own files (tables, image folders) with the
column encoding that travels with their models."""

from mlplab.data.base import ArrayDataModule
from mlplab.data.folders import ImageFolderDataModule
from mlplab.data.table import TableDataModule

__all__ = ["ArrayDataModule", "ImageFolderDataModule", "TableDataModule"]
