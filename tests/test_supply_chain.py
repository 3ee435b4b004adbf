"""The locked install and the audit: what `make install` installs and what `make audit` says.

No network: the lock's content is read, the install's failures use a local wheel, and pip-audit
is replaced by a stand-in (MLPLAB_PIP_AUDIT) that answers as the real one does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "dev.lock"
TOOLS = ROOT / "requirements" / "tools.lock"
UI = ROOT / "requirements" / "ui.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?: ; (.+?))?\s*\\?$")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"mlplab_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocks(path: Path) -> list[tuple[str, str, str | None, list[str]]]:
    """(name, version, marker, hashes) of each pinned requirement of a lock."""
    found = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = PIN.match(line)
        if match:
            found.append((*match.groups(), []))
        else:
            assert line.startswith("    --hash=sha256:"), f"{path.name}: not a pin or hash: {line}"
            found[-1][3].append(line.split("sha256:")[1].rstrip(" \\"))
    return found


def locked_set(python: str, system: str, machine: str) -> dict[str, str]:
    """What pip installs from the lock on that Python and platform: {name: version}."""
    env = {"python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": system, "platform_system": system.capitalize(),
           "platform_machine": machine, "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix"}  # fmt: skip
    chosen: dict[str, str] = {}
    for name, version, marker, _ in blocks(LOCK):
        if marker is None or Marker(marker).evaluate(env):
            assert name not in chosen, f"{name} twice for Python {python} on {system}"
            chosen[name] = version
    return chosen


# the lock's content


def test_every_locked_release_is_pinned_with_its_hashes():
    for path in (LOCK, TOOLS, UI):
        pins = blocks(path)
        assert pins, path
        for name, version, _, hashes in pins:
            assert hashes, f"{path.name}: {name}=={version} has no hash"
            assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    assert [p[0] for p in blocks(TOOLS)] == ["uv"]
    assert {p[0] for p in blocks(UI)} == {"playwright", "greenlet"}
    # a package in both locks is the same release (ui.lock is made against dev.lock)
    dev = {name: version for name, version, _, _ in blocks(LOCK)}
    assert all(dev.get(n, v) == v for n, v, _, _ in blocks(UI))


def test_lightning_and_what_it_pulls_are_at_least_2_6_6():
    """GHSA-w37p-236h-pfx3 (2.6.2 and 2.6.3 compromised) and CVE-2026-58659 (2.6.0-2.6.5)."""
    text = (ROOT / "pyproject.toml").read_text()
    assert "GHSA-w37p-236h-pfx3" in text and "CVE-2026-58659" in text and "#21691" in text
    project = load_script("lock").load_toml(ROOT / "pyproject.toml")["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    floors = {r.name: r.specifier for r in requirements}
    for name in ("lightning", "pytorch-lightning"):
        assert not any(floors[name].contains(v) for v in ("2.6.0", "2.6.2", "2.6.3", "2.6.5")), name
        assert floors[name].contains("2.6.6"), name
    locked = [(n, v) for n, v, _, _ in blocks(LOCK) if n in ("lightning", "pytorch-lightning")]
    assert {n for n, _ in locked} == {"lightning", "pytorch-lightning"}
    assert all(Version(v) >= Version("2.6.6") for _, v in locked), locked


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
@pytest.mark.parametrize("system,machine", [("linux", "x86_64"), ("linux", "aarch64"),
                                            ("darwin", "arm64")])  # fmt: skip
def test_the_lock_serves_each_python_and_platform(python, system, machine):
    """One version of each package, and all of mlplab's, for Python 3.10-3.13, Linux and macOS."""
    chosen = locked_set(python, system, machine)
    for name in ("torch", "torchvision", "lightning", "pytorch-lightning", "mlflow", "numpy",
                 "pytest", "pip-audit", "setuptools", "pip"):  # fmt: skip
        assert name in chosen, f"{name} missing for Python {python} on {system}"
    assert ("nvidia-cublas" in chosen) == (system == "linux")


def test_the_lock_is_made_from_this_pyproject():
    """A dependency changed without `make lock` stops `make install` (and so this test)."""
    load_script("lock").check(ROOT)


# the lock against pyproject.toml, as `make install` checks it


def lock_check(root: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / "lock.py"), "check", "--root", str(root)]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of what `make install` reads: pyproject.toml and the lock."""
    (tmp_path / "requirements").mkdir()
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copy(LOCK, tmp_path / "requirements")
    return tmp_path


def test_a_changed_dependency_is_one_line_naming_make_lock(project):
    pyproject = project / "pyproject.toml"
    assert lock_check(project).returncode == 0
    pyproject.write_text(pyproject.read_text().replace('"pandas>=2"', '"pandas>=2.1"'))
    done = lock_check(project)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "mlplab: requirements/dev.lock is older than pyproject.toml's dependencies; run `make lock`"
    ]


def test_only_the_requirements_count(project):
    """A comment, a tool's settings or the description changing needs no new lock."""
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text().replace("line-length = 100", "line-length = 99  # narrower")
    pyproject.write_text(text.replace('description = "', 'description = "Now: '))
    assert lock_check(project).returncode == 0
    # a build requirement does count
    pyproject.write_text(text.replace('["setuptools>=68"]', '["setuptools>=70"]'))
    assert lock_check(project).returncode == 1


