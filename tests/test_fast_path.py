"""Remembered public calls (``ops/fastpath.py``): a call whose key was seen replays the first call's
launches on its own tensors, bit for bit what the full call gives (the interpreter here); a change
of anything the checks read misses; bad input never reaches a replay."""

from __future__ import annotations

import functools

import pytest
import torch

from tilemix import ops, reference
from tilemix.ops import fastpath, runtime
from tilemix.reference.tolerance import rel_err


@pytest.fixture
def replays(monkeypatch):
    """The number of replayed calls so far (a list holding one count)."""
    count = [0]
    real = fastpath._Replay.__call__

    def counted(self, values):
        count[0] += 1
        return real(self, values)

    monkeypatch.setattr(fastpath._Replay, "__call__", counted)
    return count


def _rand(*shape, dtype=torch.float64, generator):
    return torch.randn(*shape, generator=generator, dtype=dtype)


def _inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (_rand(1, 70, 2, 16, generator=g) * 0.25 for _ in range(3))
    return dict(q=q, k=k, v=v, state=_rand(1, 2, 16, 16, generator=g), x=_rand(1, 70, 2, 16, generator=g),
                dt=torch.rand(1, 70, 2, generator=g, dtype=torch.float64) * 0.1 + 0.01,
                A=-torch.rand(2, generator=g, dtype=torch.float64) - 0.5, B=_rand(1, 70, 1, 16, generator=g),
                C=_rand(1, 70, 1, 16, generator=g), g=-torch.rand(1, 70, 2, 16, generator=g, dtype=torch.float64) * 0.1,
                a=_rand(70, 16, generator=g), b=_rand(16, 32, generator=g), q1=_rand(1, 1, 2, 16, generator=g),
                k1=_rand(1, 1, 2, 16, generator=g), v1=_rand(1, 1, 2, 16, generator=g))


@functools.cache
def _mixer():
    """A user's mixer (registered once per process: a second op of one name is an error)."""
    return ops.mixer(ops.linear_attention_fwd, "tilemix_test::fast_path_mixer", final_states=("s",))


CALLS = {  # each returns the tensors to compare; the step also its updated state
    "gemm": lambda t: ops.gemm(t["a"], t["b"]),
    "attention": lambda t: ops.attention(t["q"], t["k"], t["v"], causal=True),
    "linear_attention": lambda t: ops.linear_attention(t["q"], t["k"], t["v"], 0.3, t["state"], True),
    "ssd": lambda t: ops.ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], output_final_state=True),
    "gla": lambda t: ops.gla(t["q"], t["k"], t["v"], t["g"], exact=True),
    "mixer": lambda t: _mixer()(q=t["q"], k=t["k"], v=t["v"], scale=0.25),
    "linear_attention_step": lambda t: (ops.linear_attention_step(t["q1"], t["k1"], t["v1"], t["state"]), t["state"]),
}


def _flat(result) -> list[torch.Tensor]:
    return [r for r in (result if isinstance(result, (tuple, list)) else (result,)) if r is not None]


@pytest.mark.parametrize("name", list(CALLS))
def test_a_replayed_call_equals_the_full_call_bit_for_bit(name, replays):
    """The second call of a key replays (and skips the checks); its results, on new inputs, equal
    those of the full call on the same inputs (everything forgotten first) to the bit, and the
    first call's inputs are not what it ran on."""
    call = CALLS[name]
    call(_inputs(0))
    fast_inputs, full_inputs = _inputs(1), _inputs(1)
    fast = _flat(call(fast_inputs))
    assert replays[0] == 1
    runtime.forget_calls()
    full = _flat(call(full_inputs))
    assert replays[0] == 1  # forgotten: the full call ran
    assert len(fast) == len(full) and all(torch.equal(a, b) for a, b in zip(fast, full))
    assert not torch.equal(fast[0], _flat(call(_inputs(0)))[0])


