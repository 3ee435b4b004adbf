"""Predictions to files: from a config's data (LightningCLI) or from a CSV/NPY file.

`mlplab predict --model MODEL --input FILE [--output FILE]` loads MODEL (a Lightning checkpoint,
or an MLflow model URI such as `runs:/<id>/model` or `models:/<name>/<version>`), reads raw
features from FILE (CSV with or without a header, or NPY) and writes the model's outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from mlplab.errors import UserError


class PredictionWriter(BasePredictionWriter):
    """Write everything `trainer.predict` returns to one CSV file."""

    def __init__(self, path: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        outputs = torch.cat([torch.as_tensor(p) for p in predictions]).flatten(1).cpu().numpy()
        write_array(outputs, self.path)
        print(f"mlplab: wrote {len(outputs)} predictions to {self.path}")


def read_features(path: Path) -> np.ndarray:
    """Rows of numeric features, (N, F) float32, from CSV (header optional) or NPY."""
    if not path.is_file():
        raise UserError(f"input file {path} does not exist (or is not a file)")
    if path.suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{path} is not a numeric .npy array ({reason})") from None
        if x.dtype.kind not in "biuf":
            raise UserError(f"{path} holds {x.dtype} values; numbers are needed")
        if x.ndim == 0:
            raise UserError(f"{path} holds a single number; one row of features per sample")
    else:
        import pandas as pd

        try:
            frame = pd.read_csv(path, header=None)
        except pd.errors.EmptyDataError:
            raise UserError(f"{path} is empty: write one row of features per line") from None
        except pd.errors.ParserError as err:
            reason = str(err).strip().splitlines()[-1]
            raise UserError(f"{path} is not a table of features ({reason})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a text CSV file; give CSV or .npy") from None
        if len(frame) and not _is_numeric_row(frame.iloc[0]):
            frame = frame.iloc[1:]  # a header row
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


def _is_numeric_row(row) -> bool:
    """False for a header: some cell is text that is not a number (an empty or `nan` cell is a
    missing number, reported as such, not a header)."""
    import pandas as pd

    return not (pd.to_numeric(row, errors="coerce").isna() & row.notna()).any()


def write_array(outputs: np.ndarray, path: Path | None) -> None:
    """CSV (one row per input, `output_0..`) or NPY by the file's suffix; CSV to stdout if None."""
    if path is not None and path.suffix == ".npy":
        np.save(path, outputs)
        return
    header = ",".join(f"output_{i}" for i in range(outputs.shape[1]))
    target = sys.stdout if path is None else path
    np.savetxt(target, outputs, delimiter=",", header=header, comments="", fmt="%.6g")


def load_predictor(ref: str) -> tuple[Callable[[np.ndarray], np.ndarray], int | None]:
    """A function from raw features (N, F) to outputs, and F, for a checkpoint or MLflow URI."""
    if ref.endswith(".ckpt") or Path(ref).is_file():
        if not Path(ref).is_file():
            raise UserError(f"checkpoint {ref} does not exist")
        from mlplab.models.tasks import Task

        try:
            task = Task.from_checkpoint(ref)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
            raise UserError(
                f"{ref} is not an mlplab checkpoint ({type(err).__name__}: {err})"
            ) from None
        module = task.inference_module()

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()

        return predict, task.hparams.num_features
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from mlplab.store import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(ref)
    except (MlflowException, OSError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load model {ref}: {first_line}") from None
    schema = model.metadata.get_input_schema()
    width = schema.inputs[0].shape[-1] if schema is not None and schema.is_tensor_spec() else None
    return (lambda x: np.asarray(model.predict(x))), width


def predict_file(model: str, input_path: Path, output_path: Path | None) -> np.ndarray:
    x = read_features(input_path)
    predict, width = load_predictor(model)
    if width is not None and x.shape[1] != width:
        raise UserError(
            f"{input_path} has {x.shape[1]} features per row but the model takes {width}"
        )
    outputs = predict(x).reshape(len(x), -1)
    write_array(outputs, output_path)
    return outputs


def main(argv: list[str]) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = argparse.ArgumentParser(
        prog="mlplab predict", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint path or MLflow model URI")
    parser.add_argument("--input", required=True, type=Path, help="CSV or NPY of raw features")
    parser.add_argument("--output", type=Path, help="CSV or NPY to write (default: stdout CSV)")
    args = parser.parse_args(argv)
    try:
        predict_file(args.model, args.input, args.output)
    except UserError as err:
        parser.exit(2, f"mlplab predict: error: {err}\n")
    if args.output is not None:
        print(f"mlplab: wrote predictions to {args.output}", file=sys.stderr)
