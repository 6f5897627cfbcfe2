"""The docs stay short enough to read, and their links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


# the README grows by an op-table line per mixer (issues 28-29 list a dozen): 14 KB, still one sitting
@pytest.mark.parametrize("path, limit_kb", [("README.md", 14), ("bench/NOTES.md", 25), ("bench/RESULTS.md", 25)])
def test_doc_fits_its_size(path, limit_kb):
    size = (ROOT / path).stat().st_size
    assert size <= limit_kb * 1000, f"{path} is {size} bytes, over {limit_kb} KB"


def relative_links(markdown: str) -> list[str]:
    """The targets of the markdown links that point into the repository (no URL, no bare anchor)."""
    targets = (target.split("#", 1)[0] for target in LINK.findall(markdown))
    return [target for target in targets if target and not re.match(r"[a-z]+:", target)]


def test_relative_links_finds_only_repository_paths():
    text = "[a](ops/x.py) [b](https://example.com) [c](#guarantees) [d](bench/NOTES.md#host-path) [e](mailto:x@y)"
    assert relative_links(text) == ["ops/x.py", "bench/NOTES.md"]


@pytest.mark.parametrize("path", ["README.md", "bench/NOTES.md", "bench/RESULTS.md"])
def test_relative_links_point_at_files_that_exist(path):
    doc = ROOT / path
    missing = [target for target in relative_links(doc.read_text()) if not (doc.parent / target).exists()]
    assert not missing, f"{path} links to paths that do not exist: {missing}"


# -- the README's DSL line counts (issue 27: each mixer in at most ~20 lines of tile code) -------------------
def _program_lines(fn) -> int:
    """Lines of tile code in ``fn``'s body and in the functions of ``tilemix.ops`` it calls
    (recursively): no docstring, blank or comment lines; a statement over two lines counts two."""
    import ast
    import inspect
    import sys
    import textwrap

    seen, lines, todo = set(), 0, [fn]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        module = sys.modules[f.__module__]
        source = textwrap.dedent(inspect.getsource(f))
        body = ast.parse(source).body[0].body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):  # the docstring
            body = body[1:]
        rows = {n.lineno for stmt in body for n in ast.walk(stmt) if hasattr(n, "lineno")}
        text = source.splitlines()
        lines += sum(1 for r in rows if text[r - 1].strip() and not text[r - 1].strip().startswith("#"))
        for stmt in body:
            for n in ast.walk(stmt):
                helper = getattr(module, n.func.id, None) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) \
                    else None
                if inspect.isfunction(helper) and helper.__module__.startswith("tilemix.ops."):
                    todo.append(helper)
    return lines


OP_PROGRAMS = {  # each op of the README's count -> its forward programs, ``module.kernel`` under tilemix.ops
    "linear_attention": ["linear_attention.linear_attention_fwd"], "ssd": ["ssd.ssd_fwd"],
    "attention": ["attention.attention_fwd"], "retention": ["gated.retention_fwd"], "gla": ["gated.gla_fwd"],
    "rwkv6": ["gated.rwkv6_fwd"], "delta_rule": ["delta_rule.delta_rule_prepare", "delta_rule.delta_rule_scan"],
    "gated_delta_rule": ["delta_rule.gated_delta_rule_prepare", "delta_rule.gated_delta_rule_scan"],
    "rwkv7": ["rwkv7.rwkv7_prepare", "rwkv7.rwkv7_prepare_output", "rwkv7.rwkv7_scan"], "mlstm": ["mlstm.mlstm_fwd"],
    "based": ["based.based_fwd"], "selective_scan": ["selective_scan.selective_scan_fwd"],
    "bidirectional": ["bidirectional.bidirectional_linear_attention_fwd"],
    "long_conv": ["long_conv_programs.long_conv_cols", "long_conv_programs.long_conv_rows",
                  "long_conv_programs.long_conv_cols_inverse"],
    "lolcats": ["lolcats.lolcats_fwd"]}


def _op_lines(op: str) -> int:
    import importlib

    total = 0
    for path in OP_PROGRAMS[op]:
        module, name = path.rsplit(".", 1)
        total += _program_lines(getattr(importlib.import_module(f"tilemix.ops.{module}"), name).fn)
    return total


def test_readme_counts_each_ops_lines_of_tile_code():
    counted = {op: _op_lines(op) for op in OP_PROGRAMS}
    sentence = re.search(r"Lines of tile code per forward[^:]*:\s*([^.]*)\.", (ROOT / "README.md").read_text())
    assert sentence, "README: the sentence of DSL line counts is missing"
    stated = {op: int(n) for op, n in re.findall(r"`?(\w+)`? (\d+)", sentence.group(1))}
    assert stated == counted