def test_a_replay_matches_the_float64_reference(replays):
    """What the replay returns is the op's result, checked against the float64 reference."""
    t0, t1 = _inputs(0), _inputs(1)
    ops.linear_attention(t0["q"], t0["k"], t0["v"], initial_state=t0["state"], output_final_state=True)
    o, s = ops.linear_attention(t1["q"], t1["k"], t1["v"], initial_state=t1["state"], output_final_state=True)
    assert replays[0] == 1
    ref_o, ref_s = reference.linear_attention(t1["q"], t1["k"], t1["v"], initial_state=t1["state"],
                                              output_final_state=True)
    assert rel_err(o, ref_o) < 1e-12 and rel_err(s, ref_s) < 1e-12


def test_a_step_bumps_the_state_version_as_the_full_call_does(replays):
    """The in-place state of a replayed step: updated as the full call updates it, and its version
    counter moved by as much (autograd's check of saved tensors relies on it)."""
    t = _inputs(0)
    ops.linear_attention_step(t["q1"], t["k1"], t["v1"], t["state"])
    fast, full = _inputs(1)["state"], _inputs(1)["state"]
    before = fast._version
    ops.linear_attention_step(t["q1"], t["k1"], t["v1"], fast)
    assert replays[0] == 1
    runtime.forget_calls()
    ops.linear_attention_step(t["q1"], t["k1"], t["v1"], full)
    assert torch.equal(fast, full) and fast._version - before == full._version - before > 0


MISSES = {  # a call differing from the recorded one in one thing the key holds
    "shape": lambda t: ops.linear_attention(t["q"][:, :64], t["k"][:, :64], t["v"][:, :64]),
    "dtype": lambda t: ops.linear_attention(t["q"].float(), t["k"].float(), t["v"].float()),
    "stride": lambda t: ops.linear_attention(t["q"].transpose(0, 1).contiguous().transpose(0, 1).mT.contiguous().mT,
                                             t["k"], t["v"]),
    "flag": lambda t: ops.linear_attention(t["q"], t["k"], t["v"], output_final_state=True),
    "scale": lambda t: ops.linear_attention(t["q"], t["k"], t["v"], scale=0.5),
    "keyword": lambda t: ops.linear_attention(t["q"], t["k"], v=t["v"]),
    "target": lambda t: runtime.call_with_target("auto", ops.linear_attention, t["q"], t["k"], t["v"]),
}


@pytest.mark.parametrize("change", list(MISSES))
def test_a_change_of_the_key_runs_the_full_call(change, replays):
    """Shape, dtype, strides, a flag, a number, a keyword, the target: each misses (the full call
    runs and records), and the result is the full call's."""
    t = _inputs(0)
    ops.linear_attention(t["q"], t["k"], t["v"])
    ops.linear_attention(t["q"], t["k"], t["v"])
    assert replays[0] == 1
    got = _flat(MISSES[change](t))
    assert replays[0] == 1
    runtime.forget_calls()
    assert all(torch.equal(a, b) for a, b in zip(got, _flat(MISSES[change](t))))


def test_an_environment_knob_and_grad_mode_are_in_the_key(monkeypatch, replays):
    t = _inputs(0)
    ops.linear_attention(t["q"], t["k"], t["v"])
    monkeypatch.setenv("TILEMIX_SEGMENTS", "2")
    ops.linear_attention(t["q"], t["k"], t["v"])
    monkeypatch.delenv("TILEMIX_SEGMENTS")
    with torch.no_grad():
        ops.linear_attention(t["q"], t["k"], t["v"])
    assert replays[0] == 0
    ops.linear_attention(t["q"], t["k"], t["v"])
    assert replays[0] == 1


