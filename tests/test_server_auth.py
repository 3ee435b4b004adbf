"""`mlplab server` with MLflow's basic auth, for a cluster: a real server (`--auth` on loopback,
SQLite), started once for the module. No credentials or a wrong password: HTTP 401 and one line,
nothing written; the right ones: a fit, a sweep and a journal synced. A password in the tracking
URI is redacted wherever it is printed or recorded; afterwards every table of the server's
databases and every file it or the clients wrote is searched for the password: absent. An added
account sees nothing until granted. Without credentials, with MLflow's former default password
or with a credentials file others can read, the server refuses to start."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient

from conftest import ROOT, config, epochs_logged
from mlplab.errors import CREDENTIALS_REFUSED
from mlplab.main import main
from mlplab.tracking.server import CREDENTIAL_VARIABLES, free_port, read_credentials, set_admin
from mlplab.tracking.store import redact_uri, without_redacted
from test_server import start_server, stop_server

USER = "ops"
PASSWORD = f"mlplab-{secrets.token_hex(12)}"  # 31 characters, found nowhere by chance
READER_PASSWORD = f"reader-{secrets.token_hex(12)}"
REFUSED = f"mlplab: error: {CREDENTIALS_REFUSED}"
DELAY = '{"class_path": "callbacks.EpochDelay", "init_args": {"seconds": 0.25}}'


def clean_env(**extra: str) -> dict:
    """The tests' environment without any credentials, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARIABLES}
    return {**env, **extra}


def credentials(password: str = PASSWORD) -> dict:
    return {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server's URI and folder; its admin's credentials from the environment."""
    root = tmp_path_factory.mktemp("auth-server")
    process, uri = start_server(root, "sqlite", "--auth", "--host", "127.0.0.1",
                                "--workers", "1", env=clean_env(**credentials()))  # fmt: skip
    yield uri, root
    stop_server(process)


@pytest.fixture(scope="module")
def clients(tmp_path_factory) -> Path:
    """The clients' working folders, one per test: searched for the password at the end."""
    return tmp_path_factory.mktemp("auth-clients")


@pytest.fixture
def admin(server, monkeypatch) -> MlflowClient:
    """An MLflow client of this process with the right credentials."""
    for name, value in credentials().items():
        monkeypatch.setenv(name, value)
    return MlflowClient(server[0])


def mlplab_here(monkeypatch, capsys, folder: Path, env: dict, *args: str):
    """`mlplab ARGS` in this process (the imports paid once), in `folder`, with exactly the
    credentials in `env`; (exit status, stdout, stderr)."""
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def runs_everywhere(client: MlflowClient) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def test_without_credentials_the_server_says_401_and_fit_one_line(server, clients, admin):
    uri, _ = server
    before = len(runs_everywhere(admin))
    answer = requests.get(f"{uri}/api/2.0/mlflow/experiments/search",
                          params={"max_results": 1}, timeout=30)  # fmt: skip
    assert answer.status_code == 401
    folder = clients / "anonymous"
    folder.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "mlplab", "fit", "--config", config("xor"),
         "--trainer.max_epochs", "1", "--experiment_name", "refused"],
        cwd=folder, env=clean_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [REFUSED] and not result.stdout, result.stderr[-3000:]
    assert admin.get_experiment_by_name("refused") is None
    assert len(runs_everywhere(admin)) == before
    assert not (folder / "mlruns").exists()


