"""`mlplab runs --experiment NAME`: the experiment's runs as a table, from the MLflow store.

Columns: name, id, status, duration, the params that differ between the runs (the ones worth
comparing), and the val/ and test/ metrics. `--sort METRIC` orders by it, best first
(lowest first for losses and errors, as `mlplab.direction` says); `--format table|markdown|csv`.
"""

from __future__ import annotations

import argparse
import sys

from mlplab.direction import better
from mlplab.errors import CommandParser, UserError
from mlplab.tracking.store import open_store


def runs_table(experiment: str, tracking_uri: str | None = None, sort: str | None = None):
    """A pandas DataFrame, one row per run."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(open_store(tracking_uri))
    if mlflow.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in mlflow.search_experiments())
        raise UserError(f"no experiment {experiment!r} in the store (it has: {', '.join(names)})")
    frame = mlflow.search_runs(experiment_names=[experiment])
    if frame.empty:
        return pd.DataFrame()
    params = [c for c in frame.columns if c.startswith("params.")]
    varying = [c for c in params if frame[c].dropna().astype(str).nunique() > 1]
    metrics = sorted(
        c for c in frame.columns
        if c.startswith(("metrics.val/", "metrics.test/", "metrics.best/"))
        and not c.endswith("/samples")
    )  # fmt: skip
    table = pd.DataFrame(
        {
            "name": frame["tags.mlflow.runName"],
            "run_id": frame["run_id"].str[:8],
            "status": frame["status"],
            "duration_s": (frame["end_time"] - frame["start_time"]).dt.total_seconds().round(1),
        }
    )
    for column in varying:
        table[column.removeprefix("params.")] = frame[column]
    for column in metrics:
        table[column.removeprefix("metrics.")] = frame[column].round(4)
    if sort is not None:
        if sort not in table.columns:
            raise UserError(f"--sort {sort}: not a column (have: {', '.join(table.columns)})")
        ascending = sort in ("name", "status") or better(sort) == "min"
        table = table.sort_values(sort, ascending=ascending, na_position="last")
    return table.reset_index(drop=True)


def to_markdown(table) -> str:
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join("" if _missing(v) else str(v) for v in row) + " |"
            for row in table.itertuples(index=False)]  # fmt: skip
    return "\n".join([header, rule, *rows])


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="mlplab runs", description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--experiment", required=True, help="experiment name, e.g. mnist")
    parser.add_argument("--sort", help="a column, e.g. test/acc or duration_s")
    parser.add_argument("--format", choices=["table", "markdown", "csv"], default="table")
    parser.add_argument("--tracking_uri")
    args = parser.parse_args(argv)
    try:
        table = runs_table(args.experiment, args.tracking_uri, args.sort)
    except UserError as err:
        parser.exit(2, f"mlplab runs: error: {err}\n")
    if table.empty:
        print(f"no runs in experiment {args.experiment!r}")
    elif args.format == "csv":
        table.to_csv(sys.stdout, index=False)
    elif args.format == "markdown":
        print(to_markdown(table))
    else:
        print(table.to_string(index=False))