BAD = {  # (call after a recorded good one, error type, message fragment)
    "flag": (lambda t: ops.linear_attention(t["q"], t["k"], t["v"], output_final_state="False"), TypeError,
             "output_final_state"),
    "state shape": (lambda t: ops.linear_attention(t["q"], t["k"], t["v"], initial_state=t["state"][..., :8]),
                    ValueError, "initial_state"),
    "a list": (lambda t: ops.linear_attention(t["q"].tolist(), t["k"], t["v"]), TypeError, "q"),
    "devices": (lambda t: ops.linear_attention(t["q"], t["k"].to("meta"), t["v"]), ValueError, "k"),
    "target": (lambda t: ops.linear_attention(t["q"], t["k"], t["v"], target="hopper"), ValueError, "target"),
    "step state": (lambda t: ops.linear_attention_step(t["q1"], t["k1"], t["v1"], t["state"].mT), ValueError,
                   "state"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_after_a_remembered_call_raises_as_a_first_call_does(case, replays):
    """Good calls remembered first (each twice: the second replayed), a bad one raises the error a
    first call raises, word for word."""
    call, error, fragment = BAD[case]
    t = _inputs(0)
    with pytest.raises(error, match=fragment) as fresh:
        call(t)
    for _ in range(2):
        ops.linear_attention(t["q"], t["k"], t["v"])
        ops.linear_attention(t["q"], t["k"], t["v"], initial_state=t["state"])
        ops.linear_attention_step(t["q1"], t["k1"], t["v1"], t["state"])
    assert replays[0] == 3
    with pytest.raises(error) as remembered:
        call(t)
    assert str(remembered.value) == str(fresh.value)


def test_calls_that_are_more_than_their_launches_always_run_in_full(replays):
    """A value read on the host (a packed batch's offsets, checked), the same tensor passed twice, a
    tensor that requires grad: never replayed, and right each time."""
    t = _inputs(0)
    packed = torch.tensor([0, 30, 70], dtype=torch.int32)
    for _ in range(3):
        ops.linear_attention(t["q"], t["k"], t["v"], cu_seqlens=packed)
        _mixer()(q=t["q"], k=t["k"], v=t["v"], scale=0.25, cu_seqlens=packed)
        ops.linear_attention(t["q"], t["q"], t["v"])
        o, _ = ops.linear_attention(t["q"].requires_grad_(), t["k"], t["v"])
        assert o.requires_grad
        t["q"].requires_grad_(False)
    assert replays[0] == 0
    ref, _ = reference.linear_attention(t["q"], t["q"], t["v"])
    assert rel_err(ops.linear_attention(t["q"], t["q"], t["v"])[0], ref) < 1e-12


def test_a_replay_launches_the_remembered_launch_on_the_new_tensors(monkeypatch, replays):
    """On a GPU a replay calls the prepared launch ``run_kernel`` remembered, with this call's
    tensors and numbers; a stand-in for it here (every launch signature resolves to it)."""
    seen = []

    def launch(args, into):
        seen.append(args)
        return {"o": torch.zeros_like(args["v"])}

    real = runtime.recall
    monkeypatch.setattr(runtime, "recall", lambda signature, kind="launch": launch if kind == "launch" else
                        real(signature, kind))
    first, second = _inputs(0), _inputs(1)
    ops.linear_attention(first["q"], first["k"], first["v"], scale=0.5)
    o, state = ops.linear_attention(second["q"], second["k"], second["v"], scale=0.5)
    assert replays[0] == 1 and len(seen) == 2 and state is None
    assert all(seen[1][n] is second[n] for n in "qkv") and seen[1]["scale"] == 0.5 and seen[1]["s"] is None
    assert o.shape == second["v"].shape


def test_traced_and_moded_calls_take_the_full_path(replays):
    """Under a dispatch mode (fake tensors, opcheck) or the capture of ``tilemix tune`` the call
    runs in full, through the custom op (which the mode sees)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    t = _inputs(0)
    ops.linear_attention(t["q"], t["k"], t["v"])
    with Names() as mode:
        ops.linear_attention(t["q"], t["k"], t["v"])
    with runtime.capture_calls() as calls:
        ops.linear_attention(t["q"], t["k"], t["v"])
    assert replays[0] == 0 and any("tilemix.linear_attention" in n for n in mode.ops) and len(calls) == 1


@fastpath.fast_path
def _scaled_by_sign(q, k, v):
    """Linear attention whose scale the host picks from q's values (saying so with ``host_read``)."""
    positive = bool(q.sum() > 0)
    runtime.host_read()
    return ops.linear_attention(q, k, v, scale=1.0 if positive else 2.0)[0]


def test_a_value_read_on_the_host_is_never_replayed(replays):
    """A function whose launches depend on its tensors' values (read on the host, ``host_read``) runs
    in full every time: a second call whose values pick the other branch gets that branch."""
    t = _inputs(0)
    q = t["q"].abs()
    _scaled_by_sign(q, t["k"], t["v"])
    got = _scaled_by_sign(-q, t["k"], t["v"])
    assert replays[0] == 0
    assert torch.equal(got, ops.linear_attention(-q, t["k"], t["v"], scale=2.0)[0])


def _gpu_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)

    dt = (torch.rand(1, 200, 2, generator=g) * 0.1 + 0.01).cuda()
    gate = (-torch.rand(1, 200, 2, 64, generator=g) * 0.1).to("cuda", torch.bfloat16)
    return dict(q=rnd(1, 200, 2, 64, scale=0.125), k=rnd(1, 200, 2, 64, scale=0.125), v=rnd(1, 200, 2, 64),
                state=rnd(1, 2, 64, 64, dtype=torch.float32), x=rnd(1, 200, 2, 64), dt=dt,
                A=-(torch.rand(2, generator=g) + 0.5).cuda(), B=rnd(1, 200, 1, 64), C=rnd(1, 200, 1, 64), g=gate,
                a=rnd(200, 64), b=rnd(64, 128), q1=rnd(1, 1, 2, 64), k1=rnd(1, 1, 2, 64), v1=rnd(1, 1, 2, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CALLS))
def test_gpu_a_replayed_call_equals_the_full_call_bit_for_bit(name, replays):
    """On the GPU: a replay (the remembered launch, this call's tensors) gives the full call's
    results to the bit, on inputs other than the first call's."""
    call = CALLS[name]
    call(_gpu_inputs(0))
    fast = _flat(call(_gpu_inputs(1)))
    assert replays[0] == 1
    runtime.forget_calls()
    full = _flat(call(_gpu_inputs(1)))
    assert len(fast) == len(full) and all(torch.equal(a, b) for a, b in zip(fast, full))


def test_inference_mode_calls_replay_and_an_inference_state_is_keyed_apart(replays):
    """Under inference mode a step on an inference-tensor state replays (no version counter to
    move) and equals the full call; a normal tensor in the same place is another key."""
    t = _inputs(0)
    with torch.inference_mode():
        fast, full = _inputs(1)["state"].clone(), _inputs(1)["state"].clone()
        for state in (t["state"].clone(), fast):
            ops.linear_attention_step(t["q1"], t["k1"], t["v1"], state)
        assert replays[0] == 1
        runtime.forget_calls()
        ops.linear_attention_step(t["q1"], t["k1"], t["v1"], full)
        assert torch.equal(fast, full)
        ops.linear_attention_step(t["q1"], t["k1"], t["v1"], t["state"])  # not an inference tensor
    assert replays[0] == 1


def test_autocast_calls_run_in_full(replays):
    """Under autocast a call runs in full (an op that registers autocast is cast by the dispatcher,
    which a replay would skip)."""
    op = ops.mixer(ops.linear_attention_fwd, "tilemix_test::fast_path_autocast", final_states=("s",))
    op.op.register_autocast("cpu", torch.bfloat16)
    q, k, v = (t.float() for t in (_inputs(0)[n] for n in "qkv"))
    op(q=q, k=k, v=v, scale=0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, _ = op(q=q, k=k, v=v, scale=0.25)
    assert replays[0] == 0 and o.dtype == torch.bfloat16  # its inputs cast by the dispatcher