def test_a_lock_not_written_by_make_lock_is_one_line(project):
    lock = project / "requirements" / "dev.lock"
    key = load_script("lock").DIGEST_KEY
    lock.write_text("".join(x for x in lock.read_text().splitlines(True) if not x.startswith(key)))
    done = lock_check(project)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert "not written by `make lock`" in done.stderr
    lock.unlink()
    missing = "mlplab: requirements/dev.lock is missing; run `make lock`\n"
    assert lock_check(project).stderr == missing


def test_make_install_stops_on_a_file_that_is_not_the_locked_one(tmp_path):
    """A download whose hash the lock does not list: one line, a non-zero exit, nothing installed
    (a local wheel stands for the index)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "tinypkg-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tinypkg/__init__.py", "")
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    (project / "requirements").mkdir()
    for name in ("Makefile", "pyproject.toml", "scripts/lock.py"):
        shutil.copy(ROOT / name, project / name)
    lock = load_script("lock")
    digest = lock.requirements_digest(project / "pyproject.toml")
    (project / "requirements" / "dev.lock").write_text(
        f"{lock.DIGEST_KEY} {digest}\n--no-index\n--find-links {wheels}\n"
        f"tinypkg==1.0 \\\n    --hash=sha256:{'0' * 64}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    done = subprocess.run(["make", "--no-print-directory", "install"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    ours = [x for x in done.stderr.splitlines() if x.startswith("mlplab:")]
    assert done.returncode != 0
    assert len(ours) == 1, done.stderr
    assert "tinypkg==1.0" in ours[0] and "which the lock does not list" in ours[0]
    assert not (project / ".venv" / ".installed").exists()
    assert not list((project / ".venv").glob("lib/python*/site-packages/tinypkg"))


WRONG = "--hash=sha256:" + "0" * 64


@pytest.mark.parametrize("line,said", [
    (f"tinypkg==1.0 {WRONG}", "the file downloaded for tinypkg==1.0 has sha256 "),
    ("tinypkg==1.0", "tinypkg==1.0 has no --hash (each locked release needs one); run `make lock`"),
])  # fmt: skip
def test_pip_refusing_a_lock_is_one_line(tmp_path, line, said):
    """pip's own complaints (a dry run: nothing is installed), as `make install` words them."""
    (tmp_path / "tinypkg-1.0-py3-none-any.whl").write_bytes(b"not the locked file")
    (tmp_path / "dev.lock").write_text(f"--no-index\n--find-links {tmp_path}\n{line}\n")
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--require-hashes",
               "--no-deps", "-r", str(tmp_path / "dev.lock")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    reason = load_script("lock").pip_failure(done.stderr)
    assert reason is not None and "\n" not in reason, done.stderr
    assert said in reason


# the audit, with a stand-in for pip-audit

FAKE_PIP_AUDIT = '''
import json, os, sys
args = sys.argv[1:]
pins = [x.strip().split("==") for x in open(args[args.index("-r") + 1]) if "==" in x]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(pins) + "\\n")
names = [n for n, _ in pins]
assert len(set(names)) == len(names), "a name twice"
assert {"--no-deps", "--disable-pip", "--format"} <= set(args)
mode = os.environ["FAKE_MODE"]
if mode == "vuln, then down":  # the first layer answers, the next does not
    mode = "vuln" if len(open(os.environ["FAKE_LOG"]).readlines()) == 1 else "down"
if mode == "down":
    sys.exit("requests.exceptions.ConnectionError: HTTPSConnectionPool(host='pypi.org', "
             "port=443): Max retries exceeded with url: /pypi/lightning/2.6.3/json")
if mode == "broken":
    sys.exit("pip-audit: error: unrecognized arguments: --frobnicate")
deps = []
for name, version in pins:
    if mode == "404":
        deps.append({"name": name, "skip_reason": "Dependency not found on PyPI and could not be "
                     f"audited: {name} ({version})"})
        continue
    vulns = []
    if mode == "vuln" and name == "lightning":
        vulns = [{"id": "GHSA-w37p-236h-pfx3", "fix_versions": ["2.6.6"],
                  "aliases": ["CVE-2026-99999"], "description": "compromised upload"}]
    deps.append({"name": name, "version": version, "vulns": vulns})
print(json.dumps({"dependencies": deps, "fixes": []}))
sys.exit(1 if any(d.get("vulns") for d in deps) else 0)
'''


