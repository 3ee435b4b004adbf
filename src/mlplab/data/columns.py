"""Named columns in and out: a table's raw rows become the network's inputs, its outputs become
columns people read (the predicted class by name, each class's probability, named targets).

`ColumnEncoding` is fitted on a training split and kept as plain data (a dict, stored in
checkpoints and in the logged model's config), so training, `mlplab predict` and the served
model apply one mapping. MLflow loads this file as a model from code
(`mlflow.pyfunc.save_model(python_model=<this file>)`): it imports only numpy, pandas, torch and
mlflow, so serving needs no mlplab and unpickles nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from mlflow.types.type_hints import TypeFromExample


class EncodingError(ValueError):
    """Rows the encoding cannot take (a missing column, a missing value, text for a number)."""


def row_of(frame: pd.DataFrame, position: int) -> int:
    """A row as its file counts it (1-based, header not counted): a split keeps the labels of
    the rows it took from the file; other frames count by position."""
    label = frame.index[position]
    return int(label) + 1 if isinstance(label, int | np.integer) else int(position) + 1


def shown(value, limit: int = 40) -> str:
    """A cell as a message quotes it: a number as written, else its repr, cut to `limit`."""
    text = str(value) if isinstance(value, float | int | np.number) else repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]}"


class ColumnEncoding:
    """Numeric features as they are (float32), categorical ones one-hot over the categories the
    training split has (an unseen category is all zeros, as scikit-learn's
    `OneHotEncoder(handle_unknown="ignore")`). `fill` holds a value per column where missing
    values are imputed (training medians or means, the most frequent category); without one a
    missing value is an error."""

    def __init__(
        self,
        features: list[dict],
        class_names: list[str] | None = None,
        target_names: list[str] | None = None,
    ) -> None:
        self.features = features  # [{"name", "categories": list | None, "fill": value | None}]
        self.class_names = class_names
        self.target_names = target_names

    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        features: list[str],
        categorical: list[str],
        impute: str | None = None,
    ) -> ColumnEncoding:
        """Categories and fill values of `frame`'s columns (the training rows)."""
        specs = []
        for name in features:
            column = frame[name]
            if name in categorical:
                text = column.dropna().astype(str)
                spec = {"name": name, "categories": sorted(text.unique().tolist())}
                spec["fill"] = text.mode().iloc[0] if impute and len(text) else None
            else:
                spec = {"name": name, "categories": None, "fill": None}
                if impute:
                    spec["fill"] = float(getattr(column, impute)())
            specs.append(spec)
        return cls(specs)

    @classmethod
    def from_dict(cls, data: dict) -> ColumnEncoding:
        return cls(data["features"], data.get("class_names"), data.get("target_names"))

    def to_dict(self) -> dict:
        return {
            "features": self.features,
            "class_names": self.class_names,
            "target_names": self.target_names,
        }

    @property
    def columns(self) -> list[str]:
        return [spec["name"] for spec in self.features]

    @property
    def width(self) -> int:
        """How many inputs the network takes: one per numeric column, one per category."""
        return sum(
            len(s["categories"]) if s["categories"] is not None else 1 for s in self.features
        )

    @property
    def input_names(self) -> list[str]:
        """The network's inputs by name (`colour=red` for a category)."""
        names = []
        for spec in self.features:
            cats = spec["categories"]
            names += [spec["name"]] if cats is None else [f"{spec['name']}={c}" for c in cats]
        return names

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """(N, width) float32 inputs from raw rows, written column by column into one array."""
        absent = [name for name in self.columns if name not in frame.columns]
        if absent:
            raise EncodingError(
                f"missing column(s) {', '.join(map(repr, absent))}; the model takes "
                f"{', '.join(map(repr, self.columns))}"
            )
        x = np.zeros((len(frame), self.width), dtype=np.float32)
        at = 0
        for spec in self.features:
            name, cats, fill = spec["name"], spec["categories"], spec["fill"]
            column = frame[name]
            missing = column.isna()
            if missing.any():
                if fill is None:
                    raise EncodingError(
                        f"column {name!r} has {int(missing.sum())} missing value(s) in "
                        f"{len(frame)} rows (data row {row_of(frame, missing.argmax())}); drop "
                        "those rows, or train with data.impute"
                    )
                column = column.fillna(fill)
            if cats is None:
                values = pd.to_numeric(column, errors="coerce")
                text = values.isna() & column.notna()
                if text.any():
                    raise EncodingError(
                        f"column {name!r} holds text ({column[text].iloc[0]!r}) where the model "
                        "takes numbers; declare it in data.categorical to encode it"
                    )
                with np.errstate(over="ignore"):  # overflow is refused below, by its cell
                    x[:, at] = values.to_numpy(dtype=np.float32)
                infinite = np.flatnonzero(~np.isfinite(x[:, at]))
                if len(infinite):
                    first = infinite[0]
                    raise EncodingError(
                        f"column {name!r} is not a finite float32 at data row "
                        f"{row_of(frame, first)} ({shown(column.iloc[first])}); "
                        "fix or drop the row (float32 holds magnitudes up to 3.4e38)"
                    )
                at += 1
            else:
                codes = pd.Categorical(column.astype(str), categories=cats).codes
                known = codes >= 0  # -1: a category the training split did not have
                x[np.flatnonzero(known), at + codes[known]] = 1.0
                at += len(cats)
        return x

    def decode(self, outputs: np.ndarray) -> pd.DataFrame:
        return named_outputs(outputs, self.class_names, self.target_names)


def named_outputs(
    outputs: np.ndarray, class_names: list[str] | None = None, target_names: list[str] | None = None
) -> pd.DataFrame:
    """A classifier's outputs as `predicted` (the class name) and `prob_<class>` per class (a
    binary classifier's single unit is P(second class)); a regressor's as its target names;
    unnamed, `output_<i>`."""
    outputs = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    if class_names is not None:
        if outputs.shape[1] == 1 and len(class_names) == 2:
            outputs = np.hstack([1.0 - outputs, outputs])
            best = (outputs[:, 1] > 0.5).astype(np.int64)
        else:
            best = outputs.argmax(axis=1)
        frame = pd.DataFrame({"predicted": np.asarray(class_names, dtype=object)[best]})
        for i, name in enumerate(class_names):
            frame[f"prob_{name}"] = outputs[:, i]
        return frame
    names = target_names or [f"output_{i}" for i in range(outputs.shape[1])]
    return pd.DataFrame(outputs, columns=names)


class ColumnModel(PythonModel):
    """The MLflow Model of a table-trained task: a DataFrame of raw named columns in, named
    columns out. The network (`artifacts["network"]`, an MLflow PyTorch model saved with
    `torch.export`) carries standardisation; the encoding is the model's `model_config`."""

    def load_context(self, context) -> None:
        import mlflow.pytorch

        self.encoding = ColumnEncoding.from_dict(context.model_config)
        self.network = mlflow.pytorch.load_model(context.artifacts["network"])

    def predict(self, context, model_input: TypeFromExample, params=None):
        import torch

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        with torch.no_grad():
            outputs = self.network(torch.from_numpy(self.encoding.encode(frame)))
        return self.encoding.decode(outputs.numpy())


set_model(ColumnModel())
