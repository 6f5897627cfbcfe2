"""Each tile primitive of the sm_90a library, lowered from a one-line program
and checked against the interpreter on the GPU (``-m gpu``): when an op's
kernel is wrong, these say which primitive is."""

from __future__ import annotations

import pytest
import torch

from tilemix.reference.tolerance import rel_err
from tilemix.tiles import (
    Out,
    Seq,
    State,
    causal,
    chunks,
    cumsum,
    exp,
    exp2,
    kernel,
    log,
    rowsum,
    segsum,
    sigmoid,
    softplus,
    sqrt,
    tanh,
    trisolve,
)

pytest.importorskip("cuda.bindings")


@kernel
def copy(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]]):
    for c in chunks(64):
        o[c] = v[c] * 1.0


@kernel
def scores(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]]):  # register A, K-major B
    for c in chunks(64):
        o[c] = (q[c] * 1.0) @ k[c].T


@kernel
def mix(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]]):  # register A, MN-major B
    for c in chunks(64):
        o[c] = (q[c] * 1.0) @ v[c]


@kernel
def shared_a(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]]):  # shared A, K-major B
    for c in chunks(64):
        o[c] = q[c] @ k[c].T


@kernel
def causal_mix(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]]):
    for c in chunks(64):
        o[c] = causal(q[c] @ k[c].T) @ v[c]


@kernel
def outer(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], s: State["K", "V"] = None):  # MN-major A
    for c in chunks(64):
        o[c] = v[c] * 1.0
        s = s + k[c].T @ v[c]


@kernel
def staged(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], s: State["K", "V"] = None):  # staged B
    for c in chunks(64):
        o[c] = (q[c] * 1.0) @ s


@kernel
def scans(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]]):
    for c in chunks(64):
        x = rowsum(q[c]) * 0.01
        o[c] = v[c] * cumsum(x) + (exp(segsum(x)) @ v[c]) + v[c] * cumsum(x, reverse=True, exclusive=True)


@kernel
def unary(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]]):  # every elementwise function
    for c in chunks(64):
        x = v[c] * 0.5
        o[c] = exp(x) + exp2(x) + log(abs(x) + 1.0) + sqrt(abs(x)) + sigmoid(x) + softplus(-x) + tanh(x) - x


@kernel
def solves(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]]):  # unit triangular: both ways, tile and vector
    for c in chunks(64):
        a = causal(q[c] @ k[c].T, strict=True) * 0.005
        x = v[c] * 1.0
        o[c] = trisolve(a, x) + trisolve(a, x, transposed=True) + trisolve(a, rowsum(x) * 0.1)


PROBES = [copy, scores, mix, shared_a, causal_mix, outer, staged, scans, unary, solves]


@pytest.mark.gpu
@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
@pytest.mark.parametrize("T", [64, 100])
def test_primitive(probe, T, monkeypatch):
    monkeypatch.setenv("TILEMIX_POISON", "1")
    errors = _run(probe, T)
    print(probe.name, T, errors)
    assert all(e <= 1e-2 for e in errors.values()), errors


def _run(probe, T):
    from tilemix.ops.runtime import run_kernel

    g = torch.Generator().manual_seed(T)
    K = 64
    V = 64
    q, k, v = (torch.randn(1, T, 2, d, generator=g).to(torch.bfloat16) for d in (K, K, V))
    args = dict(q=q, k=k, v=v)
    if "s" in probe.specs:
        args["s"] = torch.randn(1, 2, K, V, generator=g)
    cpu = run_kernel(probe, args)
    gpu = run_kernel(probe, {n: t.cuda() for n, t in args.items()})
    return {n: rel_err(gpu[n].cpu(), cpu[n].double().numpy()) for n in cpu}
