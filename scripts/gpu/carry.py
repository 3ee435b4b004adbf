"""What an offline GPU machine needs to run mlplab, prepared on a machine with network.

    python scripts/gpu/carry.py [--to .gpu] [--datasets MNIST FashionMNIST]

writes
- `wheels/`: wheels, for the GPU machine's Python and platform (3.12, manylinux x86-64), of
  every distribution mlplab needs that the machine does not ship (`shipped.txt`: the names of
  its packages), resolved by pip from mlplab's requirements;
- `datasets/`: the datasets as the gzipped IDX files torchvision publishes (a quarter of the
  size; mlplab's datamodules read them as they are), from `$MLPLAB_DATA_DIR`.

There, `make gpu-check` (`scripts/gpu/check.sh python3 --carry .gpu`) installs the wheels with
`pip --no-index` into `.gpu/site` and reads the data from `.gpu/datasets`. Sizes (2026-11-23):
the wheels 35.7 MiB, MNIST 10.7 MiB, Fashion-MNIST 29.2 MiB.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def normal(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def shipped(path: Path) -> set[str]:
    text = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
    return {normal(name) for name in text.split()}


def target_options(python: str) -> list[str]:
    options = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for platform in PLATFORMS:
        options += ["--platform", platform]
    return options


def resolve(requirements: list[str], python: str) -> list[tuple[str, str]]:
    """(name, version) of every distribution these requirements install on that Python,
    as pip resolves them (from the index's metadata: nothing is downloaded)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        target = str(Path(tmp) / "target")
        pip(["install", "--dry-run", "--ignore-installed", "--report", str(report),
             "--target", target, *target_options(python), *requirements])  # fmt: skip
        found = json.loads(report.read_text())["install"]
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in found]


def pip(args: list[str]) -> None:
    command = [sys.executable, "-m", "pip", "-q", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        # pip's own error lines, for the message (pip runs as a command: text is all it says)
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        sys.exit(f"carry.py: error: pip {args[0]} failed: {(errors or [done.stderr.strip()])[-1]}")


def wheels(folder: Path, python: str, leave_out: set[str]) -> list[Path]:
    # the installed mlplab's own requirements (its extras left out)
    requirements = [r for r in importlib.metadata.requires("mlplab") if "extra ==" not in r]
    # what the machine ships is not resolved again: its own builds (torch's CUDA libraries)
    # differ from the index's
    missing = [r for r in requirements if normal(re.split(r"[\s<>=!~;\[]", r)[0]) not in leave_out]
    needed = [(n, v) for n, v in resolve(missing, python) if normal(n) not in leave_out]
    if folder.exists():
        shutil.rmtree(folder)  # one version of each: two would stop the install
    folder.mkdir(parents=True)
    pip(["download", "--no-deps", "--dest", str(folder), *target_options(python),
         *(f"{name}=={version}" for name, version in needed)])  # fmt: skip
    return sorted(folder.glob("*.whl"))


def datasets(folder: Path, source: Path, names: list[str]) -> list[Path]:
    if folder.exists():
        shutil.rmtree(folder)  # only the datasets asked for travel
    written = []
    for name in names:
        raw = source / name / "raw"
        files = sorted(raw.glob("*-ubyte"))
        if not files:
            sys.exit(f"carry.py: error: no {name} IDX files in {raw}; set MLPLAB_DATA_DIR")
        out = folder / name / "raw"
        out.mkdir(parents=True, exist_ok=True)
        for path in files:
            packed = out / f"{path.name}.gz"
            packed.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
            written.append(packed)
    return written


def mib(paths: list[Path]) -> str:
    return f"{sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--to", type=Path, default=ROOT / ".gpu", help="the folder to fill")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    parser.add_argument("--shipped", type=Path, default=Path(__file__).with_name("shipped.txt"))
    parser.add_argument(
        "--datasets", nargs="*", default=["MNIST", "FashionMNIST"], help="none: no data"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("MLPLAB_DATA_DIR", ROOT.parent / "shared" / "datasets")),
    )
    args = parser.parse_args()
    found = wheels(args.to / "wheels", args.python, shipped(args.shipped))
    print(f"{len(found)} wheels, {mib(found)}, in {args.to / 'wheels'}")
    if args.datasets:
        packed = datasets(args.to / "datasets", args.data_dir, args.datasets)
        print(f"{', '.join(args.datasets)}: {mib(packed)} gzipped, in {args.to / 'datasets'}")


if __name__ == "__main__":
    main()
