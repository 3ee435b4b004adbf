"""The lock files: the exact releases, with their hashes, that `make install` installs.

    python scripts/lock.py check              # was the lock made from pyproject.toml?
    python scripts/lock.py install            # check, then install the lock with hash checking
    python scripts/lock.py install-ui         # Playwright for `make ui-check`, hashes checked
    python scripts/lock.py lock [--upgrade]   # write the locks again with uv (`make lock`)

- `requirements/dev.lock`: mlplab with its `dev` extra, for Python 3.10+ on every platform (uv's
  universal resolution: a release for another Python or platform carries its marker), plus the
  build backend (the editable install builds without isolation) and pip. Its header holds the
  sha256 of pyproject.toml's requirements (`build-system.requires`, `requires-python`,
  `dependencies`, `optional-dependencies`): `install` stops in one line when they changed since.
- `requirements/tools.lock`: uv, which `lock` installs from it (into the Python that runs it)
  to write the locks.
- `requirements/ui.lock`: Playwright for `make ui-check`, constrained by `dev.lock` (a package
  both hold is the same release).

`install` runs `pip install --require-hashes --no-deps -r requirements/dev.lock` in the Python
that runs it (the venv's; the locked pip is installed first), then mlplab itself, editable,
without dependencies or an index, then `pip check`. A download whose hash the lock does not list
stops it in one line.

`lock` resolves with uv against PyPI, leaving out releases younger than the cooldown (`--cooldown`,
3 days by default: a compromised upload is usually found and pulled within days), and keeps the
locked version of every package that still fits unless `--upgrade`.

Standard library only (tomllib, or pip's own tomli on Python 3.10).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path("requirements/dev.lock")
TOOLS_LOCK = Path("requirements/tools.lock")
UI_LOCK = Path("requirements/ui.lock")
DIGEST_KEY = "# mlplab-requirements-sha256:"
COOLDOWN = "3 days"


class LockError(Exception):
    """A one-line reason the lock cannot be used."""


def load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip ships tomli
        # pip's private copy: this runs before anything is installed (the public `tomli` comes
        # with the lock), and Python 3.10 has no tomllib
        from pip._vendor import tomli as tomllib
    with path.open("rb") as f:
        return tomllib.load(f)


def requirements_digest(pyproject: Path) -> str:
    """sha256 of what the lock is made from: pyproject.toml's requirements, as parsed (a comment
    or a change elsewhere in the file does not count)."""
    data = load_toml(pyproject)
    project = data.get("project", {})
    what = {
        "build-system.requires": data.get("build-system", {}).get("requires", []),
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    text = json.dumps(what, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def locked_digest(lock: Path) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_KEY):
            return line[len(DIGEST_KEY) :].strip()
        if line and not line.startswith("#"):
            break
    return None


def check(root: Path) -> None:
    """Raise LockError unless root's lock was made from root's pyproject.toml."""
    lock = root / LOCK
    if not lock.is_file():
        raise LockError(f"{LOCK} is missing; run `make lock`")
    found = locked_digest(lock)
    if found is None:
        raise LockError(f"{LOCK} has no '{DIGEST_KEY}' line (not written by `make lock`); "
                        "run `make lock`")
    if found != requirements_digest(root / "pyproject.toml"):
        raise LockError(f"{LOCK} is older than pyproject.toml's dependencies; run `make lock`")


def pip_failure(stderr: str, lock: Path = LOCK) -> str | None:
    """pip's complaint about a lock, as one line (None: pip failed for another reason).

    pip is run as a command (it has no supported Python API) and says what failed only in its
    messages: they are read."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if "DO NOT MATCH THE HASHES" in line:
            rest = [x.strip() for x in lines[i + 1 :] if x.strip()]
            what = rest[0].split(" from ")[0].rstrip(":") if rest else "a package"
            got = next((x.split()[-1] for x in rest if x.startswith("Got")), "?")
            return (f"{lock}: the file downloaded for {what} has sha256 {got}, which the lock "
                    "does not list: it is not the file that was locked. Do not install it; if its "
                    "release was replaced on purpose, run `make lock` to take the new file")
        if "Hashes are required in --require-hashes mode" in line:
            rest = [x.strip() for x in lines[i + 1 :] if x.strip() and "--hash=" in x]
            what = rest[0].split(" --hash=")[0] if rest else "a requirement"
            return f"{lock}: {what} has no --hash (each locked release needs one); run `make lock`"
        if "all requirements must have their versions pinned" in line:
            rest = [x.strip() for x in lines[i + 1 :] if x.strip()]
            what = rest[0].split(" from ")[0] if rest else "a requirement"
            return f"{lock}: {what} is not pinned with ==; run `make lock`"
    return None


