"""`mlplab server` (`make server`): an MLflow tracking server as clusters run one.

PostgreSQL holds the runs when the OS has it (`initdb`, `pg_ctl`) and its driver is installed
(`pip install 'mlplab[server]'`), else SQLite; artifacts are proxied (`--artifacts-destination`),
so clients need no access to the artifact store. Everything lives in one folder (default
`mlruns/server/`), so stopping and starting again keeps every run.

It listens on loopback unless `--host` says otherwise. Any other address (or `--auth`) runs
MLflow's basic-auth app: the admin's credentials come from `--credentials FILE` or
`MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD` (without them it refuses to start), are set
in the auth database before the server takes a request (whatever that database held, and never
MLflow's former default password), and are written nowhere else; MLflow's Host-header and CORS
checks are set for the names the address is reached by.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from mlplab.errors import CommandParser, UserError

# The admin password MLflow's basic-auth app once shipped in its basic_auth.ini (admin /
# password1234, CVE-2026-2635): public knowledge, so never a credential here.
MLFLOW_DEFAULT_PASSWORD = "password1234"
MIN_PASSWORD = 12  # MLflow's auth store refuses shorter passwords
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# what the server process is not handed: the client's credentials, and MLflow's own admin
# variables, which would override the auth config mlplab writes
SECRET_VARIABLES = (*CREDENTIAL_VARIABLES, "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_ADMIN_USERNAME",
                    "MLFLOW_AUTH_ADMIN_PASSWORD")  # fmt: skip
# names a client on this machine reaches loopback by, on any port (an SSH tunnel's too). MLflow
# matches a name with `*` as an fnmatch pattern (`[[]`: a literal `[`), any other one exactly
LOOPBACK_HOSTS = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[::1]", "[[]::1]:*"]


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
    """A PostgreSQL cluster in `folder`, listening on a Unix socket in its data folder only
    (mode 0700: only its owner, and root, get in), trusting who gets in. No TCP port: on a
    shared login node, other users could otherwise reach the runs past the tracking server."""

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
        options = f"-h '' -p {self.port} -k {self.data}"  # no TCP address; the socket's folder
        self.run(["pg_ctl", "-D", str(self.data), "-o", options, "-l",
                  str(self.data / "server.log"), "-w", "start"])  # fmt: skip
        if fresh:
            self.run(["createdb", "-h", str(self.data), "-p", str(self.port), "-U", "mlflow",
                      "mlflow"])  # fmt: skip
        return f"postgresql+psycopg2://mlflow@/mlflow?host={self.data}&port={self.port}"

    def stop(self) -> None:
        self.run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def run(self, command: list[str]) -> None:
        result = subprocess.run(as_postgres(command), capture_output=True, text=True)
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip().splitlines()
            raise UserError(f"{command[0]} failed: {message[-1] if message else 'no output'}")


def is_loopback(address: str) -> bool:
    """Whether only this machine reaches `address` (localhost, 127.0.0.0/8, ::1)."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def is_every_interface(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_unspecified  # 0.0.0.0 or ::
    except ValueError:
        return False


def authority(name: str, port: int | None = None) -> str:
    """`name[:port]` as it stands in a URL or a Host header (an IPv6 address in brackets)."""
    name = f"[{name}]" if ":" in name and not name.startswith("[") else name
    return f"{name}:{port}" if port else name


def reached_as(address: str, port: int, extra: list[str]) -> list[str]:
    """The `host:port`s clients on other machines reach the server by: the address itself, or,
    for every interface, this machine's names and addresses; then `--allowed_hosts`' names
    (a reverse proxy's), with and without the port."""
    names: list[str] = []
    if is_every_interface(address):
        host = socket.gethostname()
        names.append(host)
        with contextlib.suppress(OSError):
            names.append(socket.getfqdn(host))
            names += socket.gethostbyname_ex(host)[2]
    elif not is_loopback(address):
        names.append(address)
    found = [authority(name, port) for name in names if not is_loopback(name)]
    for name in extra:  # an IPv6 address in brackets, as in a URL
        has_port = re.fullmatch(r"(\[[^]]*\]|[^:\[\]]*):(\d+|\*)", name) is not None
        found += [name] if has_port else [authority(name), authority(name, port)]
    return list(dict.fromkeys(found))


def security_options(address: str, port: int, extra: list[str]) -> list[str]:
    """MLflow's Host-header check (DNS rebinding) and CORS check, set for the names the server
    is reached by, and its clickjacking header: browsers may use the UI only at those names
    (loopback ones, on any port, always: an SSH tunnel)."""
    names = reached_as(address, port, extra)
    hosts = LOOPBACK_HOSTS + [name.replace("[", "[[]") if "*" in name else name
                              for name in names]  # fmt: skip
    options = ["--allowed-hosts", ",".join(hosts), "--x-frame-options", "SAMEORIGIN"]
    if names:  # loopback origins MLflow allows itself
        origins = [f"{scheme}://{name}" for name in names for scheme in ("https", "http")]
        options += ["--cors-allowed-origins", ",".join(origins)]
    return options


