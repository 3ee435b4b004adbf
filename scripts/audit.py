"""`make audit`: the locked releases against the public advisory database, with pip-audit.

    python scripts/audit.py [--ignore requirements/audit-ignore.txt] LOCK [LOCK ...]

Every `name==version` of the locks is checked, those for other Pythons and platforms too (a
universal lock holds several versions of some packages: pip-audit takes one version of a name at
a time, so it runs once per layer). Nothing is installed; pip-audit asks PyPI, whose advisory data
is the PyPA advisory database (OSV).

Outcomes, each in one line:
- no known advisory: exit 0;
- advisories: one line each (package, version, ID and aliases, the fixed versions), exit 1;
- an advisory listed in the ignore file (`ID reason`, the reason mandatory; the ID or one of its
  aliases): its line says it is ignored and why, and it does not fail the audit;
- the advisory service cannot be reached, or answers for none of the releases: says so, exit 0
  (the audit did not run; that alone is not a failure);
- a bad ignore file, an unreadable lock, pip-audit failing otherwise: exit 2.

`MLPLAB_PIP_AUDIT` names another command to run instead of `python -m pip_audit` (the tests give
a stand-in).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
ADVISORY_ID = re.compile(r"^[A-Z][A-Z0-9]*-[A-Za-z0-9][A-Za-z0-9-]*$")
# what requests, urllib3 and pip-audit say when no answer came back (pip-audit runs as a
# command: its stderr text is all it says about why no report came)
UNREACHABLE = re.compile(
    r"ConnectionError|ConnectTimeout|ReadTimeout|Timeout|NameResolution|Name or service not known"
    r"|Temporary failure in name resolution|Max retries exceeded|Network is unreachable"
    r"|Connection refused|SSLError|ServiceError|ProxyError|RemoteDisconnected"
)
TIMEOUT_S = 300


class AuditError(Exception):
    """One line: the audit could not run as asked (exit 2)."""


def read_ignores(path: Path | None) -> dict[str, str]:
    """{advisory ID: reason} from the ignore file: `ID reason` lines, `#` lines, blank lines."""
    if path is None or not path.exists():
        return {}
    ignores = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        advisory, reason = [*line.split(None, 1), ""][:2]
        if not ADVISORY_ID.match(advisory):
            raise AuditError(f"{path}:{number}: {advisory!r} is not an advisory ID "
                             "(GHSA-..., CVE-..., PYSEC-...); a line is `ID reason`")
        if not reason.strip():
            raise AuditError(f"{path}:{number}: {advisory} has no reason; write after the ID why "
                             "it does not apply to mlplab")
        ignores[advisory] = reason.strip()
    return ignores


def read_pins(locks: list[Path]) -> list[tuple[str, str]]:
    pins: list[tuple[str, str]] = []
    for lock in locks:
        try:
            text = lock.read_text()
        except OSError as error:
            raise AuditError(f"cannot read {lock}: {error.strerror}") from None
        for line in text.splitlines():
            match = PIN.match(line)
            if match and match.groups() not in pins:
                pins.append(match.groups())
    if not pins:
        raise AuditError(f"no `name==version` line in {', '.join(map(str, locks))}")
    return pins


def layers(pins: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The pins in groups holding each name at most once (pip-audit refuses a name twice)."""
    groups: list[list[tuple[str, str]]] = []
    for name, version in pins:
        key = re.sub(r"[-_.]+", "-", name).lower()
        for group in groups:
            if key not in {re.sub(r"[-_.]+", "-", n).lower() for n, _ in group}:
                group.append((name, version))
                break
        else:
            groups.append([(name, version)])
    return groups


def pip_audit_command() -> list[str]:
    other = os.environ.get("MLPLAB_PIP_AUDIT")
    return shlex.split(other) if other else [sys.executable, "-m", "pip_audit"]


def run_layer(group: list[tuple[str, str]]) -> dict | str:
    """pip-audit's JSON report for these pins, or why the service could not be asked."""
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "locked.txt"
        requirements.write_text("".join(f"{n}=={v}\n" for n, v in group))
        command = [*pip_audit_command(), "-r", str(requirements), "--no-deps", "--disable-pip",
                   "--format", "json", "--progress-spinner", "off", "--timeout", "15"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"no answer within {TIMEOUT_S} s"
        except OSError as error:
            raise AuditError(f"cannot run {command[0]}: {error.strerror}") from None
    try:
        report = json.loads(done.stdout)
        if isinstance(report, dict) and "dependencies" in report:
            return report
    except json.JSONDecodeError:
        pass
    said = [x.strip() for x in done.stderr.splitlines() if x.strip()]
    unreachable = [x for x in said if UNREACHABLE.search(x)]
    if unreachable:
        return unreachable[-1][:200]
    last = said[-1][:300] if said else f"exit status {done.returncode}, no report"
    raise AuditError(f"pip-audit failed: {last}")


def audit(locks: list[Path], ignore_file: Path | None) -> int:
    ignores = read_ignores(ignore_file)
    pins = read_pins(locks)
    found, skipped, checked, unreached = [], [], 0, None
    for group in layers(pins):
        report = run_layer(group)
        if isinstance(report, str):  # this layer unheard; what others found still counts
            unreached = unreached or report
            skipped += [report] * len(group)
            continue
        for dependency in report["dependencies"]:
            if "skip_reason" in dependency:
                skipped.append(dependency["skip_reason"])
                continue
            checked += 1
            for vuln in dependency.get("vulns", []):
                found.append((dependency["name"], dependency["version"], vuln))
    if not checked:
        why = f"could not be reached ({unreached})" if unreached else (
            f"answered for none of them ({skipped[0] if skipped else 'no report'})")  # fmt: skip
        print(f"mlplab audit: NOT CHECKED: the advisory service {why}; the {len(pins)} locked "
              "releases were not audited")
        return 0
    failed, used = 0, set()
    for name, version, vuln in found:
        ids = [vuln["id"], *vuln.get("aliases", [])]
        fixed = ", ".join(vuln.get("fix_versions", [])) or "none yet"
        reason = next((ignores[x] for x in ids if x in ignores), None)
        if reason:
            used.update(ids)
            print(f"mlplab audit: ignored {' / '.join(ids)} ({name} {version}): {reason}")
        else:
            failed += 1
            print(f"mlplab audit: {name} {version}: {' / '.join(ids)}; fixed in: {fixed}")
    if skipped:
        print(f"mlplab audit: {len(skipped)} releases not checked ({skipped[0]})")
    for advisory in ignores.keys() - used:
        print(f"mlplab audit: {ignore_file} lists {advisory}, which no locked release has (any "
              "more): remove its line")
    where = ", ".join(map(str, locks))
    if failed:
        print(f"mlplab audit: {failed} advisories in {where}: raise the package's floor in "
              "pyproject.toml and run `make lock`, or list the ID with its reason in "
              f"{ignore_file}")
        return 1
    print(f"mlplab audit: {checked} locked releases checked: no known advisory"
          + (f" ({len(found)} ignored, see {ignore_file})" if found else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/audit.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("locks", nargs="+", type=Path, help="lock files (name==version lines)")
    parser.add_argument("--ignore", type=Path, help="ignore file: `ID reason` lines")
    args = parser.parse_args(argv)
    try:
        return audit(args.locks, args.ignore)
    except AuditError as error:
        print(f"mlplab audit: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