def run_pip(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(command, capture_output=True, text=True)


def pinned_block(text: str, name: str) -> str:
    """The lines that pin `name` in a lock: `name==version \\` and its `--hash` lines ('': none)."""
    lines = text.splitlines()
    start = next((i for i, x in enumerate(lines) if x.startswith(f"{name}==")), None)
    if start is None:
        return ""
    end = start
    while lines[end].rstrip().endswith("\\") and end + 1 < len(lines):
        end += 1
    return "\n".join(lines[start : end + 1]) + "\n"


def pip_install(requirements: Path, lock: Path = LOCK) -> None:
    """pip install, hashes required, of `requirements` (taken from `lock`)."""
    done = run_pip(["install", "--quiet", "--require-hashes", "--no-deps", "-r", str(requirements)])
    if done.returncode:
        reason = pip_failure(done.stderr, lock)
        if reason:
            raise LockError(reason)
        sys.stderr.write(done.stderr)
        raise LockError(f"pip install -r {lock} failed (its messages are above)")
    # pip's warnings (a yanked release, ...), less one per package for an index folder that lacks
    # it (by its text: pip's only output)
    for line in done.stderr.splitlines():
        if not re.match(r"WARNING: Location '.*' is ignored", line):
            print(line, file=sys.stderr)


def install(root: Path) -> None:
    check(root)
    # the locked pip first: the venv's own is older, and slower by a minute on the rest
    pip = pinned_block((root / LOCK).read_text(), "pip")
    if pip:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "pip.txt").write_text(pip)
            pip_install(Path(tmp) / "pip.txt")
    pip_install(root / LOCK)
    mlplab = ["install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "-e"]
    done = run_pip([*mlplab, str(root)])
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise LockError("the editable install of mlplab failed (pip's messages are above)")
    done = run_pip(["check"])
    if done.returncode:
        first = (done.stdout.strip() or done.stderr.strip()).splitlines()[0]
        raise LockError(f"the installed set does not hold together ({first}); run `make lock`")


def write_digest(root: Path) -> None:
    """Put the requirements' digest into the lock's header, after uv's own lines."""
    lock = root / LOCK
    lines = [x for x in lock.read_text().splitlines() if not x.startswith(DIGEST_KEY)]
    header = 0
    while header < len(lines) and lines[header].startswith("#"):
        header += 1
    stamp = f"{DIGEST_KEY} {requirements_digest(root / 'pyproject.toml')}"
    lines.insert(min(header, 2), stamp)
    lock.write_text("\n".join(lines) + "\n")


def uv_compile(root: Path, inputs: list[str], stdin: str, output: Path, options: list[str]) -> None:
    uv = Path(sys.executable).parent / "uv"
    command = [str(uv), "pip", "compile", *inputs, "-", "--universal", "--generate-hashes",
               "--custom-compile-command", "make lock", "--quiet", "-o", str(output), *options]
    env = {**os.environ, "UV_NO_CONFIG": "1"}  # no uv.toml or [tool.uv] from elsewhere
    done = subprocess.run(command, cwd=root, input=stdin, text=True, env=env)
    if done.returncode:
        raise LockError(f"uv could not write {output} (its messages are above)")


def lock(root: Path, upgrade: bool, cooldown: str) -> None:
    pip_install(root / TOOLS_LOCK, TOOLS_LOCK)  # uv
    data = load_toml(root / "pyproject.toml")
    # the oldest Python of requires-python: the universal resolution covers it and every later one
    oldest = re.search(r">=\s*([0-9.]+)", data["project"]["requires-python"]).group(1)
    options = ["--python-version", oldest, "--exclude-newer", cooldown]
    options += ["--upgrade"] if upgrade else []
    build = data.get("build-system", {}).get("requires", [])
    uv_compile(root, ["pyproject.toml", "--extra", "dev"], "\n".join([*build, "pip"]) + "\n",
               LOCK, options)
    write_digest(root)
    uv_compile(root, [], "uv\n", TOOLS_LOCK, options)
    uv_compile(root, ["-c", str(LOCK)], "playwright\n", UI_LOCK, options)
    pins = re.findall(r"^(lightning|pytorch-lightning|torch|torchvision)==(\S+)",
                      (root / LOCK).read_text(), re.M)
    print(f"mlplab: wrote {LOCK}, {TOOLS_LOCK} and {UI_LOCK} (releases at least {cooldown} old): "
          + ", ".join(f"{n} {v}" for n, v in pins))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lock.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["check", "install", "install-ui", "lock"])
    parser.add_argument("--root", type=Path, default=ROOT, help="the project (default: this one)")
    parser.add_argument("--upgrade", action="store_true", help="lock: newest releases allowed")
    parser.add_argument("--cooldown", default=COOLDOWN, help=f"lock: default {COOLDOWN!r}")
    args = parser.parse_args(argv)
    try:
        if args.action == "check":
            check(args.root)
        elif args.action == "install":
            install(args.root)
        elif args.action == "install-ui":
            pip_install(args.root / UI_LOCK, UI_LOCK)
        else:
            lock(args.root, args.upgrade, args.cooldown)
    except LockError as error:
        print(f"mlplab: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
