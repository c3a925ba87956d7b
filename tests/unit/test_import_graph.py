"""The import graph of `ray_serve_cai` (pure: parses every module with `ast`, imports nothing).

- No circle between modules: every import counts, also one inside a function or under
  `if TYPE_CHECKING:` — a circle hidden from the interpreter is still one for a reader.
- No upward import: each layer imports only the layers DESIGN.md's table lets it use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ray_serve_cai"
NAME = "ray_serve_cai"

# Modules every layer may use: they import nothing else of the package (the root package imports
# nothing eagerly; `_proxy` and `_relay` are the proxies shared by the nodes and the workspace).
SHARED = {NAME, f"{NAME}.errors", f"{NAME}.waiting", f"{NAME}.atomic", f"{NAME}._proxy", f"{NAME}._relay"}

# DESIGN.md's layer table: layer → the layers it may use (besides itself and SHARED).
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "cml": {"config"},
    "access": {"config", "cml"},
    "cluster": {"config", "cml", "access"},
    "node": {"config"},
    "deploy": {"config", "cml", "cluster"},
    "autoscale": {"config", "cml", "cluster"},
    "workspace": set(),
    # The facade (`cai_cluster`) and the commands use everything above.
    "cai_cluster": {"config", "cml", "access", "cluster", "deploy", "workspace"},
    "cli": {"config", "cml", "access", "cluster", "node", "deploy", "autoscale", "workspace", "cai_cluster"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path) -> set[str]:
    """The package's modules `name` imports (a `from X import y` names X.y when that is a module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> str | None:
    if module in SHARED:
        return None
    return module.split(".")[1]


def test_no_import_circle() -> None:
    """Tarjan's strongly connected components: any with more than one module is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert circles == [], f"import circles: {circles}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer_of(m) is not None))
def test_no_upward_import(module: str) -> None:
    layer = layer_of(module)
    assert layer in ALLOWED, f"{module}: layer {layer!r} is not in DESIGN.md's table"
    upward = sorted(
        target
        for target in GRAPH[module]
        if (other := layer_of(target)) is not None and other != layer and other not in ALLOWED[layer]
    )
    assert upward == [], f"{module} ({layer}) imports {upward}"


def test_the_graph_sees_the_imports() -> None:
    """The parse is not vacuous: known edges are found."""
    assert f"{NAME}.cluster.plan" in GRAPH[f"{NAME}.cluster.passes"]
    assert f"{NAME}.cml._errors" in GRAPH[f"{NAME}.cml"]  # a relative import
    assert len(GRAPH) > 80
