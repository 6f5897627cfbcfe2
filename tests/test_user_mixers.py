"""Mixers a user might write, beyond the four shipped ops: they must lower for sm_90a with no
op-specific code (CI compiles them) and, on an H100, match the interpreter.

- gated linear attention with a per-key-dim gate (GLA): cumulative sums of a matrix tile, a row
  vector turned into a column vector, a state decayed row by row;
- normalised linear attention with positive features: row and column reductions, a division;
- anti-causal linear attention (each token attends to itself and the tokens after it, the second
  half of a bidirectional mixer): chunks visited last to first;
- linear attention with an RWKV-style per-head bonus ``u`` on the current token: a ``Head["K"]``
  row vector;
- bidirectional linear attention (SANA-style): one loop sums the whole sequence's state and
  normaliser, a second (reverse) loop reads them; and its two halves, causal and anti-causal, as a
  forward loop then a reverse one;
- a per-head readout whose matmuls read only Head and State tiles (no sequence feeds a matmul):
  row-vector products, lowered as products and reductions.
"""

from __future__ import annotations

import pytest
import torch

from tilemix.ops.gated import gla_fwd  # the shipped GLA program, one of the user mixers here too
from tilemix.ops.runtime import run_kernel
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import (
    Head,
    Out,
    Seq,
    State,
    TensorSpec,
    causal,
    chunks,
    colsum,
    exp,
    kernel,
    maximum,
    rowsum,
)

pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from tilemix.codegen.compile import compile_cuda, resources, sass  # noqa: E402
from tilemix.codegen.schedule import default_source  # noqa: E402


@kernel
def normalized_la_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], s: State["K", "V"] = None,
                      z: State["K", 1] = None):
    for c in chunks(64):
        qc, kc, vc = exp(q[c]), exp(k[c]), v[c]
        a = causal(qc @ kc.T)
        o[c] = (a @ vc + qc @ s) / (rowsum(a) + qc @ z)
        s = s + kc.T @ vc
        z = z + colsum(kc).T


@kernel
def anticausal_la_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64, reverse=True):
        qc, kc, vc = q[c], k[c], v[c]
        o[c] = causal(qc @ kc.T, transposed=True) @ vc + qc @ s  # keys at or after the query
        s = s + kc.T @ vc


@kernel
def bonus_la_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], u: Head["K"], o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        qc, kc, vc = q[c], k[c], v[c]
        o[c] = causal(qc @ kc.T) @ vc + qc @ s + rowsum(qc * u * kc) * vc  # u: the current token's bonus
        s = s + kc.T @ vc


@kernel
def bidirectional_la_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], s: State["K", "V"] = None,
                         z: State["K", 1] = None):
    for c in chunks(64):  # the whole sequence's state and normaliser (ReLU features)
        kc = maximum(k[c], 0.0)
        s = s + kc.T @ v[c]
        z = z + colsum(kc).T
    for c in chunks(64, reverse=True):  # every token reads them
        qc = maximum(q[c], 0.0)
        o[c] = (qc @ s) / (qc @ z + 1e-6)


@kernel
def two_halves_la_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], p: Out[Seq["V"]],
                      s: State["K", "V"] = None, r: State["K", "V"] = None):
    for c in chunks(64):  # the causal half: keys at or before the query
        qc, kc, vc = q[c], k[c], v[c]
        o[c] = causal(qc @ kc.T) @ vc + qc @ s
        s = s + kc.T @ vc
    for c in chunks(64, reverse=True):  # the anti-causal half: keys at or after it
        qc, kc, vc = q[c], k[c], v[c]
        p[c] = causal(qc @ kc.T, transposed=True) @ vc + qc @ r
        r = r + kc.T @ vc


MIXERS = {"gla": gla_fwd, "normalized_la": normalized_la_fwd, "anticausal_la": anticausal_la_fwd,
          "bonus_la": bonus_la_fwd, "bidirectional_la": bidirectional_la_fwd, "two_halves_la": two_halves_la_fwd}


