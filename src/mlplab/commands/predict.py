"""Predictions to files: from a config's data (LightningCLI) or from a CSV/NPY file.

`mlplab predict --model MODEL --input FILE [--output FILE]` loads MODEL (a Lightning checkpoint,
or an MLflow model URI such as `runs:/<id>/model` or `models:/<name>/<version>`), reads raw
inputs from FILE (CSV with or without a header, or NPY; a table with named columns for a model
trained on one) and writes named columns: a classifier's predicted class and each class's
probability, a regressor's targets.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from mlplab.errors import CommandParser, UserError
from mlplab.safety.metadata import described_outputs
from mlplab.safety.trust import add_weights_only_argument, trust_from_arguments
from mlplab.tracking.store import output_folder


class PredictionWriter(BasePredictionWriter):
    """Write everything `trainer.predict` returns to one CSV file, as named columns: a
    classifier's predicted class (by name where the data names its classes) and each class's
    probability, a regressor's targets by name."""

    def __init__(self, path: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        from mlplab.data.columns import named_outputs

        outputs = torch.cat([torch.as_tensor(p) for p in predictions]).flatten(1).cpu().numpy()
        names = described_outputs(trainer.datamodule, pl_module)
        write_frame(named_outputs(outputs, names["class_names"], names["target_names"]), self.path)
        print(f"mlplab: wrote {len(outputs)} predictions to {self.path}")


def read_features(path: Path) -> np.ndarray:
    """Rows of numeric features, (N, F) float32, from CSV (header optional) or NPY."""
    if not path.is_file():
        raise UserError(f"input file {path} does not exist (or is not a file)")
    if path.suffix == ".npy":
        with open(path, "rb") as file:
            if file.read(6) != b"\x93NUMPY":  # NumPy would call any other file "pickled data"
                raise UserError(f"{path} is not a .npy file (no NumPy header); save it with "
                                "numpy.save, or give CSV")  # fmt: skip
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as err:  # an object array, a header NumPy cannot read
            raise UserError(f"{path} is not a numeric .npy array ({err})") from None
        except (OSError, EOFError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{path} is not a numeric .npy array ({reason})") from None
        if x.dtype.kind not in "biuf":
            raise UserError(f"{path} holds {x.dtype} values; numbers are needed")
        if x.ndim == 0:
            raise UserError(f"{path} holds a single number; one row of features per sample")
    else:
        try:
            frame = pd.read_csv(path, header=None)
        except pd.errors.EmptyDataError:
            raise UserError(f"{path} is empty: write one row of features per line") from None
        except pd.errors.ParserError as err:
            reason = str(err).strip().splitlines()[-1]
            raise UserError(f"{path} is not a table of features ({reason})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a text CSV file; give CSV or .npy") from None
        if len(frame) and _is_header(frame.iloc[0]):
            frame = frame.iloc[1:]
        empty = np.argwhere(frame.isna().to_numpy())
        if len(empty):  # a short row, or a cell left empty
            row, col = empty[0]
            raise UserError(f"{path}: row {row + 1}, column {col + 1} is empty; every row needs "
                            f"{frame.shape[1]} numbers")  # fmt: skip
        x = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.argwhere(np.isnan(x) & ~frame.isna().to_numpy())
        if len(bad):
            row, col = bad[0]
            raise UserError(
                f"{path}: row {row + 1}, column {col + 1} is {frame.iat[row, col]!r}, not a number"
            )
    x = x.reshape(len(x), -1) if x.ndim != 2 else x
    if len(x) == 0:
        raise UserError(f"{path} has no rows: write one row of features per line")
    if not np.isfinite(x).all():
        raise UserError(f"{path} has empty, NaN or infinite values; every feature must be a number")
    with np.errstate(over="ignore"):  # overflow is the next check's message
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{path} has values beyond float32's range (about 3.4e38)")
    return x


def _is_header(row) -> bool:
    """A header names the columns: text, no numbers (an empty first cell is an index's). A row
    with numbers and text (`0,abc`) is data with a mistake in it, reported as such."""
    numbers = pd.to_numeric(row, errors="coerce").notna()
    return bool((row.notna() & ~numbers).any() and not numbers.any())  # `,a,b`: an index column


def read_rows(path: Path) -> pd.DataFrame:
    """Raw rows with named columns (a header row), in any table format mlplab reads."""
    from mlplab.data.table import read_table

    if not path.is_file():
        raise UserError(f"input file {path} does not exist (or is not a file)")
    return read_table(path)


def write_frame(frame: pd.DataFrame, path: Path | None) -> None:
    """CSV (stdout if None), Parquet, or NPY (the numeric columns) by the file's suffix; a
    missing folder is created."""
    if path is not None:
        output_folder(path)
    if path is not None and path.suffix == ".npy":
        np.save(path, frame.select_dtypes("number").to_numpy())
    elif path is not None and path.suffix in (".parquet", ".pq"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(sys.stdout if path is None else path, index=False, float_format="%.6g")


class Predictor:
    """Raw input file in, named output columns out, for a checkpoint or an MLflow model: a
    table's model takes named columns, the others rows of numbers."""

    def __init__(self, ref: str) -> None:
        self.ref, self.encoding, self.names, self.width = ref, None, {}, None
        self.columns = False  # an MLflow model whose signature names columns
        if ref.endswith(".ckpt") or Path(ref).is_file():
            self.load_checkpoint(ref)
        else:
            self.load_mlflow_model(ref)

    def load_checkpoint(self, ref: str) -> None:
        if not Path(ref).is_file():
            raise UserError(f"checkpoint {ref} does not exist")
        from mlplab.safety import metadata

        try:
            task = metadata.load_module(ref)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
            raise UserError(
                f"{ref} is not an mlplab checkpoint ({type(err).__name__}: {err})"
            ) from None
        # written before mlplab named outputs: at least a classifier's classes are numbered
        self.names = metadata.outputs(ref) or described_outputs(None, task)
        self.width = task.hparams.get("num_features")
        if self.names.get("encoding"):
            from mlplab.data.columns import ColumnEncoding

            self.encoding = ColumnEncoding.from_dict(self.names["encoding"])
        from mlplab.serving import inference_module

        module = inference_module(task)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()

        self.run = run

    def load_mlflow_model(self, ref: str) -> None:
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        from mlplab.tracking.store import open_store, resolve_tracking_uri

        # a registered (`models:/`) or run's (`runs:/`) model needs the store; a folder does not
        uri = open_store() if ref.startswith(("models:/", "runs:/")) else resolve_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            model = mlflow.pyfunc.load_model(ref)
        except (MlflowException, OSError) as err:
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"cannot load model {ref}: {first_line}") from None
        schema = model.metadata.get_input_schema()
        self.columns = schema is not None and not schema.is_tensor_spec()
        self.required = schema.required_input_names() if self.columns else []
        if schema is not None and schema.is_tensor_spec():
            self.width = schema.inputs[0].shape[-1]
        self.names = (model.metadata.metadata or {}).get("mlplab", {})
        self.model = model
        self.run = lambda x: np.asarray(model.predict(x))

    def __call__(self, path: Path) -> pd.DataFrame:
        if self.encoding is not None:  # a table's checkpoint: encode as training did
            from mlplab.data.columns import EncodingError

            try:
                x = self.encoding.encode(read_rows(path))
            except EncodingError as err:
                raise UserError(f"{path}: {err}") from None
            return self.encoding.decode(self.run(x))
        if self.columns:  # a table's MLflow model: named columns both ways
            from mlflow.exceptions import MlflowException

            rows = read_rows(path)
            absent = [name for name in self.required if name not in rows.columns]
            if absent:  # MLflow's own message quotes the rows, cut off
                raise UserError(
                    f"{path}: missing column(s) {', '.join(map(repr, absent))}; the model "
                    f"takes {', '.join(map(repr, self.required))}"
                )  # the words `ColumnEncoding` has for a checkpoint
            try:
                return self.model.predict(rows)
            except (MlflowException, ValueError) as err:
                reason = str(err).strip().splitlines()[0]
                raise UserError(f"{path}: the model cannot take these rows ({reason})") from None
        x = read_features(path)
        if self.width is not None and x.shape[1] != self.width:
            raise UserError(
                f"{path} has {x.shape[1]} features per row but the model takes {self.width}"
            )
        from mlplab.data.columns import named_outputs

        outputs = self.run(x).reshape(len(x), -1)
        return named_outputs(outputs, self.names.get("class_names"), self.names.get("target_names"))


def predict_file(model: str, input_path: Path, output_path: Path | None) -> pd.DataFrame:
    if output_path is not None:
        output_folder(output_path)  # a folder or an unwritable place: said before the work
    frame = Predictor(model)(input_path)
    write_frame(frame, output_path)
    return frame


def main(argv: list[str]) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = CommandParser(
        prog="mlplab predict", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint path or MLflow model URI")
    parser.add_argument(
        "--input", required=True, type=Path,
        help="raw inputs: CSV or NPY of numbers; for a model trained on a table, a table with "
        "the named columns (CSV, Parquet, ...)",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=Path, help="CSV, Parquet or NPY to write (default: CSV on stdout)"
    )
    add_weights_only_argument(parser)
    args = parser.parse_args(argv)
    trust_from_arguments(args)
    try:
        predict_file(args.model, args.input, args.output)
    except UserError as err:
        parser.exit(2, f"mlplab predict: error: {err}\n")
    if args.output is not None:
        print(f"mlplab: wrote predictions to {args.output}", file=sys.stderr)
