"""Your own table with no code: CSV, Parquet or anything pandas reads by its extension."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from mlplab.data.base import Split
from mlplab.data.files import FileDataModule
from mlplab.errors import DatasetError

if TYPE_CHECKING:  # the served model's module imports MLflow: loaded when a table is
    from mlplab.data.columns import ColumnEncoding

# pandas readers by extension, and whether they read a subset of columns
READERS = {
    ".csv": (partial(pd.read_csv, engine="pyarrow"), "usecols"),
    ".tsv": (partial(pd.read_csv, sep="\t", engine="pyarrow"), "usecols"),
    ".parquet": (pd.read_parquet, "columns"),
    ".pq": (pd.read_parquet, "columns"),
    ".feather": (pd.read_feather, "columns"),
    ".orc": (pd.read_orc, "columns"),
    ".json": (pd.read_json, None),
    ".jsonl": (partial(pd.read_json, lines=True), None),
    ".xlsx": (pd.read_excel, "usecols"),
    ".xls": (pd.read_excel, "usecols"),
}
COMPRESSED = (".gz", ".bz2", ".zip", ".xz", ".zst")
# compressed data by its first bytes, and the extension that has pandas decompress it
MAGIC = {b"\x1f\x8b": ("gzip", ".gz"), b"BZh": ("bzip2", ".bz2"), b"PK\x03\x04": ("zip", ".zip"),
         b"\xfd7zXZ\x00": ("xz", ".xz"), b"\x28\xb5\x2f\xfd": ("zstd", ".zst")}  # fmt: skip
ARCHIVES = (".xlsx",)  # zip files by design
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def reader(path: Path):
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in READERS:
        raise DatasetError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            f"name it {', '.join(READERS)} (optionally compressed: .gz, .zip, ...)"
        )
    return READERS[suffix]


def check_file(path: Path) -> None:
    """A folder, or compressed data under a plain name, is one line before pandas sees it."""
    if path.is_dir():
        raise DatasetError(f"{path} is a folder; a table is one file ({', '.join(READERS)})")
    try:
        with path.open("rb") as file:
            head = file.read(6)
    except OSError as err:
        raise DatasetError(f"{path} cannot be read ({err.strerror})") from None
    suffix = path.suffix.lower()
    for magic, (kind, extension) in MAGIC.items():
        if head.startswith(magic) and suffix != extension and suffix not in ARCHIVES:
            raise DatasetError(
                f"{path} holds {kind} data: name it {path.name}{extension} so it is "
                "decompressed as it is read"
            )


@contextmanager
def readable(path: Path):
    """An unreadable or empty file is one line naming it, whichever library found out."""
    try:
        yield
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path} is empty: write a header row and the data rows") from None
    except Exception as err:  # noqa: BLE001 - pandas', pyarrow's and the OS's errors alike
        known = (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError, ImportError)
        if not isinstance(err, known) and type(err).__module__.split(".")[0] != "pyarrow":
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetError(f"{path} cannot be read as a table ({reason})") from None


def header(path: Path) -> list[str] | None:
    """The column names without reading the rows, where the format allows; a name given twice
    is one line (pandas would rename the second `a.1`)."""
    import pyarrow.parquet

    read, _ = reader(path)
    names = None
    with readable(path):
        if read is pd.read_parquet:
            names = pyarrow.parquet.read_schema(path).names
        elif isinstance(read, partial) and read.func is pd.read_csv:
            first = pd.read_csv(path, sep=read.keywords.get("sep", ","), header=None, nrows=1,
                                dtype=str, keep_default_na=False)  # fmt: skip
            names = first.iloc[0].tolist() if len(first) else []
    for at, name in enumerate(names or []):
        if name in names[:at]:
            raise DatasetError(
                f"{path}: duplicated column name {name!r} (columns {names.index(name) + 1} and "
                f"{at + 1}); rename one so each column has its own name"
            )
    return names


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The file's rows, only `columns` where given."""
    read, select = reader(path)
    with readable(path):
        if columns is not None and select is not None:
            frame = read(path, **{select: columns})
        else:
            frame = read(path)
            frame = frame[columns] if columns is not None else frame
    if len(frame) == 0:
        raise DatasetError(f"{path} has no data rows: a table needs at least one row")
    return frame


