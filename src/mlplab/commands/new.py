"""`mlplab new NAME`: a project of your own, copied from the template's package.

    mlplab new cats                # src/cats/, configs/cats/, tests/test_cats.py
    mlplab fit --config configs/cats/xor.yaml

Copies the package (`--from`, the template's `my_project`) to src/NAME, every config that names
it to configs/NAME/ and its tests to tests/test_NAME.py, with the package's name, `class_path`s
and config paths rewritten: the copy trains at once, and is yours to edit. Run it at the
project's root (where src/ and configs/ are). Nothing is imported; nothing existing is
overwritten.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import shutil
import sys
from pathlib import Path

from mlplab.errors import CommandParser, UserError


def source_package(name: str) -> Path:
    """The folder of the package to copy, found without importing it."""
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--from {name}: no such package here; give the package to copy")
    return Path(next(iter(spec.submodule_search_locations)))


def check_name(name: str) -> None:
    if not name.isidentifier() or keyword.iskeyword(name) or not name.islower():
        raise UserError(
            f"{name!r} cannot name a Python package; use lower case letters, digits and _ "
            "(e.g. cats or my_lab)"
        )
    if importlib.util.find_spec(name) is not None:
        raise UserError(f"{name!r} is already an importable module; choose another name")


def rewrite(text: str, old: str, new: str, configs: dict[str, str]) -> str:
    """`old` as a name (imports, `class_path`s) becomes `new`; paths of copied configs
    (configs/X.yaml, or X in a test's `config("X")`) point at the copies."""
    text = re.sub(rf"\b{re.escape(old)}\b", new, text)
    for before, after in configs.items():
        text = text.replace(f"configs/{before}.yaml", f"configs/{after}.yaml")
        text = text.replace(f'config("{before}")', f'config("{after}")')
    return text


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="mlplab new", description=__doc__)
    parser.add_argument("name", help="the new package's name (a Python identifier)")
    parser.add_argument("--from", dest="template", default="my_project",
                        help="the package to copy (default: my_project)")  # fmt: skip
    args = parser.parse_args(argv)
    root = Path.cwd()
    check_name(args.name)
    source = source_package(args.template)
    package = root / "src" / args.name
    configs_out = root / "configs" / args.name
    test_in = root / "tests" / f"test_{args.template}.py"
    test_out = root / "tests" / f"test_{args.name}.py"
    for path in (package, configs_out, test_out):
        if path.exists():
            raise UserError(f"{path} exists; choose another name or remove it")
    # the configs that name the package, by their path under configs/ without .yaml
    configs = {}
    for path in sorted((root / "configs").rglob("*.yaml")):
        relative = path.relative_to(root / "configs").with_suffix("").as_posix()
        if re.search(rf"\b{re.escape(args.template)}\.", path.read_text()):
            configs[relative] = f"{args.name}/{relative}"
    if not configs:
        raise UserError(f"no config under {root / 'configs'} names {args.template}; run "
                        "`mlplab new` at the project's root")  # fmt: skip

    shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in package.rglob("*.py"):
        path.write_text(rewrite(path.read_text(), args.template, args.name, configs))
    for before, after in configs.items():
        target = root / "configs" / f"{after}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        text = (root / "configs" / f"{before}.yaml").read_text()
        target.write_text(rewrite(text, args.template, args.name, configs))
    if test_in.is_file():
        test_out.write_text(rewrite(test_in.read_text(), args.template, args.name, configs))
    first = "xor" if "xor" in configs else next(iter(configs))
    tests = f", tests/{test_out.name}" if test_in.is_file() else ""
    print(
        f"mlplab new: src/{args.name}/ (from {args.template}), {len(configs)} configs in "
        f"configs/{args.name}/{tests}; train one: mlplab fit --config "
        f"configs/{configs[first]}.yaml",
        file=sys.stderr,
    )
