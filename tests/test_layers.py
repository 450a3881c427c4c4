"""The layer rule: only `qgen_ray/ray/` imports Ray. The core (spec, schema, store, models,
quant, data, measures, train, analysis), the pipeline and the CLIs import it only through
those adapters, inside the functions that need a cluster, so importing any of them leaves
Ray unloaded. Checked twice: statically (ruff's banned-api rule, TID251, configured in
pyproject.toml) and here at run time, where a transitive import would show too."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import qgen_ray
from tests.support.fixtures import REPO

ADAPTERS = "qgen_ray.ray"


def package_modules() -> list[str]:
    """Every module of qgen_ray outside the Ray adapters (`__main__` runs the CLI)."""
    names = [
        m.name
        for m in pkgutil.walk_packages(qgen_ray.__path__, "qgen_ray.")
        if not (m.name == ADAPTERS or m.name.startswith(ADAPTERS + "."))
        and not m.name.endswith("__main__")
    ]
    return sorted(names)


def modules_that_load_ray(modules: list[str], extra_path: Path | None = None) -> list[str]:
    """The modules among `modules` whose import loads Ray, imported in order in one fresh
    interpreter (a module whose Ray import an earlier one already triggered is not named
    again: the list is empty exactly when none of them loads Ray)."""
    code = (
        "import importlib, json, sys\n"
        f"sys.path[:0] = {[str(REPO)] + ([str(extra_path)] if extra_path else [])!r}\n"
        "out = []\n"
        f"for name in {modules!r}:\n"
        "    before = set(sys.modules)\n"
        "    importlib.import_module(name)\n"
        "    if 'ray' in set(sys.modules) - before:\n"
        "        out.append(name)\n"
        "        for m in [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]:\n"
        "            del sys.modules[m]\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_no_module_outside_the_adapters_loads_ray():
    modules = package_modules()
    assert "qgen_ray.measures.search" in modules and "qgen_ray.pipeline.study_cli" in modules
    assert modules_that_load_ray(modules) == []


def test_the_check_catches_a_core_module_that_imports_ray(tmp_path):
    """A module importing Ray directly, or through another module, is named."""
    (tmp_path / "leaky_core.py").write_text("import ray\n")
    (tmp_path / "leaky_user.py").write_text("import leaky_core\n")
    (tmp_path / "clean_core.py").write_text("import math\n")
    assert modules_that_load_ray(["clean_core", "leaky_core"], tmp_path) == ["leaky_core"]
    assert modules_that_load_ray(["clean_core", "leaky_user"], tmp_path) == ["leaky_user"]


def test_the_lint_rule_bans_ray_outside_the_adapters():
    def lint(path: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--stdin-filename", path, "-"],
            input="import ray\nfrom ray import tune\n",
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout

    assert lint("qgen_ray/measures/new_module.py").count("TID251") == 2
    assert "TID251" not in lint("qgen_ray/ray/new_adapter.py")
