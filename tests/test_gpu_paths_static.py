"""Every ``tilemix`` name the source and the tests refer to exists, checked without running them:
imports (function-level ones included), attribute chains on imported ``tilemix`` modules, and
``monkeypatch.setattr`` targets. Without a GPU the ``gpu`` tests and the CUDA-only branches never
run, so a name moved by a refactor would otherwise first fail on a GPU."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tiles", "ops", "codegen", "reference", "bench")  # tilemix.<name> lives in <name>/
FILES = sorted(p for d in (*PACKAGES, "tests") for p in (ROOT / d).rglob("*.py"))
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _module(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


MISSING = object()


def _member(module: types.ModuleType, name: str):
    """``module.name``, or its submodule ``name``; MISSING if neither exists."""
    if hasattr(module, name):
        return getattr(module, name)
    return _module(f"{module.__name__}.{name}") or MISSING


def _in_scope(node: ast.AST):
    """The nodes of ``node``'s own scope (nested functions and classes themselves, not their bodies)."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, SCOPES):
            stack.extend(ast.iter_child_nodes(child))


def _bind_imports(node: ast.AST, package: str | None, names: dict, problems: list) -> None:
    """Add the ``tilemix`` names ``node``'s scope imports to ``names``; a missing one to ``problems``."""
    for stmt in _in_scope(node):
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.name.startswith("tilemix"):
                    module = _module(alias.name)
                    if module is None:
                        problems.append((stmt.lineno, f"import {alias.name}"))
                    else:  # `import tilemix.ops` binds tilemix
                        names[alias.asname or "tilemix"] = module if alias.asname else _module("tilemix")
        elif isinstance(stmt, ast.ImportFrom):
            source = stmt.module or ""
            if stmt.level:  # relative: inside a tilemix package
                if package is None:
                    continue
                base = package if stmt.level == 1 else package.rsplit(".", stmt.level - 1)[0]
                source = f"{base}.{source}" if source else base
            if not source.startswith("tilemix"):
                continue
            module = _module(source)
            if module is None:
                problems.append((stmt.lineno, f"from {source} import ..."))
                continue
            for alias in stmt.names:
                found = _member(module, alias.name)
                if found is MISSING:
                    problems.append((stmt.lineno, f"from {source} import {alias.name}"))
                else:
                    names[alias.asname or alias.name] = found


def _check_references(node: ast.AST, names: dict, problems: list) -> None:
    """Attribute chains on ``names``' modules, and ``monkeypatch.setattr`` targets, in ``node``'s scope."""
    for expr in _in_scope(node):
        if isinstance(expr, ast.Attribute) and not isinstance(getattr(expr, "parent", None), ast.Attribute):
            chain, base = [], expr
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            target = names.get(base.id) if isinstance(base, ast.Name) else None
            for attr in reversed(chain):
                if not isinstance(target, types.ModuleType):
                    break
                found = _member(target, attr)
                if found is MISSING:
                    problems.append((expr.lineno, f"{target.__name__}.{attr}"))
                target = found
        if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "setattr"
                and isinstance(expr.func.value, ast.Name) and expr.func.value.id == "monkeypatch" and expr.args):
            first = expr.args[0]
            if isinstance(first, ast.Constant) and str(first.value).startswith("tilemix."):
                module, _, attr = first.value.rpartition(".")
                if not hasattr(_module(module), attr):
                    problems.append((expr.lineno, f"monkeypatch target {first.value}"))
            elif (isinstance(first, ast.Name) and isinstance(names.get(first.id), types.ModuleType)
                  and len(expr.args) > 1 and isinstance(expr.args[1], ast.Constant)
                  and not hasattr(names[first.id], expr.args[1].value)):
                problems.append((expr.lineno, f"monkeypatch target {names[first.id].__name__}.{expr.args[1].value}"))


def unresolved(source: str, package: str | None = None) -> list[tuple[int, str]]:
    """(line, reference) of each ``tilemix`` name in ``source`` (a module of ``package``, which
    relative imports start from; None for a test) that does not exist."""
    tree = ast.parse(source)
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child.parent = parent
    problems: list = []

    def visit(node, outer):
        names = dict(outer)
        _bind_imports(node, package, names, problems)
        _check_references(node, names, problems)
        for child in _in_scope(node):
            if isinstance(child, SCOPES):
                visit(child, names)

    visit(tree, {})
    return sorted(set(problems))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_tilemix_reference_resolves(path):
    top = path.relative_to(ROOT).parts[0]
    assert unresolved(path.read_text(), f"tilemix.{top}" if top in PACKAGES else None) == []


def test_the_check_sees_a_moved_name():
    """A function-level import, an attribute and monkeypatch targets that no longer exist (names as
    they were before the schedule move) are each reported; a relative import is resolved in its package."""
    found = unresolved("def test(monkeypatch):\n"
                       "    from tilemix.codegen import launch\n"
                       "    from tilemix.codegen.tune import _GpuRunner\n"
                       "    launch.default_schedule\n"
                       "    monkeypatch.setattr(launch, 'sm_count', None)\n"
                       "    monkeypatch.setattr('tilemix.ops._segments.segment_count', None)\n"
                       "    from .launch import kernel_source, hopper_source\n"
                       "    import tilemix.ops.runtime\n"
                       "    tilemix.ops.runtime.segment_count\n", "tilemix.codegen")
    assert [line for line, _ in found] == [3, 4, 5, 6, 7, 9], found
