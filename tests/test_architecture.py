"""The pure layers stay pure: core/ and scheduler/ import no I/O, clock, randomness or outer layer.

Checked two ways: an AST scan here (catches `import numpy.random` and function-local imports that
import-linter's external-package rules cannot express), and import-linter's contracts from
pyproject.toml when the tool is installed.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "aifab"
PURE_PACKAGES = ("core", "scheduler")
FORBIDDEN_PREFIXES = (
    "aifab.sim",
    "aifab.control",
    "aifab.backends",
    "aifab.api",
    "aifab.client",
    "aifab.cli",
    "aifab.web",
    "asyncio",
    "socket",
    "sqlite3",
    "http",
    "urllib",
    "subprocess",
    "threading",
    "multiprocessing",
    "time",
    "datetime",
    "random",
    "os",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "logging",
    "sqlalchemy",
    "httpx",
    "fastapi",
    "requests",
    "yaml",
    "numpy.random",
    "psycopg",
)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def _is_forbidden(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in FORBIDDEN_PREFIXES)


def _violations(package_dir: Path) -> list[str]:
    out: dict[tuple[str, int], str] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for line, module in _imports(path):
            if _is_forbidden(module):
                out.setdefault((path.name, line), f"{path.name}:{line}: imports {module}")
    return list(out.values())


@pytest.mark.parametrize("package", PURE_PACKAGES)
def test_pure_package_imports_no_io(package: str) -> None:
    assert _violations(SRC / package) == []


def test_scan_detects_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom numpy import random\nfrom aifab.sim.engine import Simulator\n")
    assert len(_violations(tmp_path)) == 3


def test_core_does_not_import_scheduler() -> None:
    for path in (SRC / "core").rglob("*.py"):
        for line, module in _imports(path):
            assert not module.startswith("aifab.scheduler"), f"{path}:{line}"


LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter not installed")
def test_import_linter_contracts_hold() -> None:
    root = Path(__file__).resolve().parents[1]
    assert LINT_IMPORTS is not None
    done = subprocess.run([LINT_IMPORTS], cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
