"""The import graph of services/ (the ``ddk`` package), read with ``ast`` (no module is imported): every import,
function-local ones included, must keep the top-level units acyclic, and no unit may import another unit's
private (leading-underscore) name.

A *unit* is a top-level package (``ddk.teacher``, ``ddk.trainer``, ``ddk.data``, ...) or a top-level module
(``ddk.cli``, ``ddk.vocab``, ...). An import inside one unit is free; an import of another unit is an edge of the
unit graph, which must have no cycle (issue 23: the trainer imported the teacher and the teacher the trainer).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"


def module_name(path: Path, root: Path = SERVICES) -> str:
    """services/trainer/loop.py -> ddk.trainer.loop; services/data/__init__.py -> ddk.data."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["ddk", *parts])


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[str, str | None, int]]:
    """Every import in ``source`` (at any depth) as (imported module, imported name or None, line). Relative
    imports resolve against ``module``; ``from ddk.x import y`` gives ("ddk.x", "y")."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out += [(base, a.name, node.lineno) for a in node.names]
    return out


def unit_of(module: str) -> str | None:
    """The top-level unit of a ddk module (None outside ddk; "ddk" for the package's own __init__)."""
    parts = module.split(".")
    if parts[0] != "ddk":
        return None
    return ".".join(parts[:2]) if len(parts) > 1 else "ddk"


def unit_graph(root: Path = SERVICES) -> tuple[dict[str, set[str]], dict[tuple[str, str], str], list[str]]:
    """(edges unit -> units it imports, one example "file:line" per edge, private-name imports across units)."""
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    private: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        unit = unit_of(module)
        edges.setdefault(unit, set())
        for target, name, line in imports_of(path.read_text(encoding="utf-8"), module, path.name == "__init__.py"):
            # `from ddk import trainer` imports the unit ddk.trainer; `from ddk.trainer import loop` ddk.trainer
            full = f"{target}.{name}" if target == "ddk" and name else target
            other = unit_of(full)
            if other is None or other == unit or other == "ddk":
                continue
            edges[unit].add(other)
            where.setdefault((unit, other), f"{path.relative_to(root.parent)}:{line}")
            privates = [p for p in [name, *full.split(".")[1:]] if p and p.startswith("_") and not p.startswith("__")]
            if privates:
                private.append(f"{path.relative_to(root.parent)}:{line}: {full}"
                               + (f" import {name}" if name and full != f"{target}.{name}" else ""))
    return edges, where, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    colour = {n: 0 for n in edges}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if colour.get(m, 0) == 1:
                return stack[stack.index(m):] + [m]
            if colour.get(m, 0) == 0:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(edges):
        if colour[n] == 0:
            found = visit(n)
            if found:
                return found
    return None


# --- the checker itself, on hand-made inputs (so that a passing suite means something) --------------------------

def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_imports_are_read_at_every_depth_and_relative_ones_resolved():
    src = ("import os\nfrom ddk.errors import UsageError\n"
           "def f():\n    from ddk.trainer.launch import _prepare_data\n"
           "    if True:\n        import ddk.teacher.client as c\n"
           "from . import sibling\nfrom ..kit import fixtures\n")
    got = imports_of(src, "ddk.data.cache", is_package=False)
    assert ("ddk.trainer.launch", "_prepare_data", 4) in got
    assert ("ddk.teacher.client", None, 6) in got
    assert ("ddk.data", "sibling", 7) in got and ("ddk.kit", "fixtures", 8) in got
    assert imports_of("from .policies import x\n", "ddk.controller", is_package=True) == [
        ("ddk.controller.policies", "x", 1)]


def test_the_checker_finds_a_planted_cycle_and_a_private_import(tmp_path):
    root = tmp_path / "services"
    for rel, text in {"__init__.py": "", "a/__init__.py": "", "b/__init__.py": "", "top.py": "",
                      "a/one.py": "def f():\n    from ddk.b.two import g\n",   # function-local: still an edge
                      "b/two.py": "from ddk.a.one import f\nfrom ddk.top import _hidden\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    edges, where, private = unit_graph(root)
    assert edges["ddk.a"] == {"ddk.b"} and edges["ddk.b"] == {"ddk.a", "ddk.top"}
    assert find_cycle(edges) == ["ddk.a", "ddk.b", "ddk.a"]
    assert where[("ddk.a", "ddk.b")] == "services/a/one.py:2"
    assert private == ["services/b/two.py:2: ddk.top import _hidden"]


# --- the real graph ------------------------------------------------------------------------------------------------

def test_no_import_cycle_between_the_top_level_units():
    edges, where, _ = unit_graph()
    assert {"ddk.teacher", "ddk.trainer", "ddk.controller", "ddk.data", "ddk.kit", "ddk.experiments",
            "ddk.cli"} <= set(edges)
    cycle = find_cycle(edges)
    if cycle:
        hops = [f"{a} -> {b} ({where[(a, b)]})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle between top-level units: " + "; ".join(hops))


def test_data_imports_no_other_ddk_package():
    edges, where, _ = unit_graph()
    packages = {u for u in edges if u != "ddk" and (SERVICES / u.split(".")[1]).is_dir()}
    assert edges["ddk.data"] & packages == set(), {u: where[("ddk.data", u)] for u in edges["ddk.data"] & packages}


def test_no_unit_imports_another_units_private_name():
    _, _, private = unit_graph()
    assert private == [], "imports of another package's private names:\n" + "\n".join(private)
