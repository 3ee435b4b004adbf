"""A tracking server that goes away mid-run: training goes on, every record is kept in the run's
journal and sent once, in order, when the server answers (during the job, on resuming it, or by
`mlplab sync`). A real `mlflow server` on loopback, stopped and started on the same store."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import ROOT, config, epochs_logged, run_mlplab
from mlplab.main import main

DELAY = '{"class_path": "callbacks.EpochDelay", "init_args": {"seconds": 0.25}}'


def fit_args(epochs: int, *extra: str) -> list[str]:
    return ["fit", "--config", config("xor"), "--trainer.max_epochs", str(epochs),
            "--trainer.callbacks+", DELAY, *extra]  # fmt: skip


def env(uri: str) -> dict:
    """`tests/` importable in the job, for `callbacks.EpochDelay`."""
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": path}


class Job:
    """`mlplab fit` in the background, its stderr in a file."""

    def __init__(self, args: list[str], cwd: Path, uri: str) -> None:
        self.cwd, self.uri = cwd, uri
        self.log_path = cwd / "job.err"
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "mlplab", *args], cwd=cwd,
                                        env=env(uri), stderr=self.log, stdout=subprocess.DEVNULL)

    def stderr(self) -> str:
        return self.log_path.read_text()

    def wait_until(self, done, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.process.poll() is None, f"ended before {what}:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what}:\n{self.stderr()[-3000:]}"
            time.sleep(0.2)

    def run_id(self) -> str | None:
        found = list((self.cwd / "mlruns" / "xor").glob("*/journal"))
        return found[0].parent.name if found else None

    def wait_for_epochs(self, n: int) -> str:
        def logged():
            run_id = self.run_id()
            return run_id and len(MlflowClient(self.uri).get_metric_history(run_id, "epoch")) >= n

        self.wait_until(logged, f"{n} epochs on the server")
        return self.run_id()

    def finish(self) -> int:
        self.process.wait(timeout=300)
        self.log.close()
        return self.process.returncode


def run_of(uri: str, run_id: str):
    client = MlflowClient(uri)
    return client, client.get_run(run_id)


def test_an_outage_mid_fit_costs_nothing(tmp_path, tracking_server):
    """Stopped after epoch 2 and started again: the fit exits 0, FINISHED, each epoch once,
    one line when the server went away and one when it came back."""
    job = Job(fit_args(50), tmp_path, tracking_server.uri)
    run_id = job.wait_for_epochs(3)
    tracking_server.stop()
    job.wait_until(lambda: "is away" in job.stderr(), "word of the outage")
    time.sleep(2)
    tracking_server.start()
    job.wait_until(lambda: "is back" in job.stderr(), "word of the server's return", 120)
    assert job.finish() == 0, job.stderr()[-3000:]
    err = job.stderr()
    assert err.count("is away") == 1 and err.count("is back") == 1, err[-3000:]
    assert "Traceback" not in err and "still away" not in err
    client, run = run_of(tracking_server.uri, run_id)
    assert run.info.status == "FINISHED"
    assert epochs_logged(client, run_id) == list(range(50))
    assert epochs_logged(client, run_id, "train/loss") == list(range(50))
    assert "test/acc" in run.data.metrics
    assert {"config.yaml", "figures"} <= {a.path for a in client.list_artifacts(run_id)}
    mlflow.set_tracking_uri(tracking_server.uri)
    (model,) = [m for m in mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list")
        if m.tags.get("mlplab.checkpoint") == "best"]  # fmt: skip
    assert model.source_run_id == run_id


def test_a_server_still_away_at_the_end_is_synced_later(tmp_path, tracking_server, capsys):
    """The server stays away: the job ends 0 and says how to send the records; `mlplab sync`
    completes the run (model and registry alias included); a second sync sends nothing."""
    job = Job(fit_args(12, "--register_model", "outage"), tmp_path, tracking_server.uri)
    run_id = job.wait_for_epochs(3)
    tracking_server.stop()
    assert job.finish() == 0, job.stderr()[-3000:]
    err = job.stderr()
    assert "Traceback" not in err, err[-3000:]
    assert err.count("is away") == 1 and err.count("still away") == 1, err[-3000:]
    journal = re.search(r"`mlplab sync (\S+)`", err).group(1)
    assert Path(tmp_path / journal).is_dir()

    tracking_server.start()
    client, run = run_of(tracking_server.uri, run_id)
    assert run.info.status == "RUNNING"  # the server has only what came before the outage
    synced = run_mlplab("sync", journal, cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert re.search(rf"run {run_id}: \d+ records sent", synced.stdout), synced.stdout
    client, run = run_of(tracking_server.uri, run_id)
    assert run.info.status == "FINISHED"
    assert epochs_logged(client, run_id) == list(range(12))
    assert "test/acc" in run.data.metrics and "figures" in {
        a.path for a in client.list_artifacts(run_id)
    }
    mlflow.set_tracking_uri(tracking_server.uri)
    registered = mlflow.pyfunc.load_model("models:/outage@candidate")
    assert registered.metadata.run_id == run_id

    def counts():
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id])
        return len(models), {k: len(client.get_metric_history(run_id, k))
                             for k in client.get_run(run_id).data.metrics}  # fmt: skip

    before = counts()
    main(["sync", str(tmp_path / "mlruns")])  # every journal under it
    assert "nothing left to send" in capsys.readouterr().out
    assert counts() == before


@pytest.mark.slow  # CI runs the other two outage scenarios (`make test` under 20 minutes)
def test_killed_while_away_then_resumed_loses_nothing(tmp_path, tracking_server):
    """`kill -9` with epochs kept only in the journal; the server back; `--ckpt_path last`
    sends them and goes on: every epoch exactly once, FINISHED."""
    job = Job(fit_args(30), tmp_path, tracking_server.uri)
    run_id = job.wait_for_epochs(3)
    tracking_server.stop()
    job.wait_until(lambda: "is away" in job.stderr(), "word of the outage")
    records = tmp_path / "mlruns" / "xor" / run_id / "journal" / "records.jsonl"
    kept = records.read_text().count('"op"')
    job.wait_until(lambda: records.read_text().count('"op"') >= kept + 3, "journaled epochs")
    job.process.send_signal(signal.SIGKILL)
    assert job.finish() == -signal.SIGKILL

    tracking_server.start()
    resumed = run_mlplab(*fit_args(30, "--ckpt_path", "last"), cwd=tmp_path,
                         env=env(tracking_server.uri))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run_id}" in resumed.stderr
    client, run = run_of(tracking_server.uri, run_id)
    assert run.info.status == "FINISHED"
    assert epochs_logged(client, run_id) == list(range(30))
    assert epochs_logged(client, run_id, "train/loss") == list(range(30))


def test_sync_without_a_journal_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as ended:
        main(["sync", str(tmp_path)])
    assert ended.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("mlplab: error: no run journal in") and err.count("\n") == 1

