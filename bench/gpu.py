"""`make gpu-check`'s benchmark: the MNIST seed MLP on one GPU, against a plain eager loop there.

The pairing of `make bench`: every contender epoch is timed right after one epoch of a plain
eager PyTorch loop on the same GPU (data and model on the device, batch 32), in the same
process, and reported as a ratio to it. Contenders:

1. mlplab      `mlplab fit --config configs/mnist.yaml` on the GPU: what a user gets (host
               tensors in pinned memory, chunks of 32 batches, MLflow, checkpoints);
2. on device   the same with `--data.on_device true` (the tensors on the GPU);
3. cuda graph  with `--data.on_device true --fast_path.cuda_graph true` (`mlplab.speed.cuda_graph`);
4. idiom       the usual Lightning template: torchvision's MNIST with `ToTensor` in a DataLoader.

Issue 19's targets, as ratios of one run: mlplab <= 1.1x the plain loop; the CUDA-graph option
3x faster than it (<= 0.33x). `--device cpu` runs the same harness on the CPU (the graph row left
out: it needs CUDA), to check the harness on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import warnings
from datetime import datetime, timezone

import torch
from bench import PlainLoop, lightning_idiom, mlplab_fit, parser_for, quiet_libraries, summary

TARGETS = {"mlplab": "<= 1.1x", "cuda graph": "<= 0.33x"}


def accelerator(device: str) -> str:
    """Lightning's name for the device."""
    return "gpu" if device == "cuda" else "cpu"


def contenders(device: str) -> dict[str, list[str]]:
    """Each mlplab contender's extra `mlplab fit` arguments."""
    on = ["--trainer.accelerator", accelerator(device)]
    runs = {"mlplab": on, "on device": [*on, "--data.on_device", "true"]}
    if device == "cuda":
        runs["cuda graph"] = [*runs["on device"], "--fast_path.cuda_graph", "true"]
    return runs


def machine(device: str) -> str:
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    return (
        f"{where}; {os.cpu_count()} CPU cores; Python {platform.python_version()}, torch "
        f"{torch.__version__}"
    )


def report(rows: dict, accuracy: dict, args: argparse.Namespace, command: str) -> str:
    lines = [
        f"MNIST seed MLP, batch 32, on {machine(args.device)}",
        f"`{command}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, epochs 2..{args.epochs}",
        "",
        "| contender | s/epoch | paired plain | ratio | range | target | val/acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (base, seconds, ratio, low, high) in rows.items():
        acc = f"{accuracy[name]:.4f}" if name in accuracy else ""
        lines.append(
            f"| {name} | {seconds:.3f} | {base:.3f} | {ratio:.2f}x | {low:.2f}-{high:.2f}x | "
            f"{TARGETS.get(name, '')} | {acc} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be at least 3: the first is warm-up")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench/gpu.py: error: no CUDA device here; run it on a GPU machine, or "
                    "with --device cpu to check the harness\n")  # fmt: skip
    command = " ".join(["python bench/gpu.py", *sys.argv[1:]])
    sys.argv = sys.argv[:1]  # the CLI runs below get their own arguments
    warnings.filterwarnings("ignore")
    quiet_libraries()
    store = f"sqlite:///{tempfile.mkdtemp(prefix='mlplab-bench-')}/mlflow.db"
    plain = PlainLoop(args.data_dir, device=args.device)

    rows, accuracy = {}, {}

    def say() -> str:  # after every contender: a run cut short keeps what it measured
        table = report(rows, accuracy, args, command)
        if args.out:
            with open(args.out, "w") as out:
                out.write(table)
        return table

    for name, extra in contenders(args.device).items():
        run = mlplab_fit(args.epochs, args.data_dir, store, plain, *extra)
        rows[name], accuracy[name] = summary(run["pairs"]), run["val/acc"]
        say()
    if not args.skip_idiom:
        pairs = lightning_idiom(args.epochs, args.data_dir, plain, accelerator(args.device))
        rows["idiom"] = summary(pairs)
    print(say())


if __name__ == "__main__":
    main()
