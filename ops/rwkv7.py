"""RWKV-7's time mixing, the generalised delta rule: ``S_t = (diag(exp w_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ``,
``o_t = scale · S_tᵀ r_t``, with the state ``S [K, V]`` in flash-linear-attention's tensor layout
(fla writes the same recurrence transposed, ``S_t = S_{t-1} (diag(exp w_t) + a_t b_tᵀ) + v_t k_tᵀ``).

Chunked as DeltaNet is (ops/delta_rule.py): the rank-one term reads ``u_t = S_{t-1}ᵀ a_t``, so
``S_t = diag(exp w_t) S_{t-1} + b_t u_tᵀ + k_t v_tᵀ``, and within a 64-token chunk (``G`` the cumulative
log decay from its start, per key dim; ``ã_i = a_i ⊙ exp G_{i-1}``, ``b̃_j = b_j ⊙ exp(-G_j)``,
``k̃_j = k_j ⊙ exp(-G_j)``) the ``u`` solve the unit lower triangular system
``(I - tril(ã b̃ᵀ, -1)) u = ã S + tril(ã k̃ᵀ, -1) V``. So ``u = u0 + a_state S`` with
``a_state = (I - tril(ã b̃ᵀ, -1))⁻¹ ã`` and ``u0 = (I - tril(ã b̃ᵀ, -1))⁻¹ tril(ã k̃ᵀ, -1) V``, and the
chunk's output is ``scale · (r_state S + o0)`` with ``r_state = r̃ + tril(r̃ b̃ᵀ) a_state``,
``o0 = tril(r̃ b̃ᵀ) u0 + tril(r̃ k̃ᵀ) V`` (``r̃_i = r_i ⊙ exp G_i``): none of them needs the state.
Two ``blocks`` grids compute them for every chunk at once, ``rwkv7_prepare`` the solves (and the keys
decayed to the chunk's end), ``rwkv7_prepare_output`` the output's terms (one program for both
needs more shared memory than sm_80 has at K = V = 128); ``rwkv7_scan`` runs what is left, four
matmuls a chunk on the state's path. Everything passes between the programs in the compute dtype.

The decay is factorised as GLA's is (ops/gated.py), ``exp(G_i) · exp(-G_j)``: exact while a chunk's
cumulative log decay stays above about -88 (fp32's and bf16's exponent range: exp(-G) is a matmul
operand, rounded to the compute dtype), -11 in fp16 (tests/test_rwkv7.py measures both). RWKV-7's own
decays, ``w >= -exp(-0.5)`` per step, stay far inside the first, not the second: run it in bf16.
The backward is derived from the three programs (``tilemix.tiles.autodiff``, ``trisolve``'s adjoint)."""

from __future__ import annotations

import torch

from tilemix.tiles import Out, Scalar, Seq, State, blocks, causal, chunks, colsum, cumsum, exp, kernel, trisolve

from ._library import mixer
from .delta_rule import _scan_op
from .runtime import check_call, default_scale

__all__ = ["rwkv7", "rwkv7_prepare", "rwkv7_prepare_output", "rwkv7_scan"]


@kernel
def rwkv7_prepare(w: Seq["K"], k: Seq["K"], v: Seq["V"], a: Seq["K"], b: Seq["K"],
                  a_state: Out[Seq["K"]], u0: Out[Seq["V"]], b_end: Out[Seq["K"]], k_end: Out[Seq["K"]]):
    for c in blocks(64):  # each chunk alone: no state
        wc, kc, bc = w[c], k[c], b[c]
        decay = cumsum(wc)  # per key dim: log decay from the chunk start through token t
        to_end = exp(colsum(wc) - decay)  # token t -> the chunk's end
        b_end[c], k_end[c] = bc * to_end, kc * to_end
        reads = a[c] * exp(cumsum(wc, exclusive=True))  # a_t reads the state before token t's decay
        removal = causal(reads @ (bc * exp(-decay)).T, strict=True)
        a_state[c] = trisolve(-removal, reads)
        u0[c] = trisolve(-removal, causal(reads @ (kc * exp(-decay)).T, strict=True) @ v[c])


