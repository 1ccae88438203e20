"""The package's structure: no module of anyms/ imports, directly or through others, itself.

Imports are read from the source with ast, function-level ones included (a cycle that only
closes at call time still ties the modules together); ``if TYPE_CHECKING:`` blocks are left
out, since they never run.
"""
from __future__ import annotations

import ast
import pathlib

import anyms

PACKAGE = pathlib.Path(anyms.__file__).parent


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(module: str, tree: ast.AST, modules: set) -> set:
    """The modules of ``modules`` that ``module``'s source imports, anywhere in it."""
    package = module if module == "anyms" else module.rsplit(".", 1)[0]
    found = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            # `from . import x`: x may be a module of its own
            found.update(f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return {name for name in found if name in modules and name != module}


def import_graph() -> dict:
    files = {("anyms" if p.name == "__init__.py" else f"anyms.{p.stem}"): p for p in PACKAGE.glob("*.py")}
    modules = set(files)
    return {m: _imported(m, ast.parse(p.read_text(encoding="utf-8")), modules) for m, p in files.items()}


def cycles(graph: dict) -> list:
    """Every strongly connected group of two or more modules (Tarjan), each sorted."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "anyms.jobs" in graph["anyms.cli"]         # a function-level import, before this was split
    assert "anyms.job" in graph["anyms.jobs"]
    assert "anyms.console" in graph["anyms.job"]      # `from . import console`
    # the checker itself finds a cycle when there is one
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_package():
    found = cycles(import_graph())
    assert found == [], f"import cycles among anyms/ modules: {found}"


def test_the_priorities_are_defined_in_one_module():
    """``PRIORITIES`` is assigned in anyms/priority.py only; the others import that tuple."""
    from anyms import job, pipeline, priority

    defined = sorted(m for m, p in ((m, PACKAGE / f"{m.split('.')[-1]}.py") for m in import_graph() if m != "anyms")
                     if any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRIORITIES"
                                                                 for t in node.targets)
                            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))))
    assert defined == ["anyms.priority"]
    assert job.PRIORITIES is pipeline.PRIORITIES is priority.PRIORITIES
