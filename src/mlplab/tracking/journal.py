"""A run's journal: what a fit writes to a tracking server goes to disk first, then to the server,
so an outage mid-run costs neither training nor a record (`RunWriter`); `mlplab sync` sends what
a job ended without sending.

`<run folder>/journal/records.jsonl` holds a header (server, run), one JSON line per write in
order, and a `sent` line for each write the server took; files to upload (config, figures, the
model) wait in `files/`. Replaying sends the records not marked sent, in order. A record sent but
not marked (a crash in between) is harmless sent again: MLflow keeps one copy of a metric point
(same key, step, value, timestamp), of a param with its value and of a dataset input, and tags
and artifacts are overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

RECORDS = "records.jsonl"
RETRY_SECONDS = 5.0  # while away, how often a write checks whether the server is back


def is_outage(err: BaseException) -> bool:
    """The server is unreachable or erroring (a connection error, a timeout, HTTP 5xx), as
    opposed to answering that a request is wrong (HTTP 4xx), which no retry mends."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500  # MLflow's connection errors are 500s too
    return isinstance(err, requests.RequestException | OSError)


def outage_reason(err: BaseException) -> str:
    """A few words for the line that says the server is away (shown, never acted on)."""
    from mlplab.tracking.store import redact_uri

    # the message, read for display only: urllib3 names a retried status only in text ("too
    # many 503 error responses"), MLflow a non-JSON answer's status and a server's relayed OS
    # error too ("error code 502", "[Errno 28] ..."); no attribute holds them
    text = redact_uri(str(err))
    for pattern in (r"\[Errno -?\d+\] ([^'\")]+)", r"(timed? ?out)", r"(\d{3}) error responses",
                    r"error code (\d{3})"):  # fmt: skip
        found = re.search(pattern, text, re.IGNORECASE)
        if found:
            return found.group(1).strip()
    return text.splitlines()[0][:120] if text else type(err).__name__


class Journal:
    """The records of one run, appended and marked under a file lock (a live job and
    `mlplab sync` may share a journal) and fsynced (a crash loses nothing written)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / RECORDS

    @classmethod
    def open(cls, folder: Path, tracking_uri: str, run_id: str) -> Journal:
        from mlplab.tracking.store import redact_uri

        journal = cls(folder)
        if not journal.path.exists():
            journal.folder.mkdir(parents=True, exist_ok=True)
            # no password kept: `mlplab sync` authenticates as MLflow's client does (its
            # MLFLOW_TRACKING_USERNAME/PASSWORD)
            header = {"journal": 1, "tracking_uri": redact_uri(tracking_uri), "run_id": run_id}
            journal.write_lines([header])
        return journal

    @contextlib.contextmanager
    def _locked(self):
        with open(self.path, "a+") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            try:
                yield file
            finally:
                fcntl.flock(file, fcntl.LOCK_UN)

    def write_lines(self, lines: list[dict], file=None) -> None:
        with contextlib.nullcontext(file) if file else self._locked() as out:
            out.write("".join(json.dumps(line) + "\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())

    def _lines(self, file) -> list[dict]:
        file.seek(0)
        lines = []
        for text in file.read().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line torn by a crash
                lines.append(json.loads(text))
        return lines

    def header(self) -> dict:
        with self._locked() as file:
            return self._lines(file)[0]

    def append(self, record: dict) -> int:
        """Add a record; returns its number."""
        with self._locked() as file:
            seq = sum("op" in line for line in self._lines(file)) + 1
            self.write_lines([{"seq": seq, **record}], file)
        return seq

    def staged(self, name: str) -> Path:
        """A new path in `files/` for a file a record will send."""
        folder = self.folder / "files" / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        return folder / name

    def replay(self, send) -> dict[int, object]:
        """Send the records not yet marked, in order, marking each; returns what each made, by
        number. An error stops the replay (the rest wait for the next) and is raised."""
        with self._locked() as file:
            lines = self._lines(file)
            sent = {line["sent"] for line in lines if "sent" in line}
            pending = [line for line in lines if "op" in line and line["seq"] not in sent]
            results = {}
            for record in pending:
                results[record["seq"]] = send(record)
                self.write_lines([{"sent": record["seq"], "result": results[record["seq"]]}], file)
            return results


def apply(client, run_id: str, record: dict, folder: Path, tracking_uri: str):
    """Carry out one record on the tracking store; returns what it made (a model's URI)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    op = record["op"]
    if op == "log_batch":
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]],
            params=[Param(k, v) for k, v in record["params"]],
            tags=[RunTag(k, v) for k, v in record["tags"]],
        )
    elif op == "log_artifact":
        client.log_artifact(run_id, str(folder / record["file"]), record["artifact_path"])
    elif op == "log_inputs":
        client.log_inputs(run_id, datasets=[
            DatasetInput(Dataset(**item["dataset"]), [InputTag(k, v) for k, v in item["tags"]])
            for item in record["datasets"]
        ])  # fmt: skip
    elif op == "update_run":
        client.update_run(run_id, status=record["status"], name=record["name"])
    elif op == "set_terminated":
        client.set_terminated(run_id, record["status"], record["end_time"])
    elif op == "log_model":
        from mlplab.tracking.logged_models import upload_model

        args = {k: v for k, v in record.items() if k not in ("seq", "op", "dir")}
        return upload_model(tracking_uri, run_id, folder / record["dir"], **args)
    else:
        raise ValueError(f"unknown journal record {op!r}")
    return None


