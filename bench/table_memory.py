"""Memory and time of reading a large table: `python bench/table_memory.py [ROWS] [COLUMNS]`.

Writes a table of ROWS x COLUMNS (COLUMNS - 1 float features and an integer label) as CSV and
Parquet into a temporary folder, then loads each with `TableDataModule` in a fresh process and
prints the peak resident memory, the memory the split tensors hold, and the wall time.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def load(path: str) -> None:
    """In a fresh process: the peak memory over what the imports already took."""
    from mlplab.data import TableDataModule

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    data = TableDataModule(path=path, target="label").loaded()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = sum(t.numel() * t.element_size() for split in data.values() for t in split) / 2**20
    print(f"{Path(path).suffix:9} {seconds:6.1f} s  peak {peak - base:7.0f} MiB over the "
          f"imports ({base:.0f} MiB)  tensors {held:5.0f} MiB")


def main(rows: int, columns: int) -> None:
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(rows, columns - 1)),
                         columns=[f"x{i}" for i in range(columns - 1)])  # fmt: skip
    frame["label"] = rng.integers(0, 2, rows)
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / "t.csv", Path(folder) / "t.parquet"]
        frame.to_csv(paths[0], index=False)
        frame.to_parquet(paths[1], index=False)
        del frame
        print(f"{rows:,} rows x {columns} columns; CSV {paths[0].stat().st_size / 2**20:.0f} MiB, "
              f"Parquet {paths[1].stat().st_size / 2**20:.0f} MiB")
        for path in paths:
            subprocess.run([sys.executable, __file__, "--load", str(path)], check=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load"]:
        load(sys.argv[2])
    else:
        main(*(int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (1_000_000, 50))
