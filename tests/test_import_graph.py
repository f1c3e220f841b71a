"""The package's layering: no import cycle between modules or between top-level parts (subpackages and
modules), counting every import statement -- function-level and ``TYPE_CHECKING`` ones too -- and no module
over 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "structured_compress"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = ("structured_compress",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body (relative imports resolved)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def part(module: str) -> str:
    """``layers`` for ``structured_compress.layers.gaudi.search``: the top-level subpackage or module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_cycle_between_modules():
    edges = graph()
    # a package's __init__ re-exports its children: an edge child -> own package is not a dependency cycle
    edges = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in edges.items()}
    assert cycles(edges) == []


def test_no_cycle_between_top_level_parts():
    parts: dict[str, set[str]] = {}
    for module, targets in graph().items():
        parts.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    assert cycles(parts) == []


@pytest.mark.parametrize("lower,upper", [("datamodules", "models"), ("modeltree", None), ("layers", "surgery"),
                                         ("layers", "planner"), ("layers", "io"), ("io", "surgery")])
def test_lower_parts_never_import_upper_ones(lower, upper):
    """Data never imports models; the model tree imports nothing of the project; layers and io sit below
    surgery and the planner."""
    for module, targets in graph().items():
        if part(module) == lower:
            bad = {t for t in targets if part(t) != lower and (upper is None or part(t) == upper)}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