class RunWriter:
    """The run's MLflow client as `MLflowRunLogger.experiment` hands it out: reads go to the
    client; each write becomes a record, carried out at once on a local store, or journaled and
    then sent to a server. A server that stops answering mid-run is said once, training goes on
    with the records kept, and they are sent in order when it answers again (said once too).

    Thread-safe: system metrics are written from their own thread."""

    def __init__(self, client, run_id: str, tracking_uri: str, journal: Journal | None) -> None:
        self.client, self.run_id, self.tracking_uri = client, run_id, tracking_uri
        self.journal = journal
        self.lock = threading.RLock()
        self.away = False
        self.next_try = 0.0
        self.said_kept = False
        self.logged: dict[str, list[tuple[int, float]]] = defaultdict(list)  # this process's

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def __deepcopy__(self, memo) -> RunWriter:
        """A handle on the run, shared by copies (SWA and EMA deep-copy the module and what it
        reaches, the trainer's logger included)."""
        return self

    # -- the writes Lightning's logger and mlplab make ------------------------------------------
    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **_) -> None:
        for m in metrics:
            self.logged[m.key].append((m.step, m.value))
        self.write({
            "op": "log_batch",
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
            "params": [[p.key, p.value] for p in params],
            "tags": [[t.key, t.value] for t in tags],
        })  # fmt: skip

    def set_tag(self, run_id: str, key: str, value, **_) -> None:
        from mlflow.entities import RunTag

        self.log_batch(run_id, tags=[RunTag(key, str(value))])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        with self.staged(Path(artifact_file).name) as path:
            path.write_text(text)
            self.log_artifact(run_id, path, str(Path(artifact_file).parent).strip("."))

    def log_figure(self, run_id: str, figure, artifact_file: str, save_kwargs=None) -> None:
        with self.staged(Path(artifact_file).name) as path:
            figure.savefig(path, **(save_kwargs or {}))
            self.log_artifact(run_id, path, str(Path(artifact_file).parent).strip("."))

    def log_artifact(self, run_id: str, local_path, artifact_path: str | None = None) -> None:
        path = Path(local_path).resolve()
        if self.journal is not None and self.journal.folder.resolve() not in path.parents:
            staged = self.journal.staged(path.name)  # kept until sent, whatever happens to it
            shutil.copy2(path, staged)
            path = staged.resolve()
        self.write({"op": "log_artifact", "file": self.relative(path),
                    "artifact_path": artifact_path or None})  # fmt: skip

    def log_inputs(self, run_id: str, datasets=None, models=None) -> None:
        fields = ("name", "digest", "source_type", "source", "schema", "profile")
        self.write({"op": "log_inputs", "datasets": [
            {"dataset": {f: getattr(d.dataset, f) for f in fields},
             "tags": [[t.key, t.value] for t in d.tags]}
            for d in datasets or []
        ]})  # fmt: skip

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        self.write({"op": "update_run", "status": status, "name": name})

    def set_terminated(self, run_id: str, status: str | None = None, end_time=None) -> None:
        end_time = end_time or int(time.time() * 1000)
        self.write({"op": "set_terminated", "status": status or "FINISHED", "end_time": end_time})

    def log_model(self, path: Path, **args) -> str | None:
        """Upload a model saved at `path` (see `mlplab.tracking.logged_models`); its URI, or
        None while the server is away."""
        return self.write({"op": "log_model", "dir": self.relative(path.resolve()), **args})

    # -- the machinery ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def staged(self, name: str):
        """A path for a file a write will send: in the journal, else a temporary folder."""
        if self.journal is not None:
            yield self.journal.staged(name)
            return
        with tempfile.TemporaryDirectory() as folder:
            yield Path(folder) / name

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.journal.folder.resolve()) if self.journal else path)

    def write(self, record: dict):
        with self.lock:
            if self.journal is None:
                return apply(self.client, self.run_id, record, Path("/"), self.tracking_uri)
            seq = self.journal.append(record)
            return self.drain().get(seq)

    def drain(self, force: bool = False) -> dict:
        """Send what the journal holds, unless the server is away and was asked lately;
        returns what each record sent made, by number."""
        if self.journal is None:
            return {}
        with self.lock:
            if self.away and not force and time.monotonic() < self.next_try:
                return {}
            if self.away and not self.answers():
                self.next_try = time.monotonic() + RETRY_SECONDS
                return {}
            try:
                sent = self.journal.replay(self.send)
            except Exception as err:
                if not is_outage(err):
                    raise
                if not self.away:
                    print(
                        f"mlplab: tracking server {self.shown_uri} is away "
                        f"({outage_reason(err)}); training goes on, the run's records are kept "
                        f"in {self.where()} and sent when it answers",
                        file=sys.stderr,
                    )
                self.away, self.next_try = True, time.monotonic() + RETRY_SECONDS
                return {}
            if self.away:
                back = f"is back: {len(sent)} records sent"
                print(f"mlplab: tracking server {self.shown_uri} {back}", file=sys.stderr)
                self.away, self.said_kept = False, False
            return sent

    def send(self, record: dict):
        return apply(self.client, self.run_id, record, self.journal.folder, self.tracking_uri)

    def answers(self) -> bool:
        """A quick look (MLflow's retries take seconds): does the server answer at all?"""
        import requests

        try:
            response = requests.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=2)
        except requests.RequestException:
            return False
        return response.status_code < 500

    def settle(self) -> None:
        """At the end of a job: a last try, and if the server is still away, say where the
        records are and how to send them (once)."""
        self.drain(force=True)
        if self.away and not self.said_kept:
            print(
                f"mlplab: tracking server {self.shown_uri} is still away; the run's records "
                f"are kept: send them with `mlplab sync {self.where()}`",
                file=sys.stderr,
            )
            self.said_kept = True

    @property
    def shown_uri(self) -> str:
        from mlplab.tracking.store import redact_uri

        return redact_uri(self.tracking_uri)

    def where(self) -> str:
        with contextlib.suppress(ValueError):
            return str(self.journal.folder.resolve().relative_to(Path.cwd()))
        return str(self.journal.folder)

    def metric_histories(self, prefixes: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
        """Each metric's (step, value) points: from the store, or, while the server is away,
        the points this process logged."""
        if not self.away:
            try:
                keys = [k for k in self.client.get_run(self.run_id).data.metrics
                        if k.startswith(prefixes)]  # fmt: skip
                return {k: [(m.step, m.value) for m in self.client.get_metric_history(
                    self.run_id, k)] for k in keys}  # fmt: skip
            except Exception as err:  # noqa: BLE001
                if not is_outage(err):
                    raise
        return {k: sorted(v) for k, v in self.logged.items() if k.startswith(prefixes)}


def find_journals(path: Path) -> list[Journal]:
    """The journals a path names: a journal's file or folder, a run folder, or any folder
    holding run folders (e.g. `mlruns`)."""
    if path.is_file():
        return [Journal(path.parent)]
    return [Journal(found.parent) for found in sorted(path.rglob(RECORDS))]


def main(argv: list[str]) -> None:
    from mlplab.errors import CommandParser, UserError
    from mlplab.tracking.store import open_store, redact_uri, without_redacted

    parser = CommandParser(
        prog="mlplab sync",
        description="Send the records runs kept while their tracking server was away (a job "
        "ends with them kept when the server is still away then). Sending twice sends "
        "nothing twice.",
    )
    where = "a journal, a run folder, or a folder of runs (e.g. mlruns)"
    parser.add_argument("paths", nargs="+", type=Path, help=where)
    parser.add_argument("--tracking_uri", help="default: the server each journal was kept for")
    args = parser.parse_args(argv)
    journals = [journal for path in args.paths for journal in find_journals(path)]
    if not journals:
        names = " ".join(map(str, args.paths))
        raise UserError(f"no run journal in {names} (runs on a tracking server keep one in "
                        f"mlruns/EXPERIMENT/RUN_ID/journal/)")  # fmt: skip
    for journal in journals:
        header = journal.header()
        uri = args.tracking_uri or without_redacted(header["tracking_uri"])
        run_id = header["run_id"]
        open_store(uri)
        try:
            sent = len(send_all(journal, uri, run_id))
        except Exception as err:
            if not is_outage(err):
                raise
            raise UserError(f"the tracking server {redact_uri(uri)} went away while sending run "
                            f"{run_id} ({outage_reason(err)}); run the same command again "
                            "later") from None  # fmt: skip
        done = f"{sent} records sent to {redact_uri(uri)}" if sent else "nothing left to send"
        print(f"mlplab sync: run {run_id}: {done}")


def send_all(journal: Journal, uri: str, run_id: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return journal.replay(lambda record: apply(client, run_id, record, journal.folder, uri))
