"""Decode steps (``ops/decode.py``, ``tiles/step.py``): one token at a time, the states updated in
place, they give the chunked ops' outputs and final states (float64 on the interpreter, from an
initial state); the step programs keep none of the chunk's quadratic part; bad arguments are
errors naming them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix.ops import (
    delta_rule,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_step,
    gla,
    gla_step,
    linear_attention,
    linear_attention_step,
    retention,
    retention_step,
    rwkv6,
    rwkv6_step,
    ssd,
    ssd_step,
    step,
)
from tilemix.ops.decode import STEPS as STEP_OBJECTS
from tilemix.tiles import Head, Out, Seq, State, TileError, blocks, chunks, colsum, cumsum, exp, kernel, segsum

F64 = torch.float64
B, H, K, V = 2, 2, 16, 32


def _inputs(op: str, T: int, seed: int = 0, sizes: tuple[int, int, int, int] = (B, H, K, V)
            ) -> tuple[dict, tuple[str, ...]]:
    """The chunked op's arguments (float64, values in their ranges; ``sizes``: B, H, K, V) and which
    of them run per token."""
    B, H, K, V = sizes
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    q, k, v = randn(B, T, H, K), torch.nn.functional.normalize(randn(B, T, H, K), dim=-1), randn(B, T, H, V)
    gates = -torch.rand(B, T, H, K, generator=g, dtype=F64) * 0.5
    beta = torch.rand(B, T, H, generator=g, dtype=F64)
    if op == "ssd":
        args = dict(x=randn(B, T, H, V), dt=torch.rand(B, T, H, generator=g, dtype=F64) * 0.5 + 0.01,
                    A=-(torch.rand(H, generator=g, dtype=F64) + 0.1), B=randn(B, T, 1, K), C=randn(B, T, 1, K),
                    D=randn(H))
        return args, ("x", "dt", "B", "C")
    per_token = {"linear_attention": dict(q=q, k=k, v=v), "retention": dict(q=q, k=k, v=v),
                 "gla": dict(q=q, k=k, v=v, g=gates), "rwkv6": dict(r=q, k=k, v=v, w=gates),
                 "delta_rule": dict(q=q, k=k, v=v, beta=beta),
                 "gated_delta_rule": dict(q=q, k=k, v=v, g=gates[..., 0], beta=beta)}[op]
    extra = dict(u=randn(H, K)) if op == "rwkv6" else {}
    return {**per_token, **extra, "scale": 0.7}, tuple(per_token)


CHUNKED = {"linear_attention": linear_attention, "ssd": ssd, "retention": retention, "gla": gla, "rwkv6": rwkv6,
           "delta_rule": delta_rule, "gated_delta_rule": gated_delta_rule}
STEP_CALLS = {"linear_attention": linear_attention_step, "ssd": ssd_step, "retention": retention_step,
         "gla": gla_step, "rwkv6": rwkv6_step, "delta_rule": delta_rule_step,
         "gated_delta_rule": gated_delta_rule_step}


def _state(op: str, seed: int = 1, sizes: tuple[int, int, int, int] = (B, H, K, V)) -> torch.Tensor:
    return torch.randn(*sizes, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _assert_steps_equal_the_chunked_op(op: str, T: int, seed: int = 0, sizes=(B, H, K, V)) -> None:
    """Token by token from an initial state, the steps give the chunked op's outputs and final state."""
    args, per_token = _inputs(op, T, seed, sizes)
    initial = _state(op, seed + 1, sizes)
    expected, final = CHUNKED[op](**args, initial_state=initial, output_final_state=True)
    state = initial.clone()
    outputs = [STEP_CALLS[op](**{n: (a[:, t:t + 1] if n in per_token else a) for n, a in args.items()}, state=state)
               for t in range(T)]
    torch.testing.assert_close(torch.cat(outputs, 1), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op", list(CHUNKED))
def test_steps_equal_the_chunked_op(op):
    _assert_steps_equal_the_chunked_op(op, 200 if op == "linear_attention" else 70)


@pytest.mark.parametrize("op", list(CHUNKED))
def test_a_call_of_several_tokens_runs_them_in_order(op):
    """T > 1 in one call: the recurrent form over the tokens, as the chunked op computes them."""
    args, _ = _inputs(op, 67, seed=3)
    initial = _state(op, seed=4)
    expected, final = CHUNKED[op](**args, initial_state=initial, output_final_state=True)
    state = initial.clone()
    torch.testing.assert_close(STEP_CALLS[op](**args, state=state), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final, rtol=1e-10, atol=1e-10)


def test_the_state_is_updated_in_place():
    args, per_token = _inputs("linear_attention", 1)
    state = _state("linear_attention")
    before, address = state.clone(), state.data_ptr()
    o = linear_attention_step(**args, state=state)
    expected, final = linear_attention(**args, initial_state=before, output_final_state=True)
    assert state.data_ptr() == address and not torch.equal(state, before)
    torch.testing.assert_close(state, final)
    torch.testing.assert_close(o, expected)
    assert o.data_ptr() != state.data_ptr()


@pytest.mark.parametrize("op", list(CHUNKED))
def test_step_programs_drop_the_chunk_quadratic_part(op):
    """No in-chunk op survives the specialisation: masks, segment sums, scans along the chunk and
    solves are gone, and every matmul is a vector product against the state (one row)."""
    kernel = STEP_OBJECTS[op].kernel
    args, _ = _inputs(op, 1)
    state_name = STEP_OBJECTS[op].states[0]
    if op == "retention":
        args["log_gamma"] = torch.zeros(H, dtype=F64)
    if op == "gla":
        args.pop("scale")
    program = kernel.trace(kernel.bind({**args, state_name: _state(op)}))
    names = {o.name for o in program.walk()}
    assert not names & {"causal", "window", "in_seq", "segsum", "cumsum", "trisolve", "colsum"}
    assert all(o.result.type.rows == 1 for o in program.walk() if o.name == "matmul")


def test_bad_arguments_are_errors_naming_them():
    args, _ = _inputs("linear_attention", 1)
    state = _state("linear_attention")
    with pytest.raises(TypeError, match="state"):
        linear_attention_step(**args, state=None)
    with pytest.raises(TypeError, match="state"):
        linear_attention_step(**args, state=state.numpy())
    with pytest.raises(ValueError, match="state.*contiguous"):
        linear_attention_step(**args, state=state.transpose(-1, -2))
    with pytest.raises(ValueError, match="state"):
        linear_attention_step(**args, state=state[:, :, :8].contiguous())
    with pytest.raises(ValueError, match="state.*float32"):
        linear_attention_step(**{**args, "q": args["q"].half()}, state=state.half())
    with pytest.raises(ValueError, match="^v: .*B = 2 from q"):
        linear_attention_step(**{**args, "v": args["v"][:1]}, state=state)
    with pytest.raises(TypeError, match="scale"):
        linear_attention_step(**args, state=state, scale="1")
    with pytest.raises(NotImplementedError, match="gradients"):
        linear_attention_step(**{**args, "q": args["q"].requires_grad_()}, state=state)


@kernel
def gated_retention_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], g: Seq[1],
                        o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        qc, kc, vc, gc = q[c], k[c], v[c], g[c]
        o[c] = (qc @ kc.T * exp(segsum(gc))) @ vc + (qc @ s) * exp(cumsum(gc))
        s = s * exp(colsum(gc)) + (kc * exp(cumsum(gc, reverse=True, exclusive=True))).T @ vc


