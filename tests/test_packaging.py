"""``pip install .`` (not editable) installs every module the program imports."""

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO


def test_every_top_level_module_is_in_the_wheel():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = set(project["py-modules"]) | set(project["packages"])
    ours = {p.stem for p in REPO.glob("*.py")} | {p.parent.name for p in REPO.glob("*/__init__.py")}
    imported = set()
    for path in [*REPO.glob("*.py"), *REPO.glob("data/*.py"), *REPO.glob("losses/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    missing = (imported & ours) - shipped
    assert not missing, f"imported by the program but not in pyproject's py-modules/packages: {sorted(missing)}"
    assert {"train", "trainers", "sampler", "rewards"} <= shipped


def test_py_modules_lists_every_root_module_and_packages_every_root_package():
    """A new module or package at the repo root has to be added to pyproject.toml to ship."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for key, present in (("py-modules", {p.stem for p in REPO.glob("*.py")}),
                         ("packages", {p.parent.name for p in REPO.glob("*/__init__.py")})):
        listed = set(project[key])
        assert listed == present, f"{key}: missing {sorted(present - listed)}, listed but absent {sorted(listed - present)}"


# Top-level entries of the repo the wheel cannot need (and that are large or rebuilt by the build).
_NOT_COPIED = {".git", ".venv", "runs", "build", "dist", "wandb", "logs", "tests"}

_IMPORT_ALL = """
import importlib, json, sys
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = importlib.import_module(name).__file__
    except BaseException as e:
        found[name] = f"error: {e!r}"
print(json.dumps(found))
"""


def test_every_module_imports_from_a_non_editable_install(tmp_path):
    """Build a wheel (from a copy, so the repo gets no build/ or *.egg-info), install it with
    ``pip --target``, and import every root module and every module of ``data`` and ``losses``
    elsewhere with only that install on PYTHONPATH: each has to come from the install."""
    src = tmp_path / "src"

    def ignore(folder, names):
        top = _NOT_COPIED if Path(folder) == REPO else set()
        return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(REPO, src, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--no-cache-dir"]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    env = {**os.environ, "PIP_NO_INDEX": "1"}

    def pip_run(*args):
        done = subprocess.run([*pip, *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"pip {' '.join(args)}\n{done.stdout}\n{done.stderr}"

    pip_run("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src))
    (wheel,) = wheels.glob("posttrain-*.whl")
    pip_run("install", "--no-deps", "--target", str(site), str(wheel))

    names = sorted(p.stem for p in REPO.glob("*.py"))
    for package in ("data", "losses"):
        names += [package] + sorted(f"{package}.{p.stem}" for p in (REPO / package).glob("*.py") if p.stem != "__init__")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *names], cwd=elsewhere,
                          env={**env, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(found) == sorted(names)
    site = site.resolve()
    wrong = {name: file for name, file in found.items()
             if file is None or file.startswith("error:") or not Path(file).resolve().is_relative_to(site)}
    assert not wrong, f"not imported from the installed wheel ({site}): {wrong}"


def test_no_module_imports_itself_through_others():
    """The program's import graph has no cycle, counting imports inside functions too: a circle held
    open by a lazy import breaks as soon as someone moves the import up. A package's own
    ``__init__`` importing its submodules (data's loader registry) is not an edge."""
    paths = [*REPO.glob("*.py"), *REPO.glob("data/*.py"), *REPO.glob("losses/*.py")]
    names = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}
    graph = {}
    for name, path in names.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[name] |= {m for m in found if m in names and m != name and not m.startswith(name + ".")}

    def circle_from(start, path):
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [start]
            if nxt not in path:
                found = circle_from(start, path + [nxt])
                if found:
                    return found
        return None

    circles = [" -> ".join(c) for c in (circle_from(m, [m]) for m in sorted(graph)) if c]
    assert not circles, circles


def test_no_test_module_imports_another():
    """What several test modules share lives in conftest.py, helpers.py and sampler_ranks.py: a test
    module that imports another runs that module's import-time code and hides what it depends on."""
    tests = sorted((REPO / "tests").glob("test_*.py"))
    names = {p.stem for p in tests}
    found = []
    for path in tests:
        for node in ast.walk(ast.parse(path.read_text())):
            imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [f"{path.name} imports {m}" for m in imported if m in names]
    assert not found, found
