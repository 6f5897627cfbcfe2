"""selective_scan (Mamba-1): against the float64 token loop (tilemix.reference), decays from about 0 to
-20 per step, state round trips, float64 gradcheck of the derived backward, argument errors, the
layer, and the forward and derived backward programs compiled for sm_90a and sm_80."""

from __future__ import annotations

import functools

import pytest
import torch
from compile_checks import check_compiled
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix import reference
from tilemix.ops import Mamba1Mixer, selective_scan
from tilemix.ops.selective_scan import selective_scan_fwd
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import TensorSpec

OPTIONAL = ("D", "z", "delta_bias", "initial_state")


def _inputs(B=1, T=70, Dm=32, N=4, G=0, max_decay=1.0, seed=0, dtype=torch.float64, optional=OPTIONAL) -> dict:
    """u; delta in [0, 1] and delta_bias in [0, 0.5] (positive steps, softplus'd or not: up to about
    1.7); A uniform in [-max_decay, 0]; B and C ``[B, T, N]`` (G = 0) or ``[B, T, G, N]``; and the
    ``optional`` arguments."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)
    bc = (B, T, N) if G == 0 else (B, T, G, N)
    args = dict(u=rnd(B, T, Dm), delta=torch.rand(B, T, Dm, generator=gen, dtype=dtype),
                A=-max_decay * torch.rand(Dm, N, generator=gen, dtype=dtype), B=rnd(*bc), C=rnd(*bc),
                D=rnd(Dm), z=rnd(B, T, Dm), delta_bias=torch.rand(Dm, generator=gen, dtype=dtype) * 0.5,
                initial_state=rnd(B, Dm, N))
    return {n: t for n, t in args.items() if n not in OPTIONAL or n in optional}


def _check(args: dict, delta_softplus: bool, tolerance: float) -> None:
    y, h = selective_scan(**args, delta_softplus=delta_softplus, output_final_state=True)
    y_ref, h_ref = reference.selective_scan(**args, delta_softplus=delta_softplus, output_final_state=True)
    assert rel_err(y, y_ref) <= tolerance
    assert rel_err(h, h_ref) <= tolerance


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 300), Dm=st.sampled_from([32, 96, 128]), N=st.integers(1, 4), G=st.sampled_from([0, 1, 2]),
       max_decay=st.sampled_from([1e-3, 1.0, 20.0]), delta_softplus=st.booleans(),
       optional=st.sets(st.sampled_from(OPTIONAL)), seed=st.integers(0, 2 ** 16))
def test_matches_float64_token_loop(T, Dm, N, G, max_decay, delta_softplus, optional, seed):
    """fp32; Dm = 128 runs two heads of 64 channels (one per group where G = 2), 96 one head of 96 or
    two of 48, 32 one of 32 or two of 16."""
    args = _inputs(T=T, Dm=Dm, N=N, G=G, max_decay=max_decay, seed=seed, dtype=torch.float32, optional=optional)
    _check(args, delta_softplus, bound(torch.float32))


@pytest.mark.parametrize("T", [63, 64, 65, 200])
def test_steps_past_the_end_leave_the_state(T):
    """softplus(0 + bias) > 0: the zeros a partial last chunk reads past T must not decay the state."""
    _check(_inputs(T=T, max_decay=20.0, seed=T), delta_softplus=True, tolerance=1e-12)


def test_two_halves_with_the_state_passed_make_the_whole():
    args = _inputs(T=150, seed=3)
    whole, whole_state = selective_scan(**args, output_final_state=True)
    halves = [{n: t[:, cut] if t.dim() == 3 and n != "initial_state" else t for n, t in args.items()}
              for cut in (slice(0, 70), slice(70, None))]
    y1, h1 = selective_scan(**halves[0], output_final_state=True)
    y2, h2 = selective_scan(**{**halves[1], "initial_state": h1}, output_final_state=True)
    assert rel_err(torch.cat([y1, y2], 1), whole.numpy()) <= 1e-12
    assert rel_err(h2, whole_state.numpy()) <= 1e-12


@pytest.mark.parametrize("G, delta_softplus", [(0, True), (2, False)])
def test_float64_gradients(G, delta_softplus):
    """The derived backward, for every tensor argument and through the final state, by gradcheck
    (fast mode: random projections; the full Jacobian takes minutes)."""
    args = _inputs(T=70, Dm=32, N=2, G=G, seed=5)
    names = list(args)
    leaves = [args[n].requires_grad_() for n in names]

    def fn(*xs):
        return selective_scan(**dict(zip(names, xs)), delta_softplus=delta_softplus, output_final_state=True)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("N", [9, 17])
def test_entries_past_one_call(N):
    """More state entries than one call scans (``ENTRY_GROUP``): one call per group of entries, the
    partial outputs summed with D and the gate applied once; values, final state and gradients
    (gradcheck) as one scan over every entry."""
    from tilemix.ops.selective_scan import ENTRY_GROUP

    assert ENTRY_GROUP < N
    _check(_inputs(T=70, Dm=32, N=N, G=2, seed=N), delta_softplus=True, tolerance=1e-12)
    args = _inputs(T=20, Dm=32, N=N, G=2, seed=N)
    names = list(args)

    def fn(*xs):
        return selective_scan(**dict(zip(names, xs)), delta_softplus=True, output_final_state=True)
    assert torch.autograd.gradcheck(fn, [args[n].requires_grad_() for n in names], fast_mode=True)


def test_compiled_training_step_has_no_graph_break():
    """torch.compile(fullgraph=True) through the argument checks, the head layout's reshapes and
    the op's derived backward: eager's loss and gradients exactly."""
    args = _inputs(T=70, G=2, seed=7, dtype=torch.float32)

    def step(**xs):
        y, h = selective_scan(**xs, delta_softplus=True, output_final_state=True)
        return (y * y).sum() + h.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = {n: t.clone().requires_grad_() for n, t in args.items()}
    traced = {n: t.clone().requires_grad_() for n, t in args.items()}
    step(**eager).backward()
    loss = compiled(**traced)
    loss.backward()
    assert torch.equal(loss, step(**args))
    for n in args:
        assert torch.equal(traced[n].grad, eager[n].grad), n


def test_final_state_is_none_unless_asked():
    assert selective_scan(**_inputs(T=10, optional=()))[1] is None


@pytest.mark.parametrize("name, value, error, message", [
    ("u", lambda a: a["u"].numpy(), TypeError, "^u: expected a tensor"),
    ("u", lambda a: a["u"][0], ValueError, r"^u: expected \[B, T, Dm\]"),
    ("delta", lambda a: a["delta"][:, :5], ValueError, "^delta: expected the shape of u"),
    ("z", lambda a: a["z"][..., :8], ValueError, "^z: expected the shape of u"),
    ("A", lambda a: a["A"][:8], ValueError, r"^A: expected \[Dm, N\]"),
    ("B", lambda a: a["B"][..., :3], ValueError, r"^B: expected \[B, T, N\]"),
    ("B", lambda a: a["B"].unsqueeze(2).expand(-1, -1, 3, -1), ValueError, "^B: .*G dividing Dm"),
    ("C", lambda a: a["C"].unsqueeze(2).expand(-1, -1, 2, -1), ValueError, "^C: expected the groups of B"),
    ("D", lambda a: a["D"][:8], ValueError, r"^D: expected \[Dm\]"),
    ("delta_bias", lambda a: a["delta_bias"][None], ValueError, r"^delta_bias: expected \[Dm\]"),
    ("initial_state", lambda a: a["initial_state"][..., :2], ValueError, r"^initial_state: expected \[B, Dm, N\]"),
    ("delta_softplus", lambda a: "yes", TypeError, "^delta_softplus: expected True or False"),
    ("output_final_state", lambda a: 1, TypeError, "^output_final_state: expected True or False"),
])
def test_argument_errors_name_the_argument(name, value, error, message):
    args = _inputs(T=10)
    with pytest.raises(error, match=message):
        selective_scan(**{**args, name: value(args)})


def test_groups_of_fewer_than_16_channels_are_refused_by_name():
    args = _inputs(T=10, Dm=32, G=4)
    with pytest.raises(ValueError, match="^u: its Dm = 32 channels make groups of 8"):
        selective_scan(**args)


def test_layer_trains_and_continues_from_its_state():
    torch.manual_seed(0)
    layer = Mamba1Mixer(dim=32, inner=64, state_dim=4)
    x = torch.randn(2, 40, 32)
    y, state = layer(x, output_final_state=True)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    with torch.no_grad():
        y1, s1 = layer(x[:, :25], output_final_state=True)
        y2 = layer(x[:, 25:], initial_state=s1)
    assert rel_err(torch.cat([y1, y2], 1), y.detach().double().numpy()) <= bound(torch.float32)


@pytest.mark.parametrize("name", ["selective_scan", "selective_scan-bwd"])
def test_bench_rows_run(name):
    """The rows' timed calls on the interpreter at a small shape (Dm = H·D = 32); no peer; the
    backward row returns a gradient of every input and says it is the derived backward."""
    from tilemix.bench import bench

    ours, peer, peer_name, nbytes, flops, shape = bench.CASES[name](1, 70, 2, 16, torch.float32, device="cpu")
    out = ours()
    if bench.direction(name) == "bwd":
        assert len(out) == 8 and all(g.isfinite().all() for g in out)
        assert bench._backward_field(name) == {"backward": "derived"}
    else:
        assert out.shape == (1, 70, 32) and out.isfinite().all()
    assert (peer, peer_name, shape) == (None, "-", dict(B=1, T=70, Dm=32, N=16))
    channels, entries = 70 * 32 * 4, 70 * 16 * 4  # fp32 bytes of one [B, T, Dm] and one [B, T, N] tensor
    # forward: read u, delta, z, B, C, write y; backward: read those and dy, write du, ddelta, dz, dB, dC
    expected = {"selective_scan": 4 * channels + 2 * entries, "selective_scan-bwd": 7 * channels + 4 * entries}
    assert nbytes == expected[name]


def _specs(N: int, Dm: int = 2048, B: int = 8, T: int = 4096, P: int = 64) -> dict:
    """The program's arguments at the bench shape, every option on (B and C padded to 64 columns, the
    state to 16, as the op pads them on a GPU)."""
    H = Dm // P
    seq = TensorSpec((B, T, H, P), "bfloat16")
    return dict(u=seq, delta=seq, z=seq, A=TensorSpec((H, N * P), "float32"),
                B=TensorSpec((B, T, 1, 64), "bfloat16"), C=TensorSpec((B, T, 1, 64), "bfloat16"),
                D=TensorSpec((H, P), "float32"), delta_bias=TensorSpec((H, P), "float32"), delta_softplus=True,
                h=TensorSpec((B, H, P, -(-N // 16) * 16), "float32"))


GRADED = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# (arch, program) -> local memory bytes measured at N = 2 state entries, every option on. The state
# is a [64, 16] tile and the decay rates are read slice by slice, so what spills is the chunk's 64 x 64
# fp32 tiles beside each entry's scan: Δ, y and the scan's operands; the backward programs hold the
# entry's recomputed scan and its gradient besides (at N = 8, the most one call scans, the forward
# spills 144 bytes on sm_90a: loop invariants reloaded once per chunk). d_A runs every entry in one
# program, as d_delta does (its [1, N·P] state addressed by entry: no column blocks)
SPILLING: dict[tuple[str, str], int] = {
    ("sm_90a", "forward"): 16, ("sm_90a", "d_A"): 952, ("sm_90a", "d_B"): 16, ("sm_90a", "d_C"): 24,
    ("sm_90a", "d_delta"): 1248, ("sm_90a", "d_delta_bias"): 1232, ("sm_90a", "d_u"): 112, ("sm_90a", "d_z"): 24,
    ("sm_80", "forward"): 8, ("sm_80", "d_A"): 632, ("sm_80", "d_B"): 40, ("sm_80", "d_C"): 32,
    ("sm_80", "d_delta"): 1088, ("sm_80", "d_delta_bias"): 936, ("sm_80", "d_u"): 64, ("sm_80", "d_z"): 32,
}


@functools.cache
def _programs(N: int = 2) -> dict:
    """The forward and its derived backward's launches: name -> (kernel, binding)."""
    from tilemix.ops.derived_cuda import backward_launches

    binding = selective_scan_fwd.bind(_specs(N))
    found = {"forward": (selective_scan_fwd, binding)}
    for name, derived, derived_binding in backward_launches(selective_scan_fwd, binding, ["y", "h"], GRADED):
        found[f"d_{name}" if name else "states"] = (derived, derived_binding)
    return found


