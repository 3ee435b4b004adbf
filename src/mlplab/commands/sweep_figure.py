"""The sweep parent's figure: every child's final training loss and metric, by group."""

from __future__ import annotations

import math


def final_values(groups: dict[str, list], metric: str):
    """A strip of each group's children (their last `train/loss` and `metric`), so a group
    split between a low loss and a stuck one shows as two clusters."""
    from matplotlib.figure import Figure

    keys = ["train/loss", metric] if metric != "train/loss" else [metric]
    figure = Figure(figsize=(4 + 1.2 * len(groups), 3.2 * len(keys)), layout="constrained")
    axes = figure.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        for i, runs in enumerate(groups.values()):
            values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
            spread = [i + 0.25 * math.sin(j * 2.399) for j in range(len(values))]  # no overlap
            ax.scatter(spread, values, s=12, alpha=0.6)
        positive = all(r.data.metrics.get(key, 1) > 0 for runs in groups.values() for r in runs)
        if key.endswith("loss") and positive:
            ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
        ax.set_ylabel(f"final {key}")
    axes[0].set_title(f"{sum(len(r) for r in groups.values())} children")
    return figure
