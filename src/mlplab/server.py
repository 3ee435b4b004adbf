"""`mlplab server` (`make server`): an MLflow tracking server as clusters run one, on loopback.

PostgreSQL holds the runs when the OS has it (`initdb`, `pg_ctl`) and its driver is installed
(`pip install 'mlplab[server]'`), else SQLite; artifacts are proxied (`--artifacts-destination`),
so clients need no access to the artifact store. Everything lives in one folder (default
`mlruns/server/`), so stopping and starting again keeps every run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlplab.errors import CommandParser, UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the OS's `postgres` user."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


class PostgreSQL:
    """A PostgreSQL cluster in `folder`, listening on loopback only, trusting local users."""

    def __init__(self, folder: Path) -> None:
        self.data = folder / "pgdata"
        self.port = free_port()

    @staticmethod
    def available() -> str | None:
        """Why it cannot be used, or None."""
        if not (shutil.which("initdb") and shutil.which("pg_ctl")):
            return "PostgreSQL is not installed (no initdb/pg_ctl on PATH)"
        if importlib.util.find_spec("psycopg2") is None:
            return "its driver is missing: pip install 'mlplab[server]'"
        return None

    def start(self) -> str:
        """Start it (creating the cluster and database the first time); returns its URI."""
        fresh = not self.data.exists()
        if fresh:
            self.data.mkdir(parents=True)
            if os.geteuid() == 0:
                shutil.chown(self.data, "postgres", "postgres")
            self.run(["initdb", "-D", str(self.data), "-U", "mlflow", "--auth=trust"])
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data}"
        self.run(["pg_ctl", "-D", str(self.data), "-o", options, "-l",
                  str(self.data / "server.log"), "-w", "start"])  # fmt: skip
        if fresh:
            self.run(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow",
                      "mlflow"])  # fmt: skip
        return f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        self.run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def run(self, command: list[str]) -> None:
        result = subprocess.run(as_postgres(command), capture_output=True, text=True)
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip().splitlines()
            raise UserError(f"{command[0]} failed: {message[-1] if message else 'no output'}")


def main(argv: list[str]) -> None:
    parser = CommandParser(
        prog="mlplab server",
        description="An MLflow tracking server on loopback: PostgreSQL (when installed) or "
        "SQLite for the runs, proxied artifacts; Ctrl-C stops it.",
    )
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--root", type=Path, default=Path("mlruns/server"),
                        help="where the database and the artifacts are kept")  # fmt: skip
    parser.add_argument("--backend", choices=["auto", "postgresql", "sqlite"], default="auto")
    parser.add_argument("--workers", type=int, default=2, help="mlflow server's workers")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: a TCP port is 1 to 65535")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: at least 1")
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)

    database = None
    why_not = PostgreSQL.available() if args.backend != "sqlite" else "asked for SQLite"
    if why_not is None:
        database = PostgreSQL(root)
        backend = database.start()
    elif args.backend == "postgresql":
        raise UserError(f"cannot use PostgreSQL: {why_not}")
    else:
        backend = f"sqlite:///{root / 'mlflow.db'}"
        print(f"mlplab server: SQLite backend ({why_not})", file=sys.stderr)
    uri = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(args.port),
        "--backend-store-uri", backend, "--artifacts-destination", str(root / "artifacts"),
        "--workers", str(args.workers),
    ], start_new_session=True)  # its own process group: mlflow, uvicorn and the workers
    signal.signal(signal.SIGTERM, interrupt)  # stopped as by Ctrl-C
    try:
        wait_until_up(uri, server)
        kind = "PostgreSQL" if database else "SQLite"
        print(f"mlplab server: runs in {kind}, artifacts in {root / 'artifacts'}; use it with",
              f"export MLFLOW_TRACKING_URI={uri}", sep="\n", flush=True)
        server.wait()
    except KeyboardInterrupt:
        stop(server)
    finally:
        if database is not None:
            database.stop()


def interrupt(*_) -> None:
    raise KeyboardInterrupt


def stop(server: subprocess.Popen) -> None:
    """Stop mlflow server and every process it started; kill them if they linger."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def wait_until_up(uri: str, server: subprocess.Popen, timeout: float = 120) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UserError(f"mlflow server exited ({server.returncode}); its output above says "
                            "why (a port in use: choose another with --port)")  # fmt: skip
        try:
            if requests.get(f"{uri}/health", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise UserError(f"mlflow server did not answer at {uri} within {timeout:.0f} s")
