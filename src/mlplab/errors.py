import argparse
import errno
import re


class UserError(Exception):
    """A mistake in what the user asked for or supplied: shown as one line, exit status 2."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss went NaN or infinite: the run is marked FAILED with this message, exit status 1."""

    exit_code = 1


class RunKilled(Exception):
    """Ends a fit early on purpose (a search pruning its trial): the run is marked KILLED, not
    FAILED, with this message as the `mlplab.failure` tag."""


# the lines of jsonargparse's nested report that only say where the cause sits. jsonargparse
# reports a nested mistake only as text (TypeErrors `Parser key "x": ...` wrapping each other):
# no attribute names the key or the cause, so `parse_cause` reads the message
NESTING = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "Given value",
           "Problem with given class_path", "Expected a <class 'NoneType'>")  # fmt: skip


def parse_cause(message: str) -> str:
    """jsonargparse's nested report (`Parser key "model": ... Parser key "activation":
    Expected a typing.Literal[...]`, up to 14 lines) as one line: the dotted key, the cause."""
    keys = re.findall(r'Parser key "([^"]+)":', message)
    tail = message[message.rfind('Parser key "') :].split(":", 1)[-1] if keys else message
    indented = [(len(line) - len(line.lstrip()), line.strip().removeprefix("- "))
                for line in tail.splitlines() if line.strip()]  # fmt: skip
    causes = [(depth, line) for depth, line in indented if not line.startswith(NESTING)]
    # of alternatives (a path, else a class), the deepest is the one that was tried furthest
    cause = max(causes, key=lambda c: c[0])[1] if causes else message.strip().splitlines()[0]
    cause = cause.split(" Got value:")[0]
    given = re.search(r"NestedArg\(key='[^']*', val=(.*)\)\s*$", message)
    if given and given.group(1).strip("'\"") not in cause:
        cause += f" (got {given.group(1)})"
    return f"{'.'.join(keys)}: {cause}" if keys else cause


def say_mistake(prog: str, message: str) -> str:
    """A command-line mistake as mlplab says it: the error, then where the options are listed."""
    return f"{prog}: error: {message}\ntip: `{prog} --help` lists the options\n"


class CommandParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line and a tip, not the usage block first."""

    def error(self, message: str):
        self.exit(2, say_mistake(self.prog, message))


SQLITE_FULL = 13  # SQLite's primary result code for "database or disk is full"


def disk_full(err: BaseException) -> str | None:
    """Where in `err`'s chain a write found no space (SQLite's SQLITE_FULL, "database or disk
    is full", the OS ENOSPC), as a line to show; None if it did not. SQLite rolls the write back:
    the store keeps every earlier run."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    said = "no space left for the MLflow store (SQLite: database or disk is full)"
    for cause in chain:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return f"no space left on the device ({cause.filename or cause.strerror})"
        if (getattr(cause, "sqlite_errorcode", 0) or 0) & 0xFF == SQLITE_FULL:  # sqlite3, 3.11 on
            return said
    # SQLite's words where no code came with them: Python 3.10's sqlite3 has none (bpo-16379),
    # and a tracking server relays its store's error as MLflow's message alone
    if not any(hasattr(cause, "sqlite_errorcode") for cause in chain):
        if any("database or disk is full" in str(cause) for cause in chain):
            return said
    return None


# what a client is told when a tracking server turns its credentials away
CREDENTIALS_REFUSED = (
    "the tracking server refused these credentials (401); set MLFLOW_TRACKING_USERNAME/PASSWORD"
)


def refused(err: BaseException) -> str | None:
    """Where in `err`'s chain a tracking server refused a request (HTTP 401: no or wrong
    credentials; 403: an account without the permission, or a Host header the server does not
    serve), as a line to show; None if none did. MLflow raises these as `MlflowException`s (REST
    calls) or as `requests.HTTPError`s (artifact uploads)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status is None and callable(getattr(err, "get_http_status_code", None)):
            status = err.get_http_status_code()
        if status == 401:
            return CREDENTIALS_REFUSED
        if status == 403:
            # MLflow keeps a non-JSON answer's body (MLflow's own "Permission denied", its
            # Host-header check) only in its message: no attribute holds it
            said = re.search(r"Response body: '([^'\n]{1,200})", str(err))
            reason = said.group(1).strip() if said else "permission denied"
            advice = (
                "the server's --allowed_hosts must name the host of MLFLOW_TRACKING_URI"
                if "Host header" in reason
                else "the account in MLFLOW_TRACKING_USERNAME lacks the permission (an admin "
                "of the server grants it)"
            )
            return f"the tracking server refused this request (403: {reason}); {advice}"
        err = err.__cause__ or err.__context__
    return None


class DatasetError(UserError):
    """The dataset files are missing, truncated or corrupt: the message says how to fix it."""
