"""The two rooms: the project's package (`my_project`) and the platform (`mlplab`), which never
imports it; `mlplab new` makes a project of one's own that trains at once."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys

import torch

from conftest import ROOT, experiment_runs, run_mlplab, store_uri
from mlplab.safety.metadata import TASK

PLATFORM = ROOT / "src" / "mlplab"
PROJECT = ROOT / "src" / "my_project"


def imported_names(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_platform_never_imports_the_project():
    for path in PLATFORM.rglob("*.py"):
        found = {n for n in imported_names(path) if n.split(".")[0] == "my_project"}
        assert not found, f"{path.relative_to(ROOT)} imports {found}"
    # every platform module imported: the project's package is not among the modules loaded
    code = (
        "import pkgutil, importlib, sys, mlplab\n"
        "for m in pkgutil.walk_packages(mlplab.__path__, 'mlplab.'):\n"
        "    if m.name != 'mlplab.__main__':  # the command itself\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'my_project'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def lines(path) -> int:
    return len(path.read_text().splitlines())


def test_the_project_package_is_small_and_its_task_base_smaller():
    assert sum(lines(p) for p in PROJECT.rglob("*.py")) < 2000
    assert lines(PROJECT / "models" / "task.py") < 200


def test_mlplab_new_copies_the_project_and_the_copy_trains(tmp_path):
    """At a project's root: src/cats/, configs/cats/, tests/test_cats.py, names rewritten;
    `mlplab fit` of a copied config trains the copy's classes."""
    shutil.copytree(PROJECT, tmp_path / "src" / "my_project",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "test_my_project.py", tmp_path / "tests")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), str(ROOT / "src")])}
    made = run_mlplab("new", "cats", cwd=tmp_path, env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "train one: mlplab fit --config configs/cats/xor.yaml" in made.stderr
    assert (tmp_path / "src" / "cats" / "models" / "task.py").is_file()
    copied = (tmp_path / "configs" / "cats" / "xor.yaml").read_text()
    assert "cats.models.Classifier" in copied and "my_project" not in copied
    assert "from cats.models import" in (tmp_path / "tests" / "test_cats.py").read_text()
    assert not any("my_project" in p.read_text() for p in (tmp_path / "src" / "cats").rglob("*.py"))

    uri = store_uri(tmp_path)
    fit = run_mlplab("fit", "--config", "configs/cats/xor.yaml", "--trainer.max_epochs", "3",
                     cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": uri})  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    # the summary tells the last epoch's figures from the tested checkpoint's
    assert "mlplab: last epoch: train/acc=" in fit.stdout
    assert re.search(r";  tested checkpoint \(epoch \d\): test/acc=", fit.stdout)
    (run,) = experiment_runs(uri, "xor")[1]
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "cats.models.Classifier"
    (best,) = (tmp_path / "mlruns" / "xor" / run.info.run_id / "checkpoints").glob("best-*.ckpt")
    assert torch.load(best, weights_only=True)[TASK] == "cats.models.classifier.Classifier"

    again = run_mlplab("new", "cats", cwd=tmp_path, env=env)
    assert again.returncode == 2 and "already an importable module" in again.stderr
    for name, says in (("Cats-1", "cannot name a Python package"),
                       ("torch", "already an importable module")):  # fmt: skip
        refused = run_mlplab("new", name, cwd=tmp_path, env=env)
        assert refused.returncode == 2 and says in refused.stderr
        assert "Traceback" not in refused.stderr


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT / "src").with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles():
    """Between the modules of both packages, as their imports (deferred ones too) name each
    other."""
    modules = {module_name(p): p for root in (PLATFORM, PROJECT) for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):  # deferred imports too: a cycle held open by one is one
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    for name in graph:  # a package's __init__ re-exporting its modules is no cycle of its own
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}

    def cycle_from(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return [start, node]
            if nxt not in seen:
                seen.add(nxt)
                found = cycle_from(start, nxt, seen)
                if found:
                    return found
        return None

    for name in graph:
        assert cycle_from(name, name, {name}) is None, f"import cycle through {name}"