def test_a_users_kernel_gets_a_step():
    """``step(kernel)`` on a program of one's own (the README's gated retention)."""
    from tilemix.ops import run

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 90, 2, 16, generator=g, dtype=F64) for _ in range(3))
    gates = -torch.rand(1, 90, 2, generator=g, dtype=F64)
    initial = torch.randn(1, 2, 16, 16, generator=g, dtype=F64)
    expected = run(gated_retention_fwd, q=q, k=k, v=v, g=gates, s=initial)
    gated_step, state = step(gated_retention_fwd, "test_decode::gated_retention_step"), initial.clone()
    outputs = [gated_step(q=q[:, t:t + 1], k=k[:, t:t + 1], v=v[:, t:t + 1], g=gates[:, t:t + 1], s=state)
               for t in range(90)]
    torch.testing.assert_close(torch.cat(outputs, 1), expected["o"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, expected["s"], rtol=1e-10, atol=1e-10)


@kernel
def reversed_scan(x: Seq["D"], y: Out[Seq["D"]], s: State[1, "D"] = None):
    for c in chunks(64, reverse=True):
        s = s + colsum(x[c])
        y[c] = x[c] + s


@kernel
def grid_program(x: Seq["D"], w: Head["D"], y: Out[Seq["D"]], s: State[1, "D"] = None):
    for c in blocks(64):
        y[c] = x[c] * w


@kernel
def no_state(x: Seq["D"], y: Out[Seq["D"]]):
    for c in chunks(64):
        y[c] = x[c]


def test_programs_without_a_step_are_errors_naming_why():
    x, s = torch.ones(1, 1, 1, 16), torch.zeros(1, 1, 1, 16)
    with pytest.raises(TileError, match="reversed"):
        step(reversed_scan, "test_decode::reversed_scan_step")(x=x, s=s)
    with pytest.raises(TileError, match="blocks"):
        step(grid_program, "test_decode::grid_program_step")(x=x, w=torch.ones(1, 16), s=s)
    with pytest.raises(TileError, match="no State"):
        step(no_state)
    with pytest.raises(TypeError, match="kernel"):
        step(linear_attention)


def _on_gpu(args: dict, dtype=torch.bfloat16) -> dict:
    """``args`` on the GPU: the feature tensors in ``dtype``, per-token and per-head ones in float32."""

    def move(name, a):
        if not isinstance(a, torch.Tensor):
            return a
        return a.to("cuda", dtype if a.dim() == 4 else torch.float32)
    return {n: move(n, a) for n, a in args.items()}


def _gpu_case(op: str, T: int, D: int, seed: int = 0):
    """GPU arguments at head dim ``D`` (B = H = 4) and the float64 chunked op on the same values."""
    args, per_token = _inputs(op, T, seed, (4, 4, D, D))
    initial = _state(op, seed + 1, (4, 4, D, D))
    gpu = _on_gpu(args)
    exact = {n: (a.double().cpu() if isinstance(a, torch.Tensor) else a) for n, a in gpu.items()}
    expected, final = CHUNKED[op](**exact, initial_state=initial, output_final_state=True)
    return gpu, per_token, initial.float().cuda(), expected, final


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["auto", "generic"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("op", list(CHUNKED))
def test_gpu_steps_match_float64(op, D, target):
    """bf16 tokens one at a time on the GPU (sm_90a and the generic kernels), the fp32 state updated
    in place: outputs and final state within the bf16 bound of the float64 chunked op."""
    from tilemix.ops import use_target
    from tilemix.reference.tolerance import bound, rel_err

    gpu, per_token, state, expected, final = _gpu_case(op, 20, D)
    address = state.data_ptr()
    with use_target(target):
        outputs = [STEP_CALLS[op](**{n: (a[:, t:t + 1] if n in per_token else a) for n, a in gpu.items()}, state=state)
                   for t in range(20)]
    assert state.data_ptr() == address
    assert rel_err(torch.cat(outputs, 1), expected.numpy()) <= bound(torch.bfloat16)
    assert rel_err(state, final.numpy()) <= bound(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["linear_attention", "ssd", "gated_delta_rule"])
def test_gpu_step_replays_from_a_cuda_graph(op):
    """A decode step captured in a CUDA graph (after a warm-up call, as torch asks) and replayed on
    new tokens copied into the captured ones: each replay updates the captured state in place as an
    eager step does (bit for bit), with nothing allocated for the state."""
    gpu, per_token, state, _, _ = _gpu_case(op, 6, 128)
    token = lambda t: {n: (a[:, t:t + 1].clone() if n in per_token else a) for n, a in gpu.items()}  # noqa: E731
    eager_state, inputs = state.clone(), token(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        STEP_CALLS[op](**inputs, state=state.clone())  # warm-up: compiles and prepares the launch
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = STEP_CALLS[op](**inputs, state=state)
    for t in range(6):
        fresh = token(t)
        for n in per_token:
            inputs[n].copy_(fresh[n])
        graph.replay()
        expected = STEP_CALLS[op](**fresh, state=eager_state)
        assert torch.equal(captured, expected)
        assert torch.equal(state, eager_state)


@pytest.mark.parametrize("name", ["linear_attention-step", "ssd-step", "retention-step", "gla-step", "rwkv6-step",
                                  "delta_rule-step", "gated_delta_rule-step", "linear_attention-step-h32",
                                  "ssd-step-h32"])
def test_decode_rows_run_on_the_interpreter(name):
    """Each ``<op>-step`` row's timed call runs at a small shape, moving its state on in place; the
    row is a "decode" one at the bar's shape, its roofline the state's bytes."""
    from tilemix.bench import bench

    ours, peer, peer_name, nbytes, flops, shape = bench.CASES[name](1, 3, 2, 16, torch.float32, device="cpu")
    first, second = ours(), ours()
    assert first.shape == (1, 3, 2, 16) and first.isfinite().all() and not torch.equal(first, second)
    assert peer_name.startswith(("fla-fused_recurrent", "mamba_ssm-selective_state_update")) and callable(peer)
    assert nbytes == 2 * 2 * 16 * 16 * 4 and flops > 0
    assert bench.direction(name) == "decode"
    wide = name.endswith("-h32")
    assert bench.default_rows([name]) == [(name, 256 if wide else 128, 1, 32 if wide else 16, 64 if wide else 128)]


@torch.no_grad()
def test_layers_decode_one_token_with_the_step_in_place():
    """``extend`` of one token on a cache (no gradients): linear attention and Mamba-2 update the
    cache's state in place, with the chunked op's result; a prefill leaves a new state."""
    from tilemix.ops import LinearAttention, Mamba2Mixer

    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, dtype=F64)
    for layer in (LinearAttention(32, heads=2, feature_map="elu+1").double(),
                  Mamba2Mixer(32, heads=2, head_dim=16, state_dim=16).double()):
        whole = layer(x)
        y, cache = layer.extend(x[:, :8])
        state = cache if isinstance(cache, torch.Tensor) else cache.ssm
        before = state.clone()
        last, after = layer.extend(x[:, 8:], cache)
        assert (after if isinstance(after, torch.Tensor) else after.ssm) is state
        assert not torch.equal(state, before)
        torch.testing.assert_close(torch.cat([y, last], 1), whole, rtol=1e-10, atol=1e-12)


def test_steps_are_custom_ops_that_compile_and_pass_opcheck():
    """Each step is a custom op mutating its state: ``opcheck`` passes (schema, fake kernel, no alias
    of the output to the state) and ``torch.compile(fullgraph=True)`` traces it, updating the state
    as the eager call does."""
    args, _ = _inputs("linear_attention", 1)
    state = _state("linear_attention")
    torch.library.opcheck(STEP_OBJECTS["linear_attention"].op, (args["q"], args["k"], args["v"], 0.5, state.clone()))

    def decode(q, k, v, state):
        return linear_attention_step(q, k, v, state) * 2

    compiled = torch.compile(decode, fullgraph=True, backend="aot_eager")
    eager_state = state.clone()
    for _ in range(2):
        torch.testing.assert_close(compiled(args["q"], args["k"], args["v"], state),
                                   decode(args["q"], args["k"], args["v"], eager_state))
        torch.testing.assert_close(state, eager_state)


def test_constant_folding_saturates_exp_to_inf():
    """A folded ``exp`` of a large constant is inf, as fp32 gives it, not a Python OverflowError."""
    from tilemix.tiles.step import _exp

    assert _exp(1000.0) == float("inf") and _exp(0.0) == 1.0 and _exp(float("-inf")) == 0.0


def test_step_docstring_example():
    import doctest

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(step, globs={"torch": torch, "step": step}):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted and not runner.summarize(verbose=False).failed


@pytest.mark.parametrize("box_rows, swizzled", [(1, False), (64, True), (16, True)])
def test_one_token_tensor_maps_are_not_swizzled(monkeypatch, box_rows, swizzled):
    """TMA takes the 128-byte swizzle from the shared address, the kernels from the row: a one-row
    box (a decode step's token, its panels 128 bytes apart) is moved unswizzled, whole 8-row blocks
    swizzled."""
    pytest.importorskip("cuda.bindings", reason="encoding tensor maps needs the codegen extra")
    from cuda.bindings import driver as cu

    from tilemix.codegen import launch

    calls = []

    def encode(*args):
        calls.append(args)
        return cu.CUresult.CUDA_SUCCESS, cu.CUtensorMap()

    monkeypatch.setattr(cu, "cuTensorMapEncodeTiled", encode)
    launch._encode_map.__wrapped__(1 << 20, (8, 1, 4, 128), (512, 512, 128, 1), True, "q", box_rows)
    expected = cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B if swizzled else \
        cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_NONE
    assert calls[0][8] == expected


@pytest.mark.parametrize("name", ["selective_scan_fwd", "mlstm_fwd"])
def test_other_scans_one_token_at_a_time_equal_them(name):
    """The pass is general: Mamba-1's selective scan (``linrec`` within the chunk) and mLSTM (three
    states, a running max) run token by token as their chunked programs do."""
    from tilemix import ops
    from tilemix.ops.examples import kernel_specs
    from tilemix.tiles.step import step_kernel

    kernel = getattr(ops, name)
    g = torch.Generator().manual_seed(0)
    args = {n: (0.3 * torch.randn(s.shape, generator=g, dtype=F64) if hasattr(s, "shape") else s)
            for n, s in kernel_specs(kernel, size=16, B=1, T=67, H=2).items()}
    expected, got = ops.run(kernel, **args), ops.run(step_kernel(kernel), **args)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(op=st.sampled_from(list(CHUNKED)), T=st.integers(1, 40), B=st.integers(1, 2), H=st.integers(1, 3),
       K=st.sampled_from([16, 32]), V=st.sampled_from([16, 32]), seed=st.integers(0, 2 ** 16))
def test_steps_equal_the_chunked_op_at_any_shape(op, T, B, H, K, V, seed):
    """Token by token at any batch, head count and head dims (SSD: N = K, P = V)."""
    _assert_steps_equal_the_chunked_op(op, T, seed, (B, H, K, V))
