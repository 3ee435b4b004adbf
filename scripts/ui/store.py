"""A small MLflow store as a new user makes one, and what a user must find in it.

    python scripts/ui/store.py build FOLDER   # two xor fits, a moons fit, a 2-point xor sweep
    python scripts/ui/store.py check URI      # the problems, one per line (exit 1 if any)

`problems` is what `scripts/ui/check.py` asserts in a browser, read through MLflow's client
API, so that CI (no browser) checks the same store: every logged model loads and has a
signature; no param is bookkeeping (run name, store, experiment) or a store path; test metrics
sit at the step of the checkpoint that made them, which is the best epoch, and the logged
model's test metrics name the test dataset; every run records its git commit, user and source;
a sweep parent names its best child, and its children differ only in what the grid sets.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MLPLAB = Path(sys.executable).parent / "mlplab"
# short runs: the store is for looking at, not for results
FITS = [
    ["--config", "configs/xor.yaml", "--trainer.max_epochs", "20"],
    ["--config", "configs/xor.yaml", "--trainer.max_epochs", "20"],
    ["--config", "configs/moons.yaml", "--trainer.max_epochs", "20"],
]
SWEEP = ["configs/xor.yaml", "model.lr=[0.02,0.1]", "20"]
BOOKKEEPING = ("run_name", "tracking_uri", "experiment_name")
PROVENANCE = ("mlflow.source.git.commit", "mlflow.user", "mlflow.source.name")


def store_uri(folder: Path) -> str:
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def build(folder: Path, fits: list = FITS, sweep: list = SWEEP) -> str:
    """The store in `folder` (made afresh by `mlplab` commands run there): `fits` (each one fit's
    arguments) and `sweep` (config, grid, epochs); returns its URI."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    uri = store_uri(folder)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}

    def mlplab(*args: str) -> None:
        # configs by absolute path: the commands run in `folder`, which keeps their files
        args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
        subprocess.run([str(MLPLAB), *args], cwd=folder, env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip

    for args in fits:
        mlplab("fit", *args)
    config, grid, epochs = sweep
    mlplab("sweep", "--config", config, "--grid", grid, "--trainer.max_epochs", epochs)
    return uri


def runs(client) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


def problems(uri: str) -> list[str]:
    """What a user would trip over in the store at `uri`, one line each ([]: none)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    found: list[str] = []
    every = runs(client)
    if not every:
        return [f"{uri}: no runs"]
    store = str(Path(uri.removeprefix("sqlite:///")).parent)
    parents = [r for r in every if "mlplab.best_child_name" in r.data.tags]
    children = {r.info.run_id for r in every if "mlflow.parentRunId" in r.data.tags}
    for run in every:
        name = run.info.run_name
        for key in BOOKKEEPING:
            if key in run.data.params:
                found.append(f"run {name}: param {key} is bookkeeping, not a setting")
        for key, value in run.data.params.items():
            if store in value:
                found.append(f"run {name}: param {key} holds the store's path")
        for tag in PROVENANCE:
            if not run.data.tags.get(tag):
                found.append(f"run {name}: no {tag} tag")
        if run in parents:
            continue
        found += model_problems(client, run)
    for parent in parents:
        found += sweep_problems(client, parent, [r for r in every if r.info.run_id in children])
    return found


def model_problems(client, run) -> list[str]:
    """A fit's logged model: loads, has a signature, is the run's output at the tested
    checkpoint's step; its test metrics there, linked to the test dataset; that step is the
    best epoch by the checkpoint's metric."""
    import mlflow

    name = run.info.run_name
    outputs = run.outputs.model_outputs if run.outputs else []
    if len(outputs) != 1:
        return [f"run {name}: {len(outputs)} logged models (one: the best checkpoint's)"]
    model_id, step = outputs[0].model_id, outputs[0].step
    found = []
    try:
        mlflow.set_tracking_uri(client.tracking_uri)
        model = mlflow.pyfunc.load_model(f"models:/{model_id}")
        if model.metadata.get_input_schema() is None:
            found.append(f"run {name}: its model {model_id} has no signature")
    except Exception as error:  # whatever MLflow raises, it is the finding
        found.append(f"run {name}: its model {model_id} does not load ({error})")
    tests = {k for k in run.data.metrics if k.startswith("test/")}
    if not tests:
        found.append(f"run {name}: no test metrics")
    for key in sorted(tests):
        steps = {m.step for m in client.get_metric_history(run.info.run_id, key)}
        if steps != {step}:
            found.append(f"run {name}: {key} at steps {sorted(steps)}, its model at {step}")
    monitor = run.data.params.get("checkpoint.monitor", "val/loss")
    history = client.get_metric_history(run.info.run_id, monitor)
    if history:
        sign = -1 if run.data.params.get("checkpoint.mode") == "max" else 1
        best = min(history, key=lambda m: (sign * m.value, m.step))  # the first best is kept
        if best.step != step:
            found.append(f"run {name}: its model is at step {step}, the best {monitor} at "
                         f"{best.step}")  # fmt: skip
    test_set = split_dataset(run, "test")
    linked = {m.key: m.dataset_name for m in client.get_logged_model(model_id).metrics or []}
    for key in sorted(tests):
        if linked.get(key) != test_set:
            found.append(f"run {name}: its model's {key} is linked to {linked.get(key)!r}, "
                         f"not the test set {test_set!r}")  # fmt: skip
    return found


def split_dataset(run, split: str) -> str | None:
    """The name of the run's dataset input for `split` (its `mlflow.data.context` tag)."""
    for given in run.inputs.dataset_inputs if run.inputs else []:
        if {t.key: t.value for t in given.tags}.get("mlflow.data.context") == split:
            return given.dataset.name
    return None


def sweep_problems(client, parent, children: list) -> list[str]:
    """A sweep parent names its best child, and its children differ only where the grid says."""
    name = parent.info.run_name
    mine = [c for c in children if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    best = parent.data.tags["mlplab.best_child_name"]
    found = []
    if best not in {c.info.run_name for c in mine}:
        found.append(f"sweep {name}: its best child {best!r} is none of its children")
    if len(mine) > 1:
        keys = set().union(*(c.data.params for c in mine))
        differ = {k for k in keys if len({c.data.params.get(k) for c in mine}) > 1}
        swept = {k.removeprefix("sweep.grid.") for k in parent.data.params
                 if k.startswith("sweep.grid.")}  # fmt: skip
        if "config" not in swept and differ - swept:  # a config file sets what it likes
            found.append(f"sweep {name}: children differ in {sorted(differ - swept)}, "
                         f"not only in the grid's {sorted(swept)}")  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/ui/store.py", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["build", "check"])
    parser.add_argument("where", help="build: a folder; check: a tracking URI")
    args = parser.parse_args(argv)
    if args.action == "build":
        print(build(Path(args.where)))
        return 0
    found = problems(args.where)
    print("\n".join(found) or "no problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
