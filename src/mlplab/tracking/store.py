"""Where the MLflow store is, how it is laid out on disk, and the checks before a run opens it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An explicit URI, else `MLFLOW_TRACKING_URI`, else the project's SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


# a URL's `scheme://user:password@`: up to the last `@` before a query or fragment, so a password
# holding `@` or `/` goes whole, and an `@` in a query (`?x=a@b`) is no password
CREDENTIALS_IN_URL = re.compile(r"([A-Za-z][\w+.-]*://[^:@/?#\s]*):[^?#\s]*@")


def redact_uri(text: str | None) -> str | None:
    """A URI (or a message quoting one) as it may be recorded or printed: a password in it
    (`http://user:password@host`) replaced by `***`. Used wherever a tracking (or Optuna
    storage) URI lands: params, the logged config, a checkpoint's config, the journal, printed
    lines."""
    return CREDENTIALS_IN_URL.sub(r"\1:***@", text) if text else text


def without_redacted(uri: str) -> str:
    """A URI `redact_uri` left as `scheme://user:***@host`, as `scheme://host`: a client sends
    a URL's user:password before MLflow's MLFLOW_TRACKING_USERNAME/PASSWORD, and `***` is no
    password."""
    return re.sub(r"^([A-Za-z][\w+.-]*://)[^:@/?#\s]*:\*\*\*@", r"\1", uri)


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


def output_folder(path: Path) -> Path:
    """An output file's folder, created if missing; one line if it cannot be, or if the
    output is a folder."""
    from mlplab.errors import UserError

    if path.is_dir():
        raise UserError(f"{path} is a folder; give the path of the file to write in it")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the folder of {path} ({err.strerror})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path}: no write permission there; choose another place")
    return path


def open_store(tracking_uri: str | None = None) -> str:
    """The store's URI, once it is known to work: a URI MLflow can use, a local store that is
    writable and a complete SQLite database (made if missing), a server that answers now.
    Every command opens its store here first, so a mistake is one line before any run exists."""
    from mlplab.errors import UserError, refused

    uri = resolve_tracking_uri(tracking_uri)
    if redact_uri(uri) != uri:  # MLflow's "View run at URL" lines would print the password
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    scheme = urlparse(uri).scheme.split("+", 1)[0]  # postgresql+psycopg2: a driver named
    if scheme not in SCHEMES:
        raise UserError(
            f"tracking URI {redact_uri(uri)!r}: MLflow has no store for "
            f"{scheme or 'a plain path'}; use sqlite:///path/mlflow.db, or a server's "
            f"http(s)://host:port {URI_SOURCE}"
        )
    if scheme == "sqlite":
        database = sqlite_file(uri)
        check_writable(database)
        with store_lock(database.parent):
            create_sqlite_store(database)
    from mlflow.tracking import MlflowClient

    try:  # no lock: a SQLite store is whole by now, and MLflow makes no tables in it
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001  refused connection, DNS, HTTP, SQL: each one line
        said = refused(err)  # the server answered: no (or wrong) credentials
        if said is not None:
            raise UserError(said) from None
        reason = redact_uri(str(err).strip().splitlines()[0])[:200]  # MLflow's quote the URL
        if scheme in ("http", "https"):
            raise UserError(
                f"the MLflow tracking server {redact_uri(uri)} does not answer ({reason}); start "
                "it, or unset MLFLOW_TRACKING_URI to use the local store"
            ) from None
        raise UserError(f"cannot open the MLflow store {redact_uri(uri)}: {reason}") from None
    return uri


# the stores MLflow's client opens by URI scheme; anything else is a typo
SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file", "")
URI_SOURCE = "(--tracking_uri or MLFLOW_TRACKING_URI)"
SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_file(uri: str) -> Path:
    """`sqlite:///relative.db` or `sqlite:////absolute.db`; in-memory and malformed ones refused."""
    from mlplab.errors import UserError

    path = unquote(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:" or "?" in path:
        raise UserError(
            f"tracking URI {uri!r} names no database file: write sqlite:///relative/path.db or "
            f"sqlite:////absolute/path.db {URI_SOURCE}"
        )
    database = Path(path)
    if database.is_dir():
        raise UserError(
            f"the MLflow store {database} is a folder, not an SQLite database; name a file "
            f"{URI_SOURCE}"
        )
    if database.is_file() and database.stat().st_size:
        with open(database, "rb") as file:
            if file.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise UserError(
                    f"the MLflow store {database} is not an SQLite database; move it aside or "
                    f"name another file {URI_SOURCE}"
                )
    return database


def create_sqlite_store(database: Path) -> None:
    """A new store is built aside and moved into place in one step: an interrupt, a kill or a
    full disk while MLflow creates its ~40 tables leaves no half-made `mlflow.db` (on which
    every later command fails). One that an older start left half-made holds no runs: it is
    moved aside, said, and made again. Called under `store_lock`."""
    for stale in database.parent.glob(f".{database.name}.creating-*"):
        stale.unlink(missing_ok=True)  # a build a kill cut short (the lock says none runs now)
    if database.is_file() and database.stat().st_size:
        if sqlite_state(database) != "half-made":
            return  # complete, or runs inside: MLflow's check says what it needs, if anything
        names = (database.with_name(f"{database.name}.half-made-{n}") for n in range(1, 10**6))
        aside = next(name for name in names if not name.exists())
        os.replace(database, aside)
        print(f"mlplab: {database} was left half-made by an interrupted start (no runs in it); "
              f"moved to {aside.name}, a new store is made", file=sys.stderr)  # fmt: skip
    building = database.with_name(f".{database.name}.creating-{os.getpid()}")
    import logging

    # MLflow's internal store class: its public client would give the default experiment
    # `./mlruns` as artifact root (no public way to initialise a store: mlflow/mlflow#2113) and
    # cannot let go of the file before it is moved into place (mlflow/mlflow#2650)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # MLflow says "Creating initial MLflow database tables..." on its internal module's logger: no
    # public switch quiets one module of MLflow's
    quiet = [logging.getLogger(name) for name in ("alembic", "mlflow.store.db.utils")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:  # "Creating initial MLflow database tables..." and alembic's steps
            logger.setLevel(logging.WARNING)
        store = SqlAlchemyStore(f"sqlite:///{building.resolve()}", str(database.parent.resolve()))
        store.engine.dispose()
        os.replace(building, database)
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
        for leftover in database.parent.glob(f"{building.name}*"):  # the file and its journal
            leftover.unlink(missing_ok=True)


def sqlite_state(database: Path) -> str:
    """The state of an existing store: "complete" (MLflow made all its tables and the default
    experiment), "half-made" (an interrupted making: no runs in it), or "other" (runs inside;
    MLflow judges its schema)."""
    import sqlite3

    from mlplab.errors import UserError

    # read-write, though it only reads: a journal a killed writer left is rolled back first
    connection = sqlite3.connect(database, timeout=60)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        migrating = any(name.startswith("_alembic_tmp") for name in tables)
        if not migrating and {"alembic_version", "experiments"} <= tables:
            default = "SELECT 1 FROM experiments WHERE experiment_id = 0"
            if connection.execute(default).fetchone():
                return "complete"
        runs = "runs" in tables and connection.execute("SELECT 1 FROM runs LIMIT 1").fetchone()
        return "other" if runs else "half-made"
    except sqlite3.Error as err:  # locked for a minute, or damaged
        raise UserError(f"cannot read the MLflow store {database} ({err})") from None
    finally:
        connection.close()


def check_writable(database: Path) -> None:
    """A local store must be writable; say so before SQLite does it with a traceback."""
    from mlplab.errors import UserError

    root = database.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the MLflow store folder {root} ({err.strerror}); "
            f"choose a writable place {URI_SOURCE}"
        ) from None
    if not os.access(root, os.W_OK) or (database.exists() and not os.access(database, os.W_OK)):
        raise UserError(
            f"the MLflow store in {root} is not writable; fix its permissions or choose "
            f"another store {URI_SOURCE}"
        )


# the tag MLflow's UI reads (and its kind selector writes) to choose an experiment's first page
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it laid out as `MLflowLogger` lays out a local store
    (`<store>/<experiment>/`), whoever creates it first (fit, sweep or baseline; jobs starting
    together on a server race to create it: the losers take the winner's). Its kind says
    "model training" (`EXPERIMENT_KIND`): the UI opens on its runs, not on a GenAI overview."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = local_store_root(tracking_uri)
    location = experiment_dir(name, tracking_uri).resolve().as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
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

    from mlplab.errors import UserError, refused

    uri = resolve_tracking_uri(tracking_uri)
    with store_lock(local_store_root(uri)):
        client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        said = refused(err)  # a server that turns the client away has not said "no such run"
        if said is not None:
            raise UserError(said) from None
        return False
    return True