def first_rows(mask: pd.Series, limit: int = 3) -> str:
    """The first data rows where `mask` holds, as the file counts them (`row_of`)."""
    from mlplab.data.columns import row_of

    rows = [row_of(mask, at) for at in np.flatnonzero(mask.to_numpy())]
    more = len(rows) > limit > 1  # one row named: the first of them
    return ", ".join(map(str, rows[:limit])) + (", ..." if more else "")


class TableDataModule(FileDataModule):
    """A table's rows: `target` (one column, or several for multi-output regression) from
    `features` (default: every other column but the weight and split columns).

    `task: auto` makes integer, boolean and text targets classes (named by their sorted values)
    and floating-point targets regression. Columns in `categorical` are one-hot encoded with
    the training split's categories (others must be numbers); missing values are refused,
    naming the column, unless `impute` fills them (median or mean of the training split, the
    most frequent category). `split_column` names each row's split (train / val / test), or
    the fractions split the rows. `weight_column` weighs each row's loss (Keras'
    `sample_weight`). Standardisation, when asked, leaves the one-hot inputs as they are.
    """

    def __init__(
        self,
        target: str | list[str],
        features: list[str] | None = None,
        categorical: list[str] | None = None,
        task: Literal["auto", "classification", "regression"] = "auto",
        impute: Literal["median", "mean"] | None = None,
        split_column: str | None = None,
        weight_column: str | None = None,
        **kwargs,
    ) -> None:
        """The files, splits and batches: `FileDataModule`'s and `ArrayDataModule`'s settings."""
        super().__init__(**kwargs)
        if split_column is not None and self.path is None:
            raise DatasetError("data.split_column splits data.path; with train_path, leave it out")
        self.targets = [target] if isinstance(target, str) else list(target)
        self.features = list(features) if features is not None else None
        self.categorical = list(categorical or [])
        self.task, self.impute = task, impute
        self.split_column, self.weight_column = split_column, weight_column
        self.encoding: ColumnEncoding | None = None
        self.example: pd.DataFrame | None = None  # raw training rows: the logged model's example

    # --- shapes the CLI links into the task ---------------------------------------------------
    @property
    def num_features(self) -> int:
        self.loaded()
        return self.encoding.width

    @property
    def num_classes(self) -> int:
        self.loaded()
        if self.encoding.class_names is None:
            raise AttributeError("a regression table has no num_classes")
        return len(self.encoding.class_names)

    @property
    def num_targets(self) -> int:
        self.loaded()
        if self.encoding.target_names is None:
            raise AttributeError("a classification table has no num_targets")
        return len(self.encoding.target_names)

    @property
    def class_names(self) -> list[str] | None:
        self.loaded()
        return self.encoding.class_names

    @property
    def target_names(self) -> list[str] | None:
        self.loaded()
        return self.encoding.target_names

    # --- reading ------------------------------------------------------------------------------
    def load_splits(self) -> dict[str, Split]:
        files = self.files()
        frames = {split: self.read(path) for split, path in files.items()}
        if "all" in frames:
            frames = self.split_frame(frames.pop("all"), files["all"])
        train = frames["train"]
        if "val" not in frames:
            labels = self.labels_for_strata(train)
            rows = self.split_rows(len(train), labels, has_test="test" in frames)
            frames = {**frames, **{split: train.iloc[index] for split, index in rows.items()}}
            train = frames["train"]
        from mlplab.data.columns import ColumnEncoding

        features = self.feature_columns(train)
        where = {split: files.get(split) or files.get("all") or files["train"] for split in frames}
        for split, frame in frames.items():  # every split's cells, not only the training ones
            for name in features:
                self.check_feature(frame[name], name in self.categorical, where[split])
        self.encoding = ColumnEncoding.fit(train, features, self.categorical, self.impute)
        self.fit_targets(train)
        self.example = train[features].head(5).reset_index(drop=True)
        order = [s for s in ("train", "val", "test") if s in frames]
        return {split: self.tensors(frames[split], where[split], split) for split in order}

    def read(self, path: Path) -> pd.DataFrame:
        check_file(path)
        columns = header(path)
        if columns is not None:
            self.check_columns(path, columns)
        wanted = self.wanted_columns(columns) if columns is not None else None
        frame = read_table(path, wanted)
        if columns is None:
            self.check_columns(path, list(frame.columns))
            frame = frame[self.wanted_columns(list(frame.columns))]
        self.check_complete(frame, self.targets, "target", path)  # before any split draws on it
        return frame

    def extra_columns(self) -> list[str]:
        return [c for c in (self.weight_column, self.split_column) if c is not None]

    def wanted_columns(self, columns: list[str]) -> list[str]:
        if self.features is not None:  # each once: a column named twice would be read twice
            return list(dict.fromkeys([*self.features, *self.targets, *self.extra_columns()]))
        return list(columns)

    def check_columns(self, path: Path, columns: list[str]) -> None:
        both = [name for name in self.features or [] if name in self.targets]
        if both:
            raise DatasetError(
                f"{path}: data.features lists the target {both[0]!r}; a target is no input of "
                "its own model: leave it out of data.features"
            )
        named = {
            "target": self.targets,
            "features": self.features or [],
            "categorical": self.categorical,
            "weight_column": [self.weight_column] if self.weight_column else [],
            "split_column": [self.split_column] if self.split_column else [],
        }
        for key, names in named.items():
            absent = [n for n in names if n not in columns]
            if absent:
                raise DatasetError(
                    f"{path}: data.{key} names {', '.join(map(repr, absent))}, not a column of "
                    f"the file; its columns are {', '.join(map(repr, columns))}"
                )

    def feature_columns(self, frame: pd.DataFrame) -> list[str]:
        taken = {*self.targets, *self.extra_columns()}
        features = self.features or [c for c in frame.columns if c not in taken]
        if not features:
            raise DatasetError(f"{self.source}: no feature columns are left beside the target")
        return features

    def check_feature(self, column: pd.Series, categorical: bool, path: Path) -> None:
        """A column the network can take: numbers, or text declared categorical; dates and
        lists are named as such, and text in a number column by its first such cell."""
        from mlplab.data.columns import shown

        name = column.name
        if pd.api.types.is_datetime64_any_dtype(column) or pd.api.types.is_timedelta64_dtype(
            column
        ):
            raise DatasetError(
                f"{path}: feature column {name!r} holds dates or times ({column.dtype}); "
                "turn them into numbers (days since a date, a weekday, ...) or leave it out"
            )
        cells = column.dropna()
        nested = cells.map(lambda v: isinstance(v, list | tuple | dict | set | np.ndarray))
        if nested.any():
            raise DatasetError(
                f"{path}: feature column {name!r} holds lists or records "
                f"({shown(cells[nested].iloc[0])}, data row {first_rows(nested, 1)}); a cell "
                "is one number or category: spread them over columns of their own"
            )
        numeric = pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)
        if numeric or categorical:
            return
        text = pd.to_numeric(cells, errors="coerce").isna()
        if text.any():
            raise DatasetError(
                f"{path}: feature column {name!r} holds text ({shown(cells[text].iloc[0])}"
                f", data row {first_rows(text, 1)}); list it in data.categorical to one-hot "
                "encode it, fix the cell if it should be a number, or leave the column out"
            )

    def split_frame(self, frame: pd.DataFrame, path: Path) -> dict[str, pd.DataFrame]:
        if self.split_column is None:
            rows = self.split_rows(len(frame), self.labels_for_strata(frame))
            return {split: frame.iloc[index] for split, index in rows.items()}
        names = frame[self.split_column].astype(str).str.strip().str.lower()
        unknown = sorted(set(names.unique()) - set(SPLIT_NAMES))
        if unknown:
            raise DatasetError(
                f"{path}: split column {self.split_column!r} has {', '.join(map(repr, unknown))}; "
                "each row's split is train, val (or validation) or test"
            )
        split_of = names.map(SPLIT_NAMES)
        frames = {
            s: frame[split_of == s] for s in ("train", "val", "test") if (split_of == s).any()
        }
        if "train" not in frames:
            raise DatasetError(f"{path}: split column {self.split_column!r} marks no train rows")
        return frames

    # --- targets ------------------------------------------------------------------------------
    def classification(self, frame: pd.DataFrame) -> bool:
        """The task: as set, else by the target's type (floats are values, the rest classes)."""
        kinds = [pd.api.types.is_float_dtype(frame[t]) for t in self.targets]
        if self.task == "regression" or (self.task == "auto" and all(kinds)):
            for name in self.targets:
                if not pd.api.types.is_numeric_dtype(frame[name]):
                    raise DatasetError(
                        f"{self.source}: target {name!r} holds text; a regression target is a "
                        "number (or set data.task: classification)"
                    )
            return False
        if len(self.targets) > 1:
            raise DatasetError(
                f"{self.source}: classification takes one target column, not "
                f"{len(self.targets)}; several targets are regression (data.task: regression)"
            )
        return True

    def labels_for_strata(self, frame: pd.DataFrame) -> np.ndarray | None:
        if not self.classification(frame):
            return None
        return frame[self.targets[0]].astype(str).to_numpy()

    def fit_targets(self, train: pd.DataFrame) -> None:
        self.check_complete(train, self.targets, "target")
        if not self.classification(train):
            self.encoding.target_names = list(self.targets)
            return
        column = train[self.targets[0]]
        if isinstance(column.dtype, pd.CategoricalDtype):
            values = list(column.cat.categories)  # the order the data gives
        else:
            values = sorted(column.unique().tolist(), key=lambda v: (isinstance(v, str), v))
        if len(values) < 2:
            raise DatasetError(
                f"{self.source}: target {self.targets[0]!r} has one class ({values[0]!r}) in the "
                "training rows; a classifier needs at least two"
            )
        self.encoding.class_names = [str(v) for v in values]
        self.label_values = list(values)

    def check_complete(self, frame: pd.DataFrame, columns: list[str], what: str,
                       path: Path | None = None) -> None:  # fmt: skip
        for name in columns:
            missing = frame[name].isna()
            if missing.any():
                raise DatasetError(
                    f"{path or self.source}: {what} column {name!r} has {int(missing.sum())} "
                    f"missing value(s) (data rows {first_rows(missing)}); drop those rows"
                )

    def tensors(self, frame: pd.DataFrame, path: Path, split: str) -> Split:
        from mlplab.data.columns import EncodingError, row_of, shown

        try:
            x = torch.from_numpy(self.encoding.encode(frame))
        except EncodingError as err:
            raise DatasetError(f"{path} ({split} rows): {err}") from None
        self.check_complete(frame, self.targets, "target")
        if self.encoding.class_names is not None:
            column = frame[self.targets[0]]
            codes = pd.Categorical(column, categories=self.label_values).codes
            if (codes < 0).any():
                unseen = column[codes < 0].iloc[0]
                raise DatasetError(
                    f"{path}: the {split} rows have class {unseen!r}, which the training rows "
                    "lack; a classifier learns only the classes it trains on"
                )
            y = torch.from_numpy(codes.astype(np.int64))
        else:
            with np.errstate(over="ignore"):  # overflow is refused below, by its cell
                values = frame[self.targets].to_numpy(dtype=np.float32, copy=True)
            bad = ~np.isfinite(values)
            if bad.any():
                row, col = (int(i[0]) for i in np.nonzero(bad))
                name = self.targets[col]
                raise DatasetError(
                    f"{path}: target {name!r} is not a finite float32 at data row "
                    f"{row_of(frame, row)} ({shown(frame[name].iloc[row])}); fix or "
                    "drop the row (float32 holds magnitudes up to 3.4e38)"
                )
            y = torch.from_numpy(values)
        if self.weight_column is None:
            return x, y
        return x, y, self.sample_weights(frame, path)

    def sample_weights(self, frame: pd.DataFrame, path: Path) -> torch.Tensor:
        name = self.weight_column
        self.check_complete(frame, [name], "weight")
        if not pd.api.types.is_numeric_dtype(frame[name]):
            raise DatasetError(f"{path}: weight column {name!r} must hold numbers")
        w = frame[name].to_numpy(dtype=np.float32)
        if (w < 0).any() or not np.isfinite(w).all():
            raise DatasetError(f"{path}: weight column {name!r} has negative or infinite values")
        return torch.from_numpy(w.copy())

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's statistics, but one-hot inputs stay 0/1 (mean 0, std 1)."""
        mean, std = super().feature_stats()
        at = 0
        for spec in self.encoding.features:
            width = len(spec["categories"]) if spec["categories"] is not None else 1
            if spec["categories"] is not None:
                mean[at : at + width], std[at : at + width] = 0.0, 1.0
            at += width
        return mean, std
