"""Ctrl-C and SIGTERM at any moment, full disks, half-made stores: a real process gets the
signal, exits 130 or 143 with one line and no traceback, and the store stays usable with every
earlier run in it; a run is never FINISHED without its test metrics and model."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from conftest import config, experiment_runs, run_mlplab, store_uri
from mlplab.tracking.store import create_sqlite_store, open_store

XOR = config("xor")
FIT = ["fit", "--config", XOR, "--trainer.enable_progress_bar", "false"]
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}

# `mlplab` with one step slowed down and announced, so a signal lands inside it
PAUSED = textwrap.dedent("""
    import sys, time
    import mlplab.cli as cli
    where = sys.argv.pop(1)
    def paused(step):
        def run(*args, **kwargs):
            print("PAUSED", file=sys.stderr, flush=True)
            time.sleep(3)
            return step(*args, **kwargs)
        return run
    if where == "testing":
        cli.MLPLabCLI.test_and_log_model = paused(cli.MLPLabCLI.test_and_log_model)
    else:
        cli.log_model = paused(cli.log_model)
    from mlplab.main import main
    main(sys.argv[1:])
""")


def start(args: list[str], cwd: Path, paused_at: str | None = None) -> subprocess.Popen:
    command = (
        [sys.executable, "-c", PAUSED, paused_at] if paused_at else [sys.executable, "-m", "mlplab"]
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(cwd)}
    return subprocess.Popen([*command, *args], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)


def said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def store_is_whole(folder: Path) -> mlflow.MlflowClient:
    database = folder / "mlruns" / "mlflow.db"
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    return mlflow.MlflowClient(store_uri(folder))


@pytest.mark.parametrize(("moment", "sig"), [("testing", signal.SIGINT),
                                             ("model logging", signal.SIGTERM)],
                         ids=["ctrl-c testing", "sigterm model logging"])  # fmt: skip
def test_a_signal_after_the_fit_ends_the_run_killed_not_finished(tmp_path, sig, moment):
    """Lightning's fit has ended (and would have marked the run FINISHED): the run stays open
    until it is tested and its model logged; a signal in between ends it KILLED."""
    process = start([*FIT, "--trainer.max_epochs", "3"], tmp_path, paused_at=moment.split()[0])
    for line in process.stderr:
        if line.startswith("PAUSED"):
            break
    process.send_signal(sig)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == EXIT[sig], rest
    assert "Traceback" not in rest and len(said(rest)) == 1, rest
    assert said(rest)[0].startswith("mlplab: interrupted: run "), rest
    _, (run,) = experiment_runs(store_uri(tmp_path), "xor")
    assert run.info.status == "KILLED", run.info
    assert run.data.tags["mlplab.failure"].startswith("interrupted (")
    # resumable: the same fit from its last checkpoint ends the run FINISHED, tag gone
    done = run_mlplab(*FIT, "--trainer.max_epochs", "3", "--ckpt_path", "last", cwd=tmp_path,
                      env={"MLFLOW_TRACKING_URI": store_uri(tmp_path)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    _, (run,) = experiment_runs(store_uri(tmp_path), "xor")
    assert run.info.status == "FINISHED" and "mlplab.failure" not in run.data.tags
    assert "test/acc" in run.data.metrics


def importing_torch(pid: int) -> bool:
    """The process has begun loading torch's library: mlplab's handlers are in place (before
    `mlplab.main` runs, a Ctrl-C is the interpreter's own, a traceback no program can avoid)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# a first command's moments, told by what it has made so far
MOMENTS = {
    "importing": lambda mlruns, pid: importing_torch(pid),
    "making the store": lambda mlruns, _: any(mlruns.glob(".mlflow.db.creating-*")),
    "store made": lambda mlruns, _: (mlruns / "mlflow.db").exists(),
    "run started": lambda mlruns, _: (mlruns / "xor").exists(),
}


@pytest.mark.parametrize(("moment", "sig"), [
    *[(moment, signal.SIGINT) for moment in MOMENTS],
    ("making the store", signal.SIGTERM), ("run started", signal.SIGTERM),
    ("making the store", signal.SIGKILL), ("store made", signal.SIGKILL),
], ids=lambda value: value.name if isinstance(value, signal.Signals) else value)  # fmt: skip
def test_a_signal_while_a_new_store_is_made_never_leaves_it_half_made(tmp_path, moment, sig):
    """Each exits as it should, and the store is then absent or whole, and the next command
    works on it."""
    process = start([*FIT, "--trainer.max_epochs", "2"], tmp_path)
    mlruns = tmp_path / "mlruns"
    while not MOMENTS[moment](mlruns, process.pid) and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT.get(sig, -signal.SIGKILL), stderr
    if sig != signal.SIGKILL:  # one line of mlplab's (a started fit has said more before it)
        mine = [line for line in said(stderr) if line.startswith("mlplab")]
        assert "Traceback" not in stderr and len(mine) == 1 and said(stderr)[-1] == mine[0]
    if (mlruns / "mlflow.db").exists():
        client = store_is_whole(tmp_path)
        for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
            assert run.info.status == ("RUNNING" if sig == signal.SIGKILL else "KILLED")
    # the next command opens the store as every command does first (made, or made again)
    client = mlflow.MlflowClient(open_store(store_uri(tmp_path)))
    assert client.get_experiment("0").name == "Default"
    assert not list(mlruns.glob(".mlflow.db.creating-*"))  # a killed making is cleared away


def test_an_interrupted_making_of_a_store_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C as the made store is moved into place: no mlflow.db, no leftovers; the next try
    works."""
    move = os.replace

    def interrupted(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    database = tmp_path / "mlflow.db"
    with pytest.raises(KeyboardInterrupt):
        create_sqlite_store(database)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(os, "replace", move)
    open_store(f"sqlite:///{database}")
    assert mlflow.MlflowClient(f"sqlite:///{database}").get_experiment("0").name == "Default"


def test_a_half_made_store_is_moved_aside_and_made_again(tmp_path, capfd):
    """A store an older start left half-made (tables from an interrupted migration, no runs)."""
    built = tmp_path / "built.db"
    create_sqlite_store(built)
    with sqlite3.connect(built) as connection:  # as an interrupt mid-migration leaves it
        connection.execute("DELETE FROM experiments")
        connection.execute("CREATE TABLE _alembic_tmp_params (key TEXT)")
    database = tmp_path / "mlruns" / "mlflow.db"
    database.parent.mkdir()
    built.rename(database)
    open_store(f"sqlite:///{database}")
    assert "left half-made by an interrupted start" in capfd.readouterr().err
    assert (database.parent / "mlflow.db.half-made-1").exists()
    assert mlflow.MlflowClient(f"sqlite:///{database}").get_experiment("0").name == "Default"


def test_a_full_disk_is_one_line_and_loses_no_run(tmp_path):
    """A store on a 3 MB file system: a fit is refused in one line when the disk fills (making
    the store, or writing the run), earlier runs stay readable, and with room again it works."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip("no tmpfs here (mount needs root)")
    try:
        env = {"MLFLOW_TRACKING_URI": store_uri(mount)}
        first = run_mlplab(*FIT, "--trainer.max_epochs", "2", cwd=mount, env=env)
        assert first.returncode == 0, first.stderr[-2000:]
        filler = mount / "filler"
        with open(filler, "wb") as file:  # the rest of the disk
            try:
                while True:
                    file.write(b"\0" * 65536)
            except OSError:
                pass
        full = run_mlplab(*FIT, "--trainer.max_epochs", "2", cwd=mount, env=env)
        assert full.returncode != 0 and "Traceback" not in full.stderr, full.stderr[-3000:]
        print(full.stderr)
        mine = [line for line in said(full.stderr) if line.startswith("mlplab")]
        assert len(mine) == 1 and "full" in mine[0], full.stderr[-3000:]
        client = store_is_whole(mount)
        _, runs = experiment_runs(store_uri(mount), "xor")
        assert [r.info.status for r in runs] == ["FINISHED"]
        filler.unlink()
        again = run_mlplab(*FIT, "--trainer.max_epochs", "2", cwd=mount, env=env)
        assert again.returncode == 0, again.stderr[-2000:]
        assert client.search_runs([runs[0].info.experiment_id], "attributes.status = 'FINISHED'")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