def _specs(name: str, B=2, T=4096, H=16, D=128) -> dict:
    seq = TensorSpec((B, T, H, D), "bfloat16")
    extra = {"gla": {"g": seq}, "bonus_la": {"u": TensorSpec((H, D), "float32")}}.get(name, {})
    return dict(q=seq, k=seq, v=seq, **extra)


def _compiled(program, specs: dict, arch: str):
    source = default_source(program, program.bind(specs), arch)
    return compile_cuda(source.source, arch, source.name)


def assert_tensor_cores_without_local_memory(program, specs: dict):
    """``program`` compiles for sm_90a with wgmma and for sm_80 with mma.sync, neither touching
    local memory (no spills, no stack)."""
    for arch, instruction in (("sm_90a", "HGMMA"), ("sm_80", "HMMA")):
        compiled = _compiled(program, specs, arch)
        code, usage = sass(compiled), resources(compiled)
        assert instruction in code, arch
        assert "LDL" not in code and "STL" not in code and usage["local_memory"] == 0, (arch, usage)


@pytest.mark.parametrize("name", MIXERS)
def test_user_mixer_lowers_to_wgmma(name):
    program = MIXERS[name]
    source = default_source(program, program.bind(_specs(name)))
    assert "HGMMA" in sass(compile_cuda(source.source, "sm_90a", source.name))


@pytest.mark.gpu
@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("T", [1, 100, 300])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_user_mixer_matches_interpreter(name, T, D, monkeypatch):
    monkeypatch.setenv("TILEMIX_POISON", "1")
    gen = torch.Generator().manual_seed(T * D)
    B, H = 2, 3
    args = {n: (0.5 * torch.randn(B, T, H, D, generator=gen)).to(torch.bfloat16) for n in ("q", "k", "v")}
    if name == "gla":
        args["g"] = (-0.05 * torch.rand(B, T, H, D, generator=gen)).to(torch.bfloat16)
    if name == "bonus_la":
        args["u"] = torch.randn(H, D, generator=gen)
    gpu = run_kernel(MIXERS[name], {n: t.cuda() for n, t in args.items()})
    cpu = run_kernel(MIXERS[name], args)
    for out in cpu:
        assert rel_err(gpu[out].cpu(), cpu[out].double().numpy()) <= bound(torch.bfloat16), out


def test_anticausal_la_interpreter_matches_float64():
    """The interpreter runs the reverse loop as written: o_t = Σ_{s >= t} (q_t·k_s) v_s."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(2, 100, 3, 16, generator=gen) for _ in range(3))  # 100: a partial last chunk
    out = run_kernel(anticausal_la_fwd, dict(q=q, k=k, v=v))["o"]
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double()).triu()
    want = torch.einsum("bhts,bshd->bthd", scores, v.double())
    assert rel_err(out, want.numpy()) <= bound(torch.float32)


def test_head_row_vector_lowers_on_both_targets():
    """A ``Head["K"]`` parameter (RWKV's bonus) is read as this head's row of an [H, K] tensor."""
    assert_tensor_cores_without_local_memory(bonus_la_fwd, _specs("bonus_la", D=64))


def test_bonus_la_interpreter_matches_float64():
    """o_t = Σ_{s <= t} (q_t·k_s) v_s + (q_t·(u ⊙ k_t)) v_t, u one row per head."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(2, 100, 3, 16, generator=gen) for _ in range(3))
    u = torch.randn(3, 16, generator=gen)
    out = run_kernel(bonus_la_fwd, dict(q=q, k=k, v=v, u=u))["o"]
    q, k, v, u = q.double(), k.double(), v.double(), u.double()
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
    bonus = torch.einsum("bthd,hd,bthd->bth", q, u, k)
    want = torch.einsum("bhts,bshd->bthd", scores, v) + bonus[..., None] * v
    assert rel_err(out, want.numpy()) <= bound(torch.float32)


@pytest.mark.parametrize("name", ["bidirectional_la", "two_halves_la"])
def test_sequential_chunk_loops_lower_on_both_targets(name):
    """Two chunks() loops one after another, the second in reverse, walk one ring on both targets."""
    assert_tensor_cores_without_local_memory(MIXERS[name], _specs(name, D=64))


def _relu_features_reference(q, k, v):
    """Float64 bidirectional linear attention with ReLU features: o_t = φ(q_t) S / (φ(q_t)·z + 1e-6),
    S = Σ_s φ(k_s)ᵀ v_s and z = Σ_s φ(k_s) over the whole sequence."""
    q, k, v = (x.double().clamp(min=0) if x is not v else x.double() for x in (q, k, v))
    state = torch.einsum("bshk,bshv->bhkv", k, v)
    norm = torch.einsum("bthk,bhk->bth", q, k.sum(1))
    return torch.einsum("bthk,bhkv->bthv", q, state) / (norm[..., None] + 1e-6)


def test_bidirectional_la_interpreter_matches_float64():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(2, 100, 3, 16, generator=gen) for _ in range(3))
    out = run_kernel(bidirectional_la_fwd, dict(q=q, k=k, v=v))["o"]
    assert rel_err(out, _relu_features_reference(q, k, v).numpy()) <= bound(torch.float32)


