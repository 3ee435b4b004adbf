"""Where the MLflow store is, how it is laid out on disk, and the checks before a run opens it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An explicit URI, else `MLFLOW_TRACKING_URI`, else the project's SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def local_store_root(uri: str) -> Path | None:
    """The folder that holds a local store's database and run folders; None for a server."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative/path.db and sqlite:////absolute/path.db
        path = uri[len("sqlite:///") :]
        return Path(unquote(path)).parent if path and path != ":memory:" else None
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def folder_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "default"


def check_writable(root: Path) -> None:
    """A local store must be writable; say so before SQLite does it with a traceback."""
    from mlplab.errors import UserError

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the MLflow store folder {root} ({err.strerror}); "
            "choose a writable place with --tracking_uri or MLFLOW_TRACKING_URI"
        ) from None
    database = root / "mlflow.db"
    if not os.access(root, os.W_OK) or (database.exists() and not os.access(database, os.W_OK)):
        raise UserError(
            f"the MLflow store in {root} is not writable; fix its permissions or choose "
            "another store with --tracking_uri or MLFLOW_TRACKING_URI"
        )


def output_folder(path: Path) -> Path:
    """An output file's folder, created if missing; one line if it cannot be."""
    from mlplab.errors import UserError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the folder of {path} ({err.strerror})") from None
    return path


def check_reachable(tracking_uri: str | None) -> None:
    """A tracking server must answer now, not after minutes of retries (the CLI caps MLflow's
    HTTP retries and timeout; see `mlplab.cli.main`)."""
    from mlplab.errors import UserError

    uri = resolve_tracking_uri(tracking_uri)
    if urlparse(uri).scheme not in ("http", "https"):
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # connection refused, DNS, timeout, HTTP errors: all say the same
        reason = str(err).splitlines()[0][:200]
        raise UserError(
            f"the MLflow tracking server {uri} does not answer ({reason}); start it, or unset "
            "MLFLOW_TRACKING_URI to use the local store"
        ) from None


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it laid out as `MLflowLogger` lays out a local store
    (`<store>/<experiment>/`), whoever creates it first (fit, sweep or baseline; jobs starting
    together on a server race to create it: the losers take the winner's)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = local_store_root(tracking_uri)
    location = experiment_dir(name, tracking_uri).resolve().as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def experiment_dir(experiment_name: str, tracking_uri: str | None = None) -> Path:
    """Where the runs of an experiment keep their checkpoints: `<store>/<experiment>/`."""
    root = local_store_root(resolve_tracking_uri(tracking_uri))
    return (root if root is not None else Path("mlruns")) / folder_name(experiment_name)


@contextlib.contextmanager
def store_lock(root: Path | None):
    """Serialise opening a local store: the first client creates the SQLite tables, and
    processes starting together (DDP ranks, parallel runs) must not all try at once."""
    if root is None:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".mlplab.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_exists(tracking_uri: str | None, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    with store_lock(local_store_root(uri)):
        client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True