@pytest.fixture
def audit(tmp_path):
    """Runs scripts/audit.py on a small lock (lightning 2.6.3, numpy twice) with the stand-in."""
    fake = tmp_path / "fake_pip_audit.py"
    fake.write_text(FAKE_PIP_AUDIT)
    lock = tmp_path / "small.lock"
    lock.write_text(
        "lightning==2.6.3 \\\n    --hash=sha256:" + "1" * 64 + "\n"
        "numpy==2.2.6 ; python_full_version < '3.11' \\\n    --hash=sha256:" + "2" * 64 + "\n"
        "numpy==2.4.6 ; python_full_version >= '3.11' \\\n    --hash=sha256:" + "3" * 64 + "\n"
    )
    log = tmp_path / "calls.jsonl"

    def run(mode: str, ignore: str | None = None, locks: list[Path] | None = None):
        command = [sys.executable, str(ROOT / "scripts" / "audit.py"), *map(str, locks or [lock])]
        if ignore is not None:
            (tmp_path / "ignore.txt").write_text(ignore)
            command += ["--ignore", str(tmp_path / "ignore.txt")]
        stand_in = f"{shlex.quote(sys.executable)} {shlex.quote(str(fake))}"
        env = {**os.environ, "FAKE_MODE": mode, "FAKE_LOG": str(log), "MLPLAB_PIP_AUDIT": stand_in}
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    run.log = log
    return run


def test_an_advisory_fails_the_audit_naming_it(audit):
    done = audit("vuln")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == ("mlplab audit: lightning 2.6.3: GHSA-w37p-236h-pfx3 / CVE-2026-99999; "
                        "fixed in: 2.6.6")  # fmt: skip
    assert "1 advisories" in lines[-1] and "make lock" in lines[-1]


def test_every_version_of_a_package_is_audited(audit):
    """Each numpy of the universal lock, in separate runs (pip-audit takes a name once)."""
    assert audit("clean").returncode == 0
    calls = [json.loads(x) for x in audit.log.read_text().splitlines()]
    assert sorted(map(tuple, sum(calls, []))) == [
        ("lightning", "2.6.3"), ("numpy", "2.2.6"), ("numpy", "2.4.6")]  # fmt: skip
    assert len(calls) == 2


def test_the_real_lock_is_audited_whole(audit):
    assert audit("clean", locks=[LOCK, TOOLS, UI]).returncode == 0
    sent = {tuple(p) for call in audit.log.read_text().splitlines() for p in json.loads(call)}
    assert sent == {(n, v) for path in (LOCK, TOOLS, UI) for n, v, _, _ in blocks(path)}


@pytest.mark.parametrize("listed", ["GHSA-w37p-236h-pfx3", "CVE-2026-99999"])
def test_an_ignored_advisory_passes_with_its_reason(audit, listed):
    done = audit("vuln", ignore=f"# why\n\n{listed}   mlplab never installs 2.6.3 (test)\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ignored GHSA-w37p-236h-pfx3 / CVE-2026-99999 (lightning 2.6.3): " \
        "mlplab never installs 2.6.3 (test)" in done.stdout
    assert "no known advisory (1 ignored" in done.stdout.splitlines()[-1]


def test_an_ignore_line_without_a_reason_is_one_line(audit):
    done = audit("vuln", ignore="# comment\nGHSA-w37p-236h-pfx3\n")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"mlplab audit: {audit.log.parent / 'ignore.txt'}:2: GHSA-w37p-236h-pfx3 has no reason; "
        "write after the ID why it does not apply to mlplab"
    ]
    done = audit("vuln", ignore="lightning is fine\n")
    assert done.returncode == 2 and "is not an advisory ID" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_an_ignore_line_no_advisory_needs_is_said(audit):
    done = audit("clean", ignore="CVE-2020-1 an old one\n")
    assert done.returncode == 0
    assert "lists CVE-2020-1, which no locked release has" in done.stdout


@pytest.mark.parametrize("mode", ["down", "404"])
def test_an_unreachable_service_is_one_line_and_no_failure(audit, mode):
    done = audit(mode)
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == 1 and not done.stderr
    assert done.stdout.startswith("mlplab audit: NOT CHECKED: the advisory service")


def test_an_advisory_found_fails_though_a_later_layer_is_unreachable(audit):
    done = audit("vuln, then down")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "lightning 2.6.3: GHSA-w37p-236h-pfx3" in done.stdout
    assert "releases not checked" in done.stdout


def test_pip_audit_failing_otherwise_is_one_line(audit):
    done = audit("broken")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "mlplab audit: pip-audit failed: pip-audit: error: unrecognized arguments: --frobnicate"
    ]