def test_two_halves_la_interpreter_matches_float64():
    """o: Σ_{s <= t} (q_t·k_s) v_s; p: Σ_{s >= t} (q_t·k_s) v_s."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(2, 100, 3, 16, generator=gen) for _ in range(3))
    out = run_kernel(two_halves_la_fwd, dict(q=q, k=k, v=v))
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double())
    for name, kept in (("o", scores.tril()), ("p", scores.triu())):
        want = torch.einsum("bhts,bshd->bthd", kept, v.double())
        assert rel_err(out[name], want.numpy()) <= bound(torch.float32), name


@kernel
def head_readout_fwd(x: Seq[1], w: Head["D"], y: Out[Seq["D"]], s: State["D", "D"] = None,
                     z: State["D", 1] = None):
    for c in chunks(64):  # a per-head query w reads the state both ways; z a column state
        y[c] = x[c] * (w @ s + w @ s.T + z.T @ s)


def _readout_args(gen, B=2, T=100, H=3, D=64) -> dict:
    return dict(x=torch.randn(B, T, H, generator=gen), w=torch.randn(H, D, generator=gen).to(torch.bfloat16),
                s=torch.randn(B, H, D, D, generator=gen), z=torch.randn(B, H, D, 1, generator=gen))


def test_matmuls_of_head_and_state_tiles_lower_on_both_targets():
    """No sequence feeds a matmul: the bf16 Head sets the compute dtype, and the 1-row matmuls
    lower (as products and reductions) for sm_90a and sm_80 without local memory."""
    specs = {n: TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
             for n, t in _readout_args(torch.Generator(), T=4096, H=16).items()}
    for arch in ("sm_90a", "sm_80"):
        compiled = _compiled(head_readout_fwd, specs, arch)
        code, usage = sass(compiled), resources(compiled)
        assert "LDL" not in code and "STL" not in code and usage["local_memory"] == 0, (arch, usage)


def test_head_readout_interpreter_matches_float64():
    """y_t = x_t (w S + w Sᵀ + zᵀ S), the matmul operands rounded to bf16."""
    args = _readout_args(torch.Generator().manual_seed(0))
    out = run_kernel(head_readout_fwd, args)["y"]
    x, w, s, z = (t.double() for t in args.values())
    s16 = s.to(torch.bfloat16).double()
    read = torch.einsum("hd,bhde->bhe", w, s16) + torch.einsum("hd,bhed->bhe", w, s16)
    read = read + torch.einsum("bhd,bhde->bhe", z[..., 0].to(torch.bfloat16).double(), s16)
    assert rel_err(out, (x[..., None] * read[:, None]).numpy()) <= bound(torch.bfloat16)


@pytest.mark.gpu
def test_gpu_head_readout_matches_interpreter(monkeypatch):
    monkeypatch.setenv("TILEMIX_POISON", "1")
    args = _readout_args(torch.Generator().manual_seed(1))
    gpu = run_kernel(head_readout_fwd, {n: t.cuda() for n, t in args.items()})
    cpu = run_kernel(head_readout_fwd, args)
    for out in cpu:
        assert rel_err(gpu[out].cpu(), cpu[out].double().numpy()) <= bound(torch.bfloat16), out
