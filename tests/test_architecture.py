"""The package layers import one way: tiles <- codegen <- runtime <- ops <- bench (the CLI included),
and reference is a leaf that needs numpy only. Every ``import`` counts, those inside functions too,
so a function-level import cannot hide a cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tilemix.tiles import Out, Seq, TensorSpec, chunks, kernel

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tiles", "codegen", "ops", "reference", "bench")  # source folders, as tilemix.<folder>

# the runtime layer of tilemix.ops: running any program (run, mixer and its derived backward, targets,
# the call cache, tuning, packed batches, the custom ops' eager path)
RUNTIME = frozenset({"tilemix.ops.runtime", "tilemix.ops.tuning", "tilemix.ops.timing",
                     "tilemix.ops._library", "tilemix.ops._segments", "tilemix.ops.derived",
                     "tilemix.ops.derived_cuda", "tilemix.ops.varlen", "tilemix.ops.eager",
                     "tilemix.ops.fastpath"})

# layer -> the layers its modules may import (itself included)
ALLOWED = {
    "tiles": {"tiles"},
    "reference": {"reference"},
    "codegen": {"tiles", "codegen"},
    "runtime": {"tiles", "codegen", "runtime", "reference"},
    "ops": {"tiles", "codegen", "runtime", "ops", "reference"},
    "bench": {"tiles", "codegen", "runtime", "ops", "reference", "bench"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("tilemix",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def layer_of(module: str) -> str | None:
    """The layer of a ``tilemix.*`` module (None for a module outside tilemix, or tilemix itself)."""
    parts = module.split(".")
    if parts[0] != "tilemix" or len(parts) < 2:
        return None
    if any(module == m or module.startswith(m + ".") for m in RUNTIME):
        return "runtime"
    return parts[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a source file, at any depth, relative ones resolved."""
    module = _module_name(path)
    return imports_in(path.read_text(), module if path.name == "__init__.py" else module.rpartition(".")[0])


def _runtime_nodes(tree: ast.AST):
    """Every node below ``tree`` but those in ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        typing_only = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.orelse if typing_only else [node]:
            yield child
            yield from _runtime_nodes(child)


def imports_in(text: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``text``, a module of ``package``, at any depth (inside
    functions too), relative ones resolved; ``from tilemix import ops`` counts as an import of
    ``tilemix.ops``, ``from .x import y`` as one of ``package.x`` and ``package.x.y``. Imports under
    ``if TYPE_CHECKING:`` name types for annotations and never run, so they do not count."""
    found = []
    for node in _runtime_nodes(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # maybe a submodule
    return found


def _sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _edges():
    """(importing file, line, importing layer, imported module, imported layer) for tilemix imports."""
    for path in _sources():
        source = layer_of(_module_name(path))
        for line, target in imports_of(path):
            if layer_of(target):
                yield path.relative_to(ROOT), line, source, target, layer_of(target)


def test_imports_go_one_way():
    wrong = {}  # one line per import statement: `from x import a, b` names x first
    for path, line, source, target, layer in _edges():
        if layer not in ALLOWED[source]:
            wrong.setdefault((path, line, layer), f"{path}:{line} ({source}) imports {target} ({layer})")
    wrong = list(wrong.values())
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_cycle_between_layers():
    graph: dict[str, set[str]] = {layer: set() for layer in ALLOWED}
    for _, _, source, _, layer in _edges():
        if layer != source:
            graph[source].add(layer)
    done: set[str] = set()

    def visit(layer: str, path: tuple[str, ...]) -> None:
        assert layer not in path, f"import cycle: {' -> '.join(path + (layer,))}"
        if layer not in done:
            for nxt in sorted(graph[layer]):
                visit(nxt, path + (layer,))
            done.add(layer)

    for layer in graph:
        visit(layer, ())


def test_no_cycle_between_modules():
    """Within a layer too: a cycle of modules kept apart only by imports inside functions is a cycle."""
    modules = {_module_name(path): path for path in _sources()}
    graph = {module: set() for module in modules}
    for module, path in modules.items():
        for _, target in imports_of(path):
            prefixes = [target.rsplit(".", cut)[0] for cut in range(target.count(".") + 1)]  # longest first
            found = next((prefix for prefix in prefixes if prefix in modules), None)
            if found not in (None, module):
                graph[module].add(found)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + (module,))}"
        if module not in done:
            for nxt in sorted(graph[module]):
                visit(nxt, path + (module,))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_reference_needs_numpy_only():
    for path in sorted((ROOT / "reference").rglob("*.py")):
        for line, target in imports_of(path):
            top = target.split(".")[0]
            assert top in sys.stdlib_module_names or top == "numpy" or target.startswith("tilemix.reference"), (
                f"{path.relative_to(ROOT)}:{line} imports {target}")


def test_nothing_outside_ops_imports_a_private_ops_module():
    """Tests and bench use the public runtime (tilemix.ops, tilemix.ops.runtime), as a user would."""
    private = {}
    for path in [*_sources(), *sorted((ROOT / "tests").rglob("*.py"))]:
        if path.relative_to(ROOT).parts[0] == "ops":
            continue
        package = "tests" if path.relative_to(ROOT).parts[0] == "tests" else None
        found = imports_in(path.read_text(), package) if package else imports_of(path)
        for line, target in found:
            parts = target.split(".")
            if parts[:2] == ["tilemix", "ops"] and any(p.startswith("_") and not p.startswith("__") for p in parts):
                private.setdefault((path, line), f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not private, "\n".join(private.values())


def test_the_checks_see_function_level_and_relative_imports():
    text = ("from . import issue_order\nfrom ..ops import runtime\n\n\n"
            "def f():\n    from tilemix.bench.bench import time_ms\n    import tilemix.reference\n")
    found = {target: line for line, target in imports_in(text, "tilemix.codegen")}
    assert found["tilemix.codegen.issue_order"] == 1 and found["tilemix.ops.runtime"] == 2
    assert found["tilemix.bench.bench"] == 6 and found["tilemix.reference"] == 7
    assert layer_of("tilemix.ops.runtime") == "runtime" and layer_of("tilemix.ops.attention") == "ops"
    assert layer_of("tilemix.ops") == "ops" and layer_of("tilemix") is None and layer_of("numpy") is None


def test_imports_for_annotations_only_do_not_count():
    text = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .lowering import L\nelse:\n    import os\n"
    found = {target for _, target in imports_in(text, "tilemix.codegen")}
    assert "tilemix.codegen.lowering" not in found and "os" in found


# -- dependencies -------------------------------------------------------------------------
@kernel
def copy_for_cupy(x: Seq["D"], y: Out[Seq["D"]]):
    for c in chunks(64):
        y[c] = x[c]


def test_cupy_is_declared_as_the_cuda_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("cupy-cuda13x") for req in extras["cuda"])


def test_a_cuda_call_without_cupy_names_the_extra(monkeypatch):
    """The kernel compiles (NVRTC, the codegen extra); loading it needs cupy, which is optional."""
    import pytest

    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    from tilemix.codegen import launch
    from tilemix.codegen.schedule import Schedule

    specs = dict(x=TensorSpec((1, 64, 1, 64), "bfloat16"))
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(ImportError, match=r"needs cupy: pip install 'tilemix\[cuda\]'"):
        launch.prepare_launch(copy_for_cupy, copy_for_cupy.bind(specs), specs, Schedule(), "sm_90a", 0)
