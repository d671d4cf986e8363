"""``pip install .`` (not editable) installs every module the program imports."""

import ast
import tomllib

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