def read_credentials(path: Path | None) -> tuple[str, str] | None:
    """The admin's (username, password): from `path` (`USERNAME:PASSWORD` on one line, or the
    two on two lines), else from `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`; None if
    neither gives any. A line names what is wrong, never the password."""
    if path is None:
        username, password = (os.environ.get(name, "") for name in CREDENTIAL_VARIABLES)
        if not username and not password:
            return None
        if not (username and password):
            raise UserError("set both MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                            "(or give --credentials FILE)")  # fmt: skip
        source = "MLFLOW_TRACKING_USERNAME/PASSWORD"
    else:
        source = f"--credentials {path}"
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            why = getattr(err, "strerror", None) or "not text"
            raise UserError(f"cannot read {source} ({why})") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):  # a cluster's group is often every user
            raise UserError(f"{source} is open to other users (mode {stat.S_IMODE(mode):04o}); "
                            f"`chmod 600 {path}` first")  # fmt: skip
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) == 1 and ":" in lines[0]:
            username, password = (part.strip() for part in lines[0].split(":", 1))
        elif len(lines) == 2:
            username, password = lines
        else:
            raise UserError(f"{source}: write USERNAME:PASSWORD on one line (or the username "
                            "and the password on two lines)")  # fmt: skip
    if not username or ":" in username or any(c.isspace() or not c.isprintable()
                                              for c in username):  # fmt: skip
        raise UserError(f"{source}: the username must be one word without ':'")
    if password == MLFLOW_DEFAULT_PASSWORD:
        raise UserError(f"{source}: that is the admin password MLflow once shipped "
                        "(public knowledge, CVE-2026-2635); choose another")  # fmt: skip
    if len(password) < MIN_PASSWORD:
        raise UserError(f"{source}: the password is shorter than {MIN_PASSWORD} characters "
                        "(MLflow's minimum)")  # fmt: skip
    return username, password


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), whatever mode it had."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(text)


def make_private(root: Path, postgres_as_root: bool) -> None:
    """The server folder closed to other users (the runs, the artifacts, the auth database),
    and what the server writes there from now on, too. PostgreSQL's own user must still pass
    through it when it runs as that user (as root)."""
    os.umask(0o077)
    root.chmod(0o711 if postgres_as_root else 0o700)
    for path in (root / "artifacts", root / "mlflow.db", root / "basic_auth.db"):
        if path.exists():
            path.chmod(0o700 if path.is_dir() else 0o600)


def set_admin(database_uri: str, username: str, password: str) -> None:
    """The auth database holds `username`, an admin with `password`, before the server takes a
    request: created, or set to these credentials whatever it held (the credentials rule; MLflow
    alone would keep an existing user's old password). An `admin` still holding MLflow's former
    default password gets a random one: nobody can log in with it.

    MLflow's auth store class is internal: no public API sets an existing admin's password
    before the server starts (`MLFLOW_AUTH_ADMIN_PASSWORD` only creates a missing admin, or
    replaces the former default password; the REST API needs the running server and the old
    password)."""
    import logging

    from mlflow.exceptions import MlflowException

    # internal (see above): no public API sets the admin before the server starts
    # (mlflow/mlflow#9695)
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    # the migration lines are said on MLflow's internal module's logger: no public switch
    quiet = [logging.getLogger(name) for name in ("alembic", "mlflow.store.db.utils")]
    levels = [logger.level for logger in quiet]
    store = SqlAlchemyStore()
    try:
        for logger in quiet:  # the auth database's migration steps
            logger.setLevel(logging.WARNING)
        store.init_db(database_uri)
        if not store.has_user(username, use_primary=True):
            store.create_user(username, password, is_admin=True)
        elif not (store.authenticate_user(username, password, use_primary=True)
                  and store.get_user(username).is_admin):  # fmt: skip
            store.update_user(username, password=password, is_admin=True)
        legacy = "admin"
        if username != legacy and store.authenticate_user(legacy, MLFLOW_DEFAULT_PASSWORD,
                                                          use_primary=True):  # fmt: skip
            store.update_user(legacy, password=secrets.token_urlsafe(32))
            print(f"mlplab server: user {legacy!r} held MLflow's former default password; it "
                  "now has a random one", file=sys.stderr)  # fmt: skip
    except MlflowException as err:
        raise UserError(f"cannot set the admin in the auth database: {err.message}") from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
        if getattr(store, "engine", None) is not None:
            store.engine.dispose()


def auth_config(root: Path, username: str) -> Path:
    """MLflow's basic-auth config in the server folder (0600). No password in it: the admin
    exists by the time the server reads it (`set_admin`). Accounts an admin adds through
    MLflow's user API get no permission on what they did not create until granted one
    (`NO_PERMISSIONS`): with MLflow's default (`READ`), every account could read every run."""
    path = root / "basic_auth.ini"
    name = username.replace("%", "%%")  # configparser's interpolation
    write_private(path, "\n".join([
        "# written by `mlplab server` at each start; edits are lost",
        "[mlflow]",
        "default_permission = NO_PERMISSIONS",
        f"database_uri = sqlite:///{root / 'basic_auth.db'}".replace("%", "%%"),
        f"admin_username = {name}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false",
        # a password check costs ~0.3 s of CPU (scrypt) and a fit makes hundreds of requests:
        # each worker keeps a passed check for a minute (in memory, keyed by an HMAC of the
        # password; a change through MLflow's user API drops it at once on that worker)
        "auth_cache_ttl_seconds = 60",
        "",
    ]))  # fmt: skip
    return path


