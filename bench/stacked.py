"""`make bench-stack`: stacked trials (`--stack`) against the same trials one by one.

1. xor     the 100-seed sweep of configs/xor_relu.yaml stacked, end to end (`mlplab sweep ...
           --stack 100`, a process with its store), against one plain `mlplab fit` of that
           config, timed before and after it (target: at most 2x);
2. search  a 32-trial learning-rate search on moons (random sampler, seed 0, no pruner, 20
           epochs: the same 32 trials both ways), `--stack 32` against one trial at a time
           (target: at least 8x faster), and the trials alone: from the first trial's
           start to the last trial's end in each search's Optuna storage;
3. mnist   8 seeds of configs/mnist.yaml as one stack, in-process, against one unstacked fit:
           the seconds per trial and epoch (target: at most 0.9x), at the config's one thread,
           then with every core for both, then each at its fastest (the stack on every core,
           one fit on the config's one thread); on a GPU (`make gpu-check`: `--only mnist
           --trials 64 --accelerator gpu`, target: at most 0.1x).

`--only writes`: 100 XOR trials built, trained and written as child runs, each phase timed.

Ratios come from one run on one machine: the seconds drift with the machine, the ratios less.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLPLAB = [sys.executable, "-m", "mlplab"]
QUIET = ["--log_system_metrics=false"]


def store(folder: Path) -> str:
    """The tracking URI of a command timed in `folder`."""
    return f"sqlite:///{folder}/mlruns/mlflow.db"


def timed(command: list[str], folder: Path) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store(folder)}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench: {' '.join(command[2:])} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def xor(folder: Path) -> tuple[str, float, float, float]:
    config = str(ROOT / "configs" / "xor_relu.yaml")
    seeds = ",".join(str(i) for i in range(100))
    sweep = [*MLPLAB, "sweep", "--config", config, "--grid", f"seed_everything=[{seeds}]",
             "--stack", "100", *QUIET]  # fmt: skip
    fit = [*MLPLAB, "fit", "--config", config, *QUIET]
    before = timed(fit, folder / "fit1")
    stacked = timed(sweep, folder / "sweep")
    after = timed(fit, folder / "fit2")
    one = (before + after) / 2
    return "xor: 100 seeds stacked / one fit", stacked, one, stacked / one


def search(folder: Path) -> list[tuple[str, float, float, float]]:
    folder.mkdir(parents=True, exist_ok=True)
    space = folder / "space.yaml"
    space.write_text("model.lr: {low: 1.0e-4, high: 0.1, log: true}\n")
    command = [*MLPLAB, "search", "--config", str(ROOT / "configs" / "moons.yaml"),
               "--space", str(space), "--metric", "val/acc", "--n_trials", "32",
               "--sampler", "{name: random, seed: 0}", "--pruner", "none",
               "--trainer.max_epochs=20", *QUIET]  # fmt: skip
    stacked = timed([*command, "--stack", "32"], folder / "stacked")
    alone = timed(command, folder / "alone")
    spans = trials_span(folder / "stacked"), trials_span(folder / "alone")
    return [("moons: 32-trial search, stacked / one by one", stacked, alone, stacked / alone),
            ("moons: its 32 trials (first start to last end, Optuna)", *spans,
             spans[0] / spans[1])]  # fmt: skip


def trials_span(folder: Path) -> float:
    """Seconds from the search's first trial's start to its last trial's end, as its Optuna
    storage records them: the trials without the imports, store and model both sides pay."""
    sys.path.insert(0, str(ROOT / "src"))
    import optuna

    from mlplab.commands.search.study import default_storage

    storage = default_storage(store(folder))
    (name,) = optuna.study.get_all_study_names(storage)
    trials = [t for t in optuna.load_study(study_name=name, storage=storage).trials
              if t.state.is_finished()]  # fmt: skip
    start = min(t.datetime_start for t in trials)
    return (max(t.datetime_complete for t in trials) - start).total_seconds()


def mnist(data_dir: str, size: int = 8, accelerator: str = "cpu",
          threads: int = 1) -> tuple[str, float, float, float]:  # fmt: skip
    os.environ["MLPLAB_DATA_DIR"] = data_dir
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from mlplab.cli import MLPLabCLI
    from mlplab.speed.stacked import StackedFit, build

    base = ["--config", str(ROOT / "configs" / "mnist.yaml"), "--trainer.max_epochs=2",
            "--trainer.callbacks=[]", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--test_after_fit=false", f"--trainer.accelerator={accelerator}",
            f"--num_threads={threads}"]  # fmt: skip
    trials = [build([*base, f"--seed_everything={seed}"]) for seed in range(size)]
    torch.set_num_threads(threads)  # as the CLI sets them (`num_threads`) for either
    fit = StackedFit(trials)
    start = time.perf_counter()
    fit.run()
    stacked = (time.perf_counter() - start) / 2 / len(trials)
    cli = MLPLabCLI(args=[*base, "--seed_everything=0"], run=False)
    cli.datamodule.setup("fit")  # data read before the clock, as the stack's was
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    alone = (time.perf_counter() - start) / 2
    where = f"{threads} thread{'s' if threads > 1 else ''}" if accelerator == "cpu" else "gpu"
    torch.set_num_threads(1)  # as the benches after it expect
    name = f"mnist ({where}): s per trial-epoch, {size} stacked / one fit"
    return name, stacked, alone, stacked / alone


def writes(folder: Path) -> tuple[str, float, float, float]:
    """100 XOR trials built, trained as one stack and written as child runs (params, metrics,
    datasets, config, checkpoints): the seconds a
    trial costs each phase (printed), and the writes against the training."""
    sys.path.insert(0, str(ROOT / "src"))
    from mlflow.tracking import MlflowClient

    from mlplab.speed.stacked import Builder, StackedFit
    from mlplab.tracking import trial_runs
    from mlplab.tracking.logger import dataset_inputs
    from mlplab.tracking.store import ensure_experiment, open_store

    builder = Builder()
    start = time.perf_counter()
    trials = [builder.build(["--config", str(ROOT / "configs" / "xor_relu.yaml"),
                             f"--seed_everything={seed}"]) for seed in range(100)]  # fmt: skip
    built = time.perf_counter()
    records = StackedFit(trials).run()
    trained = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    uri = open_store(f"sqlite:///{folder}/mlflow.db")
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, "xor_relu", uri)
    inputs = dataset_inputs(trials[0].datamodule)
    opened = time.perf_counter()
    for i, (trial, record) in enumerate(zip(trials, records, strict=True)):
        trial_runs.write(client, experiment, trial, record, f"seed {i}", {}, inputs,
                         "FINISHED", "xor_relu", uri)  # with its checkpoints, as a sweep's
    written = time.perf_counter()
    values = sum(len(r.metrics) for r in records)
    print(f"writes: build {(built - start) * 10:.0f} ms a trial, train {trained - built:.1f} s "
          f"for all, write {(written - opened) * 10:.0f} ms a child ({values} metric values)",
          flush=True)  # fmt: skip
    return "xor: writing 100 children / training them", written - opened, trained - built, (
        written - opened) / (trained - built)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", choices=["xor", "search", "mnist", "writes"], action="append")
    parser.add_argument("--trials", type=int, default=8, help="mnist: trials in the stack")
    parser.add_argument("--accelerator", default="cpu", help="mnist: cpu, or gpu (bench/gpu.sh)")
    parser.add_argument(
        "--data_dir",
        default=os.environ.get("MLPLAB_DATA_DIR", str(ROOT.parent / "shared" / "datasets")),
    )
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI built in-process reads its own arguments only
    chosen = args.only or ["xor", "search", "mnist"]
    print(f"{'what':58} {'stacked':>9} {'alone':>9} {'ratio':>7}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for part in chosen:
            rows = {
                "xor": lambda: xor(folder / "xor"),
                "search": lambda: search(folder / "search"),
                "mnist": lambda: mnist(args.data_dir, args.trials, args.accelerator),
                "writes": lambda: writes(folder / "writes"),
            }[part]()
            for name, stacked, alone, ratio in rows if isinstance(rows, list) else [rows]:
                print(f"{name:58} {stacked:9.2f} {alone:9.2f} {ratio:7.2f}", flush=True)
            if part == "mnist" and args.accelerator == "cpu" and (os.cpu_count() or 1) > 1:
                # every core for both: a stack's products are large enough to share out
                row = mnist(args.data_dir, args.trials, "cpu", os.cpu_count())
                print(f"{row[0]:58} {row[1]:9.2f} {row[2]:9.2f} {row[3]:7.2f}", flush=True)
                # each at its fastest: the stack on every core, one fit at the config's thread
                best = f"mnist: {args.trials} stacked on {os.cpu_count()} threads / one fit on 1"
                print(f"{best:58} {row[1]:9.2f} {alone:9.2f} {row[1] / alone:7.2f}", flush=True)


if __name__ == "__main__":
    main()
