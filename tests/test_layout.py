"""The package's shape, checked on its source: sizes a reader can hold in mind, no import
cycles, and Ray and wandb each behind one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "selfclust"
MODULE_LINES, CLASS_LINES, FUNCTION_LINES = 300, 210, 60
# The numba kernels are one file on purpose: each kernel sits beside the scalar loop it
# replaces, and they share the same compiled helpers (see its docstring).
LONG_MODULES = {"labels/sinkhorn_numba.py"}
# The only importers of each third-party framework the rest of the code stays free of.
# ray_console.py: where Ray's output goes on the driver (launch.py is the rest of the edge).
GATEWAYS = {"ray": {"launch.py", "ray_console.py"}, "wandb": {"runlog.py"}}


def _modules() -> dict[str, ast.Module]:
    return {
        p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text())
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int:
    """Lines of a definition without its docstring."""
    lines = (node.end_lineno or node.lineno) - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        lines -= (first.end_lineno or first.lineno) - first.lineno + 1
    return lines


def test_sizes() -> None:
    too_long = []
    for name, tree in _modules().items():
        n = len((PACKAGE / name).read_text().splitlines())
        if n > MODULE_LINES and name not in LONG_MODULES:
            too_long.append(f"{name}: {n} lines (module)")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and _body_lines(node) > CLASS_LINES:
                too_long.append(f"{name}: class {node.name} {_body_lines(node)} lines")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if _body_lines(node) > FUNCTION_LINES:
                    too_long.append(f"{name}: {node.name}() {_body_lines(node)} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def _module_name(path: str) -> str:
    parts = ["selfclust", *path.removesuffix(".py").split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> set[str]:
    """Modules imported when this one is (function bodies and TYPE_CHECKING blocks excluded)."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_import_cycles() -> None:
    modules = {_module_name(p): t for p, t in _modules().items()}
    graph = {m: {i for i in _top_level_imports(t) if i in modules and i != m}
             for m, t in modules.items()}  # fmt: skip
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("framework", sorted(GATEWAYS))
def test_one_gateway_module(framework: str) -> None:
    importers = set()
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == framework or n.startswith(framework + ".") for n in names):
                importers.add(name)
    assert importers == GATEWAYS[framework]