@pytest.mark.parametrize("N", [2, 8])
def test_no_program_cuts_its_entries_into_column_blocks(N):
    """d_A's program carries the gradient of the head's ``[1, N·P]`` decay rates as a state whose
    columns its entries address by position (``A[:, n·P:(n+1)·P]``, B's and the state's column n):
    cut into 64-wide column blocks (the schedule's split), each block ran entry 0's program, and on
    the GPU d_A was wrong for every entry past the first. Likewise a forward state of more than 64
    columns (entry n in column n, picked by ``iota`` and a slice) stays whole."""
    from tilemix.codegen.schedule import default_schedule, splittable, wide_columns
    from tilemix.ops.examples import kernel_specs

    for name, (kernel, binding) in _programs(N).items():
        assert wide_columns(kernel, binding) == (), name
    d_A, binding = _programs(N)["d_A"]
    assert not splittable(d_A, binding, "S")
    assert default_schedule(d_A, binding, "sm_90a").split == ()
    wide = selective_scan_fwd.bind(kernel_specs(selective_scan_fwd, {"S": 256, "E": 128}, size=128))
    assert not splittable(selective_scan_fwd, wide, "E")


def test_the_forward_state_rows_stay_whole():
    """The forward reads ``S / P`` entries of its decays: traced at a 64-wide block of its 128 state
    rows (P) it would read two entries where the call has one, so P is not cut into row blocks."""
    from tilemix.codegen.schedule import default_schedule
    from tilemix.ops.examples import kernel_specs

    binding = selective_scan_fwd.bind(kernel_specs(selective_scan_fwd, size=128))
    assert binding.extent("S") == binding.extent("P") == 128
    assert default_schedule(selective_scan_fwd, binding, "sm_90a").split == ()


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("program", ["forward", "states", *(f"d_{n}" for n in GRADED)])
def test_compiles_without_local_memory(arch, program):
    """No matmul in these programs (each state entry's scan is elementwise), so no tensor-core check."""
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    kernel, binding = _programs()[program]
    check_compiled(kernel, binding, arch, (arch, program), SPILLING, mma=False)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 100, 300])
