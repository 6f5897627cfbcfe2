"""A program compiled for a GPU target, its machine code checked: the target's tensor-core
instruction where asked, and no local memory unless the caller lists the spill it measured (then the
check is an expected failure that fails for real once the spill is gone)."""

from __future__ import annotations

import pytest

MMA = {"sm_90a": "HGMMA", "sm_80": "HMMA"}  # the tensor-core instruction of each target's SASS


def has_wide_matmul(kernel, binding, arch: str) -> bool:
    """Whether the traced program has a matmul wider than one column (what tensor cores run)."""
    return any(op.name == "matmul" and op.result.type.cols > 1 for op in kernel.trace(binding, arch).walk())


def check_compiled(kernel, binding, arch: str, key, spilling: dict, mma: bool = True, varlen: bool = False,
                   schedule=None):
    """``kernel`` at ``binding`` with ``schedule`` (default: its default schedule for ``arch``;
    ``varlen``: its packed-batch kernel): ``MMA[arch]`` in its SASS (``mma``), and no local memory
    (LDL/STL or stack) unless ``spilling`` holds ``key``, the bytes measured: then it must still spill
    and the test is marked an expected failure. Returns the kernel's source."""
    from tilemix.codegen.compile import compile_cuda, resources, sass
    from tilemix.codegen.schedule import default_schedule
    from tilemix.codegen.specialise import kernel_source

    source = kernel_source(kernel, binding, schedule or default_schedule(kernel, binding, arch), arch, varlen)
    compiled = compile_cuda(source.source, arch, source.name)
    text, usage = sass(compiled), resources(compiled)
    if mma:
        assert MMA[arch] in text, f"{source.name}: no {MMA[arch]} in the SASS"
    spills = "LDL" in text or "STL" in text or usage["local_memory"]
    if key in spilling:
        assert spills, f"{key} no longer spills: take it off SPILLING"
        pytest.xfail(f"{source.name} {key} spills {usage['local_memory']} bytes (measured {spilling[key]})")
    assert not spills, f"{source.name}: local memory in the SASS or stack use: {usage}"
    return source
