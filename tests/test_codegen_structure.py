"""The code generator stays a pipeline of small parts (issue 22): no class in codegen over 300
lines, no function in codegen, tiles or ops over 80; the passes and the shared lowering test no target by name; the
targets import only public names of each other's modules."""

import ast
from pathlib import Path

import pytest

CODEGEN = Path(__file__).resolve().parent.parent / "codegen"
SHARED = ("structure.py", "liveness.py", "layout.py", "issue_order.py", "emit.py", "op_emitters.py", "lowering.py")


def _tree(name: str) -> ast.Module:
    return ast.parse((CODEGEN / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in CODEGEN.glob("*.py")))
def test_classes_and_functions_are_small(name):
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(_tree(name))
            if (isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 300)
            or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80)]
    assert not long, long


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CODEGEN.parent)) for folder in ("tiles", "ops")
                                        for p in (CODEGEN.parent / folder).glob("*.py")))
def test_language_and_ops_functions_are_small(path):
    """The same 80-line bound on functions in the language and the ops."""
    tree = ast.parse((CODEGEN.parent / path).read_text())
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long


@pytest.mark.parametrize("name", SHARED)
def test_shared_lowering_tests_no_target_by_name(name):
    """Target differences are data or overridden table entries and methods, never ``target == ...``."""
    named = lambda node: getattr(node, "id", getattr(node, "attr", None)) in ("target", "arch")  # noqa: E731
    tests = [node.lineno for node in ast.walk(_tree(name))
             if isinstance(node, ast.Compare) and any(map(named, [node.left, *node.comparators]))]
    assert not tests, f"{name} compares a target or arch at lines {tests}"


@pytest.mark.parametrize("name", ["hopper.py", "generic.py", *SHARED])
def test_no_private_imports_between_codegen_modules(name):
    private = [f"{node.module}.{alias.name}" for node in ast.walk(_tree(name)) if isinstance(node, ast.ImportFrom)
               for alias in node.names if alias.name.startswith("_")]
    assert not private, private
