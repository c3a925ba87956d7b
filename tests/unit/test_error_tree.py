"""The error tree drawn in `ray_serve_cai/errors.py` is the code's tree (pure: parses the sources).

Every exception class of the package derives from `RayCaiError` with single inheritance (except
`BadInput`, also a `ValueError`, and `WaitTimeout`, also a `TimeoutError`), and every one appears in
the drawing under its real parent.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ray_serve_cai"
ROOT = "RayCaiError"
# Deliberately outside the tree (the drawing says why).
OUTSIDE = {"WorkspaceAPIError", "ScriptError", "StopRequested"}
# The classes that also derive from a builtin, for the standard library's contract.
BUILTIN_ALSO = {"WaitTimeout": "TimeoutError", "BadInput": "ValueError", "RefusedField": "TypeError"}


@cache
def class_bases() -> dict[str, list[str]]:
    """Every class of the package: its name → the names of its bases."""
    found: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
                found.setdefault(node.name, bases)
    return found


def exception_classes(bases: dict[str, list[str]]) -> set[str]:
    names: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, parents in bases.items():
            if name not in names and any(
                p in names or p in {"Exception", "RuntimeError", "ValueError", "LookupError"} for p in parents
            ):
                names.add(name)
                changed = True
    return names


def drawn_parents() -> dict[str, str]:
    """name → parent as the drawing in errors.py nests them (by indentation of the tree)."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "errors.py").read_text())) or ""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        for match in re.finditer(r"(?:──\s)([A-Z][A-Za-z]+)", line):
            column, name = match.start(1), match.group(1)
            while stack and stack[-1][0] >= column:
                stack.pop()
            if stack:
                parents[name] = stack[-1][1]
            stack.append((column, name))
        if line.strip() == ROOT:
            stack = [(line.index(ROOT), ROOT)]
    return parents


def test_every_error_is_in_the_tree_with_one_parent() -> None:
    bases = class_bases()
    errors = exception_classes(bases) - OUTSIDE - {ROOT}
    for name in sorted(errors):
        parents = bases[name]
        ours = [p for p in parents if p in errors or p == ROOT]
        assert len(ours) == 1, f"{name} must derive from exactly one error of the tree: {parents}"
        extra = [p for p in parents if p not in ours]
        assert extra == ([BUILTIN_ALSO[name]] if name in BUILTIN_ALSO else []), f"{name}: {parents}"


def test_the_drawing_is_the_code() -> None:
    bases = class_bases()
    errors = exception_classes(bases) - OUTSIDE - {ROOT}
    drawn = drawn_parents()
    assert set(drawn) == errors, (sorted(errors - set(drawn)), sorted(set(drawn) - errors))
    for name, parent in drawn.items():
        assert parent in bases[name], f"{name} is drawn under {parent} but derives from {bases[name]}"