@pytest.mark.parametrize("G", [0, 2])
def test_gpu_bf16_forward_and_backward_against_float64(T, G):
    """bf16 u, delta, z, B, C; float32 A, D, delta_bias, state; N = 16 (B and C padded to 64 columns)."""
    exact = _inputs(B=2, T=T, Dm=256, N=16, G=G, seed=T + G)
    low = {n: t.to("cuda", torch.bfloat16 if n in ("u", "delta", "z", "B", "C") else torch.float32).requires_grad_()
           for n, t in exact.items()}
    exact = {n: t.requires_grad_() for n, t in exact.items()}
    y, h = selective_scan(**low, delta_softplus=True, output_final_state=True)
    y_ref, h_ref = selective_scan(**exact, delta_softplus=True, output_final_state=True)
    assert rel_err(y.float().cpu(), y_ref.detach().numpy()) <= bound(torch.bfloat16)
    assert rel_err(h.cpu(), h_ref.detach().numpy()) <= bound(torch.bfloat16)
    dy, dh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    ((y.float() * dy.to("cuda")).sum() + (h * dh.to("cuda")).sum()).backward()
    ((y_ref * dy).sum() + (h_ref * dh).sum()).backward()
    for n in exact:
        assert rel_err(low[n].grad.float().cpu(), exact[n].grad.numpy()) <= bound(torch.bfloat16), n
