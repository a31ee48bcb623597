"""The demo's Python steps import test helpers (tests/pg.py, tests/directory/slapd.py, ...) outside pytest, where
conftest has not put tests/ on the path: each script's imports, with its own `sys.path` lines, must work as `make
demo` runs them. A test-helper move once broke the demo's directory step this way while every test passed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "demo").glob("*.py"))


def imports_of(script: Path) -> str:
    """The script's top-level imports, its ROOT and its `sys.path` changes, in order (nothing that runs the demo)."""
    keep = []
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue  # it must come first, and changes nothing an import needs
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            keep.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ROOT" for t in node.targets):
            keep.append(node)
        elif isinstance(node, ast.Expr) and ast.unparse(node).startswith("sys.path."):
            keep.append(node)
    return f"__file__ = {str(script)!r}\n" + ast.unparse(ast.Module(body=keep, type_ignores=[]))


def test_there_are_demo_scripts():
    assert len(SCRIPTS) >= 3, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_demo_script_imports_outside_pytest(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", imports_of(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]
