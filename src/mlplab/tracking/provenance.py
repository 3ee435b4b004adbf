"""Where a run comes from, as MLflow's own system tags show it in the UI: the git commit (and
whether the tree was dirty), the user, one source name for every mlplab run, the config files,
the command line; the first config's header comment as the run's description.

MLflow reads the git commit only for runs it starts from a script inside a repository; mlplab's
runs are created through the client (Lightning's logger, sweep and search parents), so they are
told here, from the repository that holds the first config (else the working directory).
"""

from __future__ import annotations

import getpass
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

from mlplab.tracking.store import redact_uri

# MLflow's system tags (https://mlflow.org/docs/latest/ml/tracking/tracking-api/#system-tags)
COMMIT, SOURCE, SOURCE_TYPE, USER, NOTE = (
    "mlflow.source.git.commit", "mlflow.source.name", "mlflow.source.type", "mlflow.user",
    "mlflow.note.content",
)  # fmt: skip


def git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def header_comment(path: Path) -> str:
    """The comment lines a YAML config opens with, as text."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines).strip()


def tags(command: str, args: list[str], configs: list[str]) -> dict[str, str]:
    """The provenance tags of a run of `mlplab COMMAND ARGS` with these config files."""
    files = [Path(c) for c in configs if Path(c).is_file()]
    folder = files[0].resolve().parent if files else Path.cwd()
    found = {
        SOURCE: f"mlplab {command}",
        SOURCE_TYPE: "PROJECT",
        USER: getpass.getuser(),
        "mlplab.command_line": redact_uri(shlex.join(["mlplab", command, *args])),
    }
    if files:
        found["mlplab.configs"] = ", ".join(str(f) for f in files)
        if note := header_comment(files[0]):
            found[NOTE] = note
    commit = git(folder, "rev-parse", "HEAD")
    if commit:
        found[COMMIT] = commit
        changed = git(folder, "status", "--porcelain", "--untracked-files=no")
        found["mlplab.git.dirty"] = str(bool(changed))
    return found


# the command line a command was given (`mlplab sweep ...`), set by the command itself: an
# in-process caller (a test, `mlplab reproduce`) has another `sys.argv`
command_line: list[str] | None = None


def of_this_process(command: str, configs: list[str]) -> dict[str, str]:
    """`tags` for the command this process runs."""
    argv = command_line if command_line is not None else sys.argv[1:]
    args = argv[1:] if argv and argv[0] == command else argv
    return tags(command, args, configs)


# flags that say where a run goes or how it is shown, not what it trains: not in its name
UNNAMED = ("config", "c", "experiment_name", "run_name", "tracking_uri", "tags", "ckpt_path",
           "weights_only", "register_model", "register_alias", "log_system_metrics",
           "trainer.enable_progress_bar")  # fmt: skip


def run_name(experiment: str, args: list[str]) -> str:
    """A name that says what the run is: the experiment (the config's name), the settings the
    command line changes (their last part: `lr=0.05 max_epochs=50`), and four random hex
    digits that keep it unique."""
    changed, at = [], 0
    while at < len(args):
        flag, equals, value = args[at].partition("=")
        if flag.startswith("-") and not equals and at + 1 < len(args):
            value, at = args[at + 1], at + 1
        key = flag.lstrip("-")
        if flag.startswith("-") and key not in UNNAMED and value:
            changed.append(f"{key.rsplit('.', 1)[-1]}={value}")
        at += 1
    described = " ".join([experiment, *changed])
    return f"{described[:80]} {secrets.token_hex(2)}"

