"""``floor`` and ``decayed_scores`` (ops/decayed_scores.py): the in-chunk scores under a per-dim decay
against float64 for log decays down to -20 per token (where the ``exp(b)·exp(-b)`` factorisation
overflows), their derived gradients, and the lowering of the programs built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilemix.ops import mixer
from tilemix.ops.decayed_scores import decayed_scores
from tilemix.ops.runtime import run
from tilemix.tiles import Out, Seq, chunks, floor, iota, kernel


@kernel
def block_ids(x: Seq[1], o: Out[Seq[1]]):
    for c in chunks(64):
        o[c] = x[c] * floor(iota(64) * (1.0 / 16)) + floor(x[c])


@kernel
def decayed_mix(q: Seq["K"], k: Seq["K"], g: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], o_strict: Out[Seq["V"]]):
    for c in chunks(64):
        qc, kc, gc, vc = q[c], k[c], g[c], v[c]
        o[c] = decayed_scores(qc, kc, gc) @ vc
        o_strict[c] = decayed_scores(qc, kc, gc, strict=True) @ vc


def test_floor_numbers_blocks_and_carries_no_gradient():
    x = torch.linspace(-3.0, 3.0, 70, dtype=torch.float64).reshape(1, 70, 1)
    ids, values = np.floor(np.arange(70) % 64 / 16), x[0, :, 0].numpy()
    assert np.array_equal(run(block_ids, x=x)["o"][0, :, 0].numpy(), values * ids + np.floor(values))
    x.requires_grad_()
    (grad,) = torch.autograd.grad(mixer(block_ids, "test::block_ids")(x=x)[0].sum(), x)
    assert np.array_equal(grad[0, :, 0].numpy(), ids)  # floor(x) adds nothing


def _decayed_mix_float64(q, k, g, v, strict: bool) -> np.ndarray:
    """Token by token within each 64-token chunk: o_i = Σ_{j ≤ i} (q_i · (k_j ⊙ exp(g_{j+1} + ... +
    g_i))) v_j (strict: j < i, the sum to g_{i-1})."""
    T = q.shape[0]
    out = np.zeros((T, v.shape[1]))
    for i in range(T):
        start, decay = i - i % 64, np.zeros(q.shape[1])
        if strict:
            decay -= g[i]
        for j in range(i, start - 1, -1):
            if j < i or not strict:
                out[i] += (q[i] * k[j] * np.exp(decay)).sum() * v[j]
            decay += g[j]
    return out


@pytest.mark.parametrize("max_decay", [1e-3, 1.0, 20.0])
def test_decayed_scores_match_float64(max_decay):
    """Gates uniform in [-max_decay, 0] per step and key dim, over a partial last chunk."""
    gen = torch.Generator().manual_seed(int(max_decay * 10))
    T, K, V = 100, 32, 16
    q, k = torch.randn(2, 1, T, 1, K, generator=gen) * K ** -0.25
    v = torch.randn(1, T, 1, V, generator=gen)
    g = -max_decay * torch.rand(1, T, 1, K, generator=gen)
    out = run(decayed_mix, q=q, k=k, g=g, v=v)
    args = [t[0, :, 0].double().numpy() for t in (q, k, g, v)]
    for name, strict in (("o", False), ("o_strict", True)):
        want = _decayed_mix_float64(*args, strict=strict)
        got = out[name][0, :, 0].double().numpy()
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), name


def test_decayed_scores_gradcheck_at_strong_decay():
    """The derived backward in float64, gates to -20 per step (every factor it forms at most 1);
    fast mode: random projections of the Jacobian, as many interpreter runs as inputs."""
    gen = torch.Generator().manual_seed(3)
    T, K, V = 70, 16, 16
    args = dict(q=torch.randn(1, T, 1, K, generator=gen, dtype=torch.float64),
                k=torch.randn(1, T, 1, K, generator=gen, dtype=torch.float64),
                g=-20 * torch.rand(1, T, 1, K, generator=gen, dtype=torch.float64),
                v=torch.randn(1, T, 1, V, generator=gen, dtype=torch.float64))
    names = list(args)
    fn = mixer(decayed_mix, "test::decayed_mix")
    leaves = [args[n].requires_grad_() for n in names]
    assert torch.autograd.gradcheck(lambda *xs: fn(**dict(zip(names, xs))), leaves, fast_mode=True)


def test_decayed_scores_name_a_chunk_that_does_not_halve():
    @kernel
    def odd(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(48):
            o[c] = decayed_scores(q[c], q[c], q[c]) @ q[c]

    with pytest.raises(ValueError, match="decayed_scores: q has 48 rows"):
        run(odd, q=torch.zeros(1, 48, 1, 16))


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_floor_lowers(arch):
    from tilemix.codegen.schedule import default_schedule
    from tilemix.codegen.specialise import kernel_source
    from tilemix.ops.examples import kernel_specs

    binding = block_ids.bind(kernel_specs(block_ids, size=64, T=4096))
    assert "floorf(a)" in kernel_source(block_ids, binding, default_schedule(block_ids, binding, arch), arch).source
