"""Which way a metric is better: the one rule behind every "best" mlplab picks (the checkpoint
`--checkpoint.monitor` keeps, `mlplab sweep`, `mlplab search`, `mlplab runs --sort`).

Lower is better when the name's last part (after the last `/`) has a word for a loss or an
error: `val/loss`, `val/mae`, `test/rmse`, `train/loss_epoch`, `val/error_rate`. Higher is
better for everything else: `val/acc`, `val/f1`, `val/r2`, `val/auroc`. For the metrics the
tasks log this agrees with torchmetrics' `higher_is_better`.
"""

from __future__ import annotations

import re
from typing import Literal

LOWER_IS_BETTER = frozenset(
    {"loss", "error", "err", "mae", "mse", "rmse", "msle", "mape", "smape", "nll",
     "perplexity", "wer", "cer"}
)  # fmt: skip


def better(metric: str) -> Literal["min", "max"]:
    """`min` if lower values of `metric` are better, else `max`."""
    words = re.split(r"[^a-z0-9]+", metric.rsplit("/", 1)[-1].lower())
    return "min" if LOWER_IS_BETTER.intersection(words) else "max"