def main(argv: list[str]) -> None:
    parser = CommandParser(
        prog="mlplab server",
        description="An MLflow tracking server: PostgreSQL (when installed) or SQLite for the "
        "runs, proxied artifacts; on loopback, or on --host with MLflow's basic auth; Ctrl-C "
        "stops it.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default 127.0.0.1; 0.0.0.0: every "
                        "interface); any but loopback requires credentials")  # fmt: skip
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--root", type=Path, default=Path("mlruns/server"),
                        help="where the database and the artifacts are kept")  # fmt: skip
    parser.add_argument("--backend", choices=["auto", "postgresql", "sqlite"], default="auto")
    parser.add_argument("--workers", type=int, default=2, help="mlflow server's workers")
    parser.add_argument("--credentials", type=Path, metavar="FILE",
                        help="the admin's USERNAME:PASSWORD (mode 600; default: "
                        "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD)")  # fmt: skip
    parser.add_argument(
        "--auth",
        action="store_true",
        help="require the credentials on loopback too (a shared login node)",
    )
    parser.add_argument("--allowed_hosts", default="", metavar="NAMES",
                        help="more names clients reach the server by, comma-separated (a reverse "
                        "proxy's, e.g. mlflow.example.org)")  # fmt: skip
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: a TCP port is 1 to 65535")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: at least 1")
    if args.root.exists() and not args.root.is_dir():
        parser.error(f"--root {args.root} is a file; give the folder for the database and "
                     "the artifacts")  # fmt: skip
    address = args.host.strip("[]")
    if not address:
        parser.error("--host: give an address, e.g. 0.0.0.0 or the node's name")
    extra = [name.strip() for name in args.allowed_hosts.split(",") if name.strip()]
    auth = args.auth or not is_loopback(address) or args.credentials is not None
    credentials = read_credentials(args.credentials) if auth else None
    if auth and credentials is None:
        why = "--auth needs" if is_loopback(address) else (
            f"--host {args.host} lets other machines in: it needs")  # fmt: skip
        raise UserError(f"{why} credentials (MLflow's basic auth); give --credentials FILE "
                        "(USERNAME:PASSWORD, mode 600) or set MLFLOW_TRACKING_USERNAME and "
                        "MLFLOW_TRACKING_PASSWORD")  # fmt: skip
    if auth and importlib.util.find_spec("flask_wtf") is None:
        raise UserError("authentication needs MLflow's basic-auth app, which needs Flask-WTF: "
                        "pip install 'mlflow[auth]'")  # fmt: skip
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)

    database = None
    why_not = PostgreSQL.available() if args.backend != "sqlite" else "asked for SQLite"
    if why_not is None:
        database = PostgreSQL(root)
    elif args.backend == "postgresql":
        raise UserError(f"cannot use PostgreSQL: {why_not}")
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
    command = [sys.executable, "-m", "mlflow", "server", "--host", address,
               "--port", str(args.port), "--workers", str(args.workers),
               "--artifacts-destination", str(root / "artifacts"),
               *security_options(address, args.port, extra)]  # fmt: skip
    if credentials is not None:
        make_private(root, postgres_as_root=database is not None and os.geteuid() == 0)
        set_admin(f"sqlite:///{root / 'basic_auth.db'}", *credentials)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(root, credentials[0]))
        # the key of the UI's CSRF tokens, the same in every worker
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        command += ["--app-name", "basic-auth"]
    if database is not None:
        backend = database.start()
    else:
        backend = f"sqlite:///{root / 'mlflow.db'}"
        print(f"mlplab server: SQLite backend ({why_not})", file=sys.stderr)
    command += ["--backend-store-uri", backend]
    uri = probe = f"http://{authority(address, args.port)}"
    if is_every_interface(address):  # clients use this machine's name; it checks itself locally
        uri = f"http://{authority(socket.getfqdn(), args.port)}"
        probe = f"http://{authority('127.0.0.1' if '.' in address else '::1', args.port)}"
    # its own process group: mlflow, uvicorn and the workers
    server = subprocess.Popen(command, env=env, start_new_session=True)
    signal.signal(signal.SIGTERM, interrupt)  # stopped as by Ctrl-C
    try:
        wait_until_up(probe, server)
        kind = "PostgreSQL" if database else "SQLite"
        said = [f"mlplab server: runs in {kind}, artifacts in {root / 'artifacts'}"]
        if credentials is not None:
            said[0] += f"; basic auth, admin {credentials[0]}"
            said.append("mlplab server: clients set MLFLOW_TRACKING_USERNAME and "
                        "MLFLOW_TRACKING_PASSWORD (never user:password in the URI)")  # fmt: skip
        said[-1] += "; use it with"
        print(*said, f"export MLFLOW_TRACKING_URI={uri}", sep="\n", flush=True)
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
