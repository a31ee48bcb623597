"""No import cycle among codemoat's modules (CONTRIBUTING: dependencies point one way).

Read from the source with `ast`, not by importing: every `import` counts, at the top of a module or
inside a function (a lazy import still makes two modules depend on each other), except those under
`if TYPE_CHECKING:`, which never run."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "codemoat"

#: cycles known and owned elsewhere; each must still be a cycle (remove it here when it is gone)
KNOWN: set[frozenset[str]] = set()


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(tree: ast.AST):
    """Every import statement that can run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _type_checking(node):
            for other in node.orelse:
                yield from imports(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from imports(node)


def targets(mod: str, path: Path, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> set[str]:
    """The codemoat modules an import statement in `mod` loads (its own parent packages aside)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            pkg = ".".join(base + ([node.module] if node.module else []))
        else:
            pkg = node.module or ""
        names = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in mods else pkg for a in node.names]
    out = set()
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != mod and not mod.startswith(name + "."):
            out.add(name)
    return out


def cycles(root: Path) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    mods = modules(root)
    graph = {m: set().union(*(targets(m, p, n, mods) for n in imports(ast.parse(p.read_text())))) for m, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = {stack.pop()}
            while v not in comp:
                comp.add(stack.pop())
            if len(comp) > 1:
                found.add(frozenset(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_src():
    found = cycles(SRC)
    new = [sorted(c) for c in found - KNOWN]
    assert not new, f"import cycles: {new}"
    assert KNOWN <= found, f"no longer cycles, remove them from KNOWN: {[sorted(c) for c in KNOWN - found]}"


def test_the_checker_sees_a_lazy_cycle_and_ignores_type_checking(tmp_path):
    pkg = tmp_path / "codemoat"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import y\n")
    (pkg / "d.py").write_text("from . import c\n")
    assert cycles(pkg) == {frozenset({"codemoat.a", "codemoat.sub.b"})}