def test_a_wrong_password_is_refused_and_writes_nothing(server, clients, admin, monkeypatch,
                                                        capsys):  # fmt: skip
    uri, _ = server
    wrong = f"{PASSWORD}x"
    answer = requests.get(f"{uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                          auth=(USER, wrong), timeout=30)  # fmt: skip
    assert answer.status_code == 401
    before = len(runs_everywhere(admin))
    env = {"MLFLOW_TRACKING_URI": uri, **credentials(wrong)}
    folder = clients / "wrong"
    for args in (
        ["fit", "--config", config("xor"), "--trainer.max_epochs", "1",
         "--experiment_name", "refused"],
        ["sweep", "--config", config("xor"), "--grid", "model.lr=[0.02,0.05]",
         "--experiment_name", "refused", "--trainer.max_epochs=1"],
    ):  # fmt: skip
        code, out, err = mlplab_here(monkeypatch, capsys, folder, env, *args)
        assert code == 2 and err.splitlines() == [REFUSED], err[-3000:]
        assert wrong not in out + err
    code, _, err = mlplab_here(monkeypatch, capsys, folder, env, "runs", "--experiment", "xor")
    assert code == 2 and err.splitlines() == [f"mlplab runs: error: {CREDENTIALS_REFUSED}"]
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert admin.get_experiment_by_name("refused") is None
    assert len(runs_everywhere(admin)) == before
    assert not (folder / "mlruns").exists()


def test_the_right_credentials_fit_and_sweep(server, clients, admin, monkeypatch, capsys):
    uri, _ = server
    env = {"MLFLOW_TRACKING_URI": uri, **credentials()}
    code, out, err = mlplab_here(
        monkeypatch, capsys, clients / "fit", env, "fit", "--config", config("xor"),
        "--trainer.max_epochs", "2", "--experiment_name", "auth-fit",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    printed = out + err
    (run,) = admin.search_runs([admin.get_experiment_by_name("auth-fit").experiment_id])
    assert run.info.status == "FINISHED" and epochs_logged(admin, run.info.run_id) == [0, 1]
    assert "test/acc" in run.data.metrics and "model.lr" in run.data.params
    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         output_format="list")  # fmt: skip
    assert run.info.run_id in {m.source_run_id for m in models}

    code, out, err = mlplab_here(
        monkeypatch, capsys, clients / "sweep", env, "sweep", "--config", config("xor"),
        "--grid", "model.lr=[0.02,0.05]", "--experiment_name", "auth-sweep",
        "--trainer.max_epochs=1",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    printed += out + err
    found = admin.search_runs([admin.get_experiment_by_name("auth-sweep").experiment_id])
    parents = [r for r in found if r.data.tags.get("mlplab.command") == "sweep"]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in found)

    code, out, err = mlplab_here(monkeypatch, capsys, clients / "fit", env, "runs",
                                 "--experiment", "auth-sweep", "--format", "csv")  # fmt: skip
    assert code == 0, err
    assert all(r.info.run_id[:8] in out or r.info.run_name in out for r in children), out
    assert PASSWORD not in printed + out + err


def test_an_added_account_sees_nothing_until_granted(server, admin, monkeypatch):
    """The recipe of docs/CLUSTER.md: the admin adds an account with MLflow's
    AuthServiceClient; it reads none of the admin's runs (NO_PERMISSIONS) until the admin
    grants it READ."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    uri, _ = server
    experiment = admin.get_experiment_by_name("auth-fit").experiment_id
    auth = get_app_client("basic-auth", tracking_uri=uri)
    auth.create_user("reader", READER_PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", READER_PASSWORD)
    with pytest.raises(MlflowException) as refused:
        MlflowClient(uri).get_experiment(experiment)
    assert refused.value.get_http_status_code() == 403
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    auth.grant_user_permission("reader", "experiment", experiment, "READ")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", READER_PASSWORD)
    assert MlflowClient(uri).get_experiment(experiment).name == "auth-fit"


class Relay:
    """A TCP relay on its own loopback port to the server's: stopped, the server is away for a
    client that uses this port (an outage, the server itself untouched); started again on the
    same port, it is back."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []

    def start(self) -> Relay:
        self.stopped.clear()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        threading.Thread(target=self.accept, args=(listener,), daemon=True).start()
        return self

    def accept(self, listener: socket.socket) -> None:
        with listener:
            while not self.stopped.is_set():
                try:
                    near, _ = listener.accept()
                except TimeoutError:
                    continue
                near.settimeout(None)
                far = socket.create_connection(("127.0.0.1", self.target))
                self.sockets += [near, far]
                for a, b in ((near, far), (far, near)):
                    threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self.stopped.set()
        time.sleep(0.3)  # the listener closed
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.sockets.clear()


def test_a_password_in_the_uri_is_redacted_and_a_journal_syncs(server, clients, admin,
                                                               monkeypatch, capsys):  # fmt: skip
    """The job has only `http://ops:PASSWORD@host:port` (MLflow's client sends a URL's
    credentials); the server goes away mid-run (a relay stopped), the job keeps the records in
    its journal, and `mlplab sync` sends them with the environment's credentials."""
    uri, _ = server
    relay = Relay(int(uri.rsplit(":", 1)[1])).start()
    secret_uri = f"http://{USER}:{PASSWORD}@127.0.0.1:{relay.port}"
    shown = f"http://{USER}:***@127.0.0.1:{relay.port}"
    folder = clients / "journal"
    folder.mkdir()
    log = folder / "job.log"  # its stdout and stderr
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    with log.open("w") as printed:
        job = subprocess.Popen(
            [sys.executable, "-m", "mlplab", "fit", "--config", config("xor"),
             "--trainer.max_epochs", "10", "--trainer.callbacks+", DELAY,
             "--experiment_name", "auth-journal", "--tracking_uri", secret_uri],
            cwd=folder, stdout=printed, stderr=subprocess.STDOUT,
            # no retries: the outage is seen at once
            env=clean_env(MLFLOW_TRACKING_URI=secret_uri, PYTHONPATH=path,
                          MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:  # 2 epochs on the server, then it goes away
            journals = list((folder / "mlruns" / "auth-journal").glob("*/journal"))
            if journals and len(admin.get_metric_history(journals[0].parent.name, "epoch")) >= 2:
                break
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        relay.stop()
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    printed = log.read_text()
    assert job.returncode == 0, printed[-3000:]
    assert f"tracking server {shown} is away" in printed and "still away" in printed
    assert PASSWORD not in printed and "Traceback" not in printed
    journal, run_id = journals[0], journals[0].parent.name
    header = json.loads((journal / "records.jsonl").read_text().splitlines()[0])
    assert header["tracking_uri"] == shown

    relay.start()  # back; the journal's URI, without its `***`, and the environment's login
    code, out, err = mlplab_here(monkeypatch, capsys, folder, credentials(), "sync",
                                 str(journal))  # fmt: skip
    assert code == 0, err[-3000:]
    assert f"run {run_id}: " in out and "records sent" in out and PASSWORD not in out + err
    run = admin.get_run(run_id)
    assert run.info.status == "FINISHED" and epochs_logged(admin, run_id) == list(range(10))
    assert "tracking_uri" not in run.data.params  # bookkeeping: in the config artifact
    assert not [v for v in [*run.data.params.values(), *run.data.tags.values()] if PASSWORD in v]
    logged = Path(admin.download_artifacts(run_id, "config.yaml", str(folder / "download")))
    assert f"tracking_uri: {shown}" in logged.read_text()
    relay.stop()


def test_the_password_is_nowhere(server, clients):
    """After every test above: each row of each table of the server's databases, each file of
    its folder (the artifacts and its log) and of the clients' (their run folders, checkpoints
    and journals): no password. The auth database holds the admin's hash."""
    _, root = server
    databases = sorted(root.rglob("*.db"))
    assert {d.name for d in databases} >= {"mlflow.db", "basic_auth.db"}
    for database in databases:
        with contextlib.closing(sqlite3.connect(database)) as db:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master "
                                                   "WHERE type = 'table'")]  # fmt: skip
            for table in tables:
                for row in db.execute(f'SELECT * FROM "{table}"'):
                    text = repr(row)
                    assert PASSWORD not in text and READER_PASSWORD not in text, table
            if database.name == "basic_auth.db":
                (hashed,) = db.execute("SELECT password_hash FROM users WHERE username = ?",
                                       (USER,)).fetchone()  # fmt: skip
                assert hashed and PASSWORD not in hashed
    files = [p for folder in (root, clients) for p in folder.rglob("*") if p.is_file()]
    needles = [PASSWORD.encode(), READER_PASSWORD.encode()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.name == "records.jsonl" for p in files)
    assert len([p for p in files if "artifacts" in p.parts]) > 10
    shown = b"%s:***@" % USER.encode()  # the redacted URI: the search finds what is there
    assert any(shown in path.read_bytes() for path in databases)
    for path in files:
        data = path.read_bytes()
        assert not [n for n in needles if n in data], path


def test_the_server_refuses_to_start_without_credentials(tmp_path):
    """One line, exit 2, before anything: no folder, no port taken."""
    port = free_port()
    root = tmp_path / "server"
    result = subprocess.run(
        [sys.executable, "-m", "mlplab", "server", "--host", "0.0.0.0", "--port", str(port),
         "--root", str(root)],
        env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("mlplab: error: --host 0.0.0.0 lets other machines in: it needs "
                           "credentials")  # fmt: skip
    assert not root.exists()
    with socket.socket() as s:  # still free
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("case", ["default password", "short password", "world-readable",
                                  "group-readable"])  # fmt: skip
def test_the_server_refuses_bad_credentials(case, tmp_path, monkeypatch, capsys):
    root = tmp_path / "server"
    args = ["server", "--host", "0.0.0.0", "--port", str(free_port()), "--root", str(root)]
    if case.endswith("password"):
        password = "password1234" if case == "default password" else "short-pw"
        env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    else:
        env = {}
        file = tmp_path / "credentials"
        file.write_text(f"{USER}:{PASSWORD}\n")
        file.chmod(0o604 if case == "world-readable" else 0o640)
        args += ["--credentials", str(file)]
    code, out, err = mlplab_here(monkeypatch, capsys, tmp_path, env, *args)
    assert code == 2 and not out
    (line,) = err.splitlines()
    expected = {"default password": "the admin password MLflow once shipped",
                "short password": "shorter than 12 characters",
                "world-readable": "is open to other users (mode 0604)",
                "group-readable": "is open to other users (mode 0640)"}  # fmt: skip
    assert line.startswith("mlplab: error: ") and expected[case] in line, line
    assert "password1234" not in line and PASSWORD not in line
    assert not root.exists()


def test_a_credentials_file_holds_one_line_or_two(tmp_path, monkeypatch):
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    file = tmp_path / "credentials"
    for text in (f"{USER}:{PASSWORD}\n", f"{USER}\n{PASSWORD}\n"):
        file.write_text(text)
        file.chmod(0o600)
        assert read_credentials(file) == (USER, PASSWORD)
    assert read_credentials(None) is None
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert read_credentials(None) == (USER, PASSWORD)


def test_the_admin_is_set_whatever_the_auth_database_held(tmp_path):
    """A restart with another password replaces the admin's; an `admin` still holding MLflow's
    former default password gets a random one."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    database = f"sqlite:///{tmp_path / 'basic_auth.db'}"
    set_admin(database, USER, "an-earlier-password")
    store = SqlAlchemyStore()
    store.init_db(database)
    store.create_user("admin", "password1234", is_admin=True)  # as older MLflow made it
    set_admin(database, USER, PASSWORD)
    assert store.authenticate_user(USER, PASSWORD) and store.get_user(USER).is_admin
    assert not store.authenticate_user(USER, "an-earlier-password")
    assert not store.authenticate_user("admin", "password1234")
    store.engine.dispose()


def test_redact_uri():
    assert redact_uri("http://ops:p@ss/w:rd@node1:5000/x") == "http://ops:***@node1:5000/x"
    assert redact_uri("no server at https://a:b@host:1 (refused)") == (
        "no server at https://a:***@host:1 (refused)"
    )
    for plain in ("http://node1:5000", "sqlite:///mlruns/mlflow.db", "postgresql://u@h/db", None,
                  "http://node1:5000/x?to=a@b"):  # fmt: skip
        assert redact_uri(plain) == plain
    assert without_redacted("http://ops:***@node1:5000") == "http://node1:5000"
    assert without_redacted("http://node1:5000") == "http://node1:5000"