@kernel
def rwkv7_prepare_output(r: Seq["K"], w: Seq["K"], k: Seq["K"], v: Seq["V"], b: Seq["K"], a_state: Seq["K"],
                         u0: Seq["V"], r_state: Out[Seq["K"]], o0: Out[Seq["V"]]):
    for c in blocks(64):  # o = scale · (r_state S + o0), S the chunk's initial state
        wc = w[c]
        decay = cumsum(wc)
        rd = r[c] * exp(decay)
        rb = causal(rd @ (b[c] * exp(-decay)).T)
        r_state[c] = rd + rb @ a_state[c]
        o0[c] = rb @ u0[c] + causal(rd @ (k[c] * exp(-decay)).T) @ v[c]


@kernel
def rwkv7_scan(w: Seq["K"], v: Seq["V"], a_state: Seq["K"], u0: Seq["V"], r_state: Seq["K"], o0: Seq["V"],
               b_end: Seq["K"], k_end: Seq["K"], scale: Scalar, o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        u = u0[c] + a_state[c] @ s  # what each token's rank-one term reads from the state
        o[c] = (r_state[c] @ s + o0[c]) * scale
        s = s * exp(colsum(w[c])).T + b_end[c].T @ u + k_end[c].T @ v[c]


_prepare_op = mixer(rwkv7_prepare, "tilemix::rwkv7_prepare").op
_prepare_output_op = mixer(rwkv7_prepare_output, "tilemix::rwkv7_prepare_output").op
_scan = _scan_op("rwkv7_scan", rwkv7_scan, ("w", "v", "a_state", "u0", "r_state", "o0", "b_end", "k_end"))
torch.library.define("tilemix::rwkv7", "(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, float scale, "
                     "Tensor? initial_state, bool output_final_state) -> (Tensor, Tensor)")


@torch.library.impl("tilemix::rwkv7", "CompositeImplicitAutograd")
def _rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state):
    """The two prepare mixers, then the scan op: each program's derived backward runs."""
    a_state, u0, b_end, k_end = _prepare_op(w, k, v, a, b)
    r_state, o0 = _prepare_output_op(r, w, k, v, b, a_state, u0)
    return _scan(w, v, a_state, u0, r_state, o0, b_end, k_end, scale, initial_state, output_final_state)


def rwkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
          scale: float | None = None, initial_state: torch.Tensor | None = None, output_final_state: bool = False):
    """RWKV-7's time mixing (flash-linear-attention's ``chunk_rwkv7`` convention and argument order):
    ``S_t = (diag(exp w_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ r_t`` (an RWKV-7
    layer passes ``a = -κ̂``, ``b = κ̂ ⊙ η``: κ̂ the normalised removal key, η its in-context rate).

    r, w, k, a, b: ``[B, T, H, K]`` (w: log decays, ≤ 0); v: ``[B, T, H, V]``; scale defaults to 1, as
    ``chunk_rwkv7``'s does; initial_state: float32 ``[B, H, K, V]`` or None (zeros). Returns
    ``(o [B, T, H, V], final_state [B, H, K, V] or None)``. Differentiable in every tensor through
    the backward derived from the programs (``rwkv7_prepare``, ``rwkv7_prepare_output``, ``rwkv7_scan``).
    On a GPU: forward and backward at RWKV-7's head size, 64; at 128 the forward only (sm_80, sm_90a),
    the derived backward's prepares needing more shared memory than a CTA has."""
    check_call("rwkv7", differentiable=True, flags=dict(output_final_state=output_final_state),
               r=r, w=w, k=k, v=v, a=a, b=b, initial_state=initial_state)
    if r.dim() != 4:
        raise ValueError(f"r: expected [B, T, H, K], got shape {tuple(r.shape)}")
    for name, x in (("w", w), ("k", k), ("a", a), ("b", b)):
        if x.shape != r.shape:
            raise ValueError(f"{name}: expected the shape of r {tuple(r.shape)}, got {tuple(x.shape)}")
    scale = 1.0 if scale is None else default_scale(r, scale)  # RWKV-7 does not scale its receptance
    o, state = torch.ops.tilemix.rwkv7(r, w, k, v, a, b, scale, initial_state, bool(output_final_state))
    return o, (state if output_final_state else None)
