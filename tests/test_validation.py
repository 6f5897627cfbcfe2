"""Bad input to every public op is an error naming the argument, raised before anything runs.

Hypothesis draws a valid call of each op, then breaks one argument in one way (rank, a dim, the
dtype, the device, not a tensor at all); the error must name that argument, and neither the
interpreter nor a kernel launch may have been reached.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tilemix import ops
from tilemix.ops.runtime import check_hopper_dims
from tilemix.tiles import Kernel


def _valid_call(op: str, T: int, H: int, D: int, device: str = "cpu") -> dict:
    """A valid call; on CUDA in bfloat16 (what the kernels take), per-head and state tensors float32."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16

    def t(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    def f32(x):
        return x.to(device)

    if op == "gemm":
        return dict(a=t(T, D), b=t(D, H * 16))
    if op == "attention":
        return dict(q=t(1, T, H, D), k=t(1, T, H, D), v=t(1, T, H, D))
    if op == "linear_attention":
        return dict(q=t(1, T, H, D), k=t(1, T, H, D), v=t(1, T, H, D), initial_state=f32(torch.randn(1, H, D, D)))
    return dict(x=t(1, T, H, D), dt=f32(torch.rand(1, T, H)), A=f32(-torch.rand(H)), B=t(1, T, 1, D),
                C=t(1, T, 1, D), D=f32(torch.randn(H)), initial_state=f32(torch.randn(1, H, D, D)))


# dims another argument also sizes (the others, e.g. gemm's M, may take any size); q's heads and length
# are not tied: one more query head than k's is a valid grouped-query call, another length cross-attention
TIED = {("gemm", "a"): [1], ("gemm", "b"): [0], ("attention", "q"): [0, 3], ("attention", "v"): [0, 1, 2],
        ("ssd", "B"): [0, 1, 3],
        ("ssd", "A"): [0], ("ssd", "D"): [0], ("ssd", "dt"): [0, 1, 2]}


def _break(value: torch.Tensor, how: str, dim: int, tied: list[int]):
    if how == "rank":
        return value[0] if value.dim() > 1 else value[None, None]
    if how == "dim":
        shape = list(value.shape)
        shape[tied[dim % len(tied)]] += 1
        return torch.randn(*shape, device=value.device).to(value.dtype)
    if how == "integer dtype":
        return value.to(torch.int32)
    if how == "other device":
        return value.to("meta" if value.device.type == "cpu" else "cpu")
    return value.tolist()  # not a tensor


@pytest.fixture
def nothing_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("bad input reached the interpreter or a launch")

    monkeypatch.setattr(Kernel, "run", refuse)
    from tilemix.codegen import launch

    monkeypatch.setattr(launch, "prepare_launch", refuse)  # what every launch goes through, on every target


# the patch that refuses to run anything may stay in place across examples
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["gemm", "attention", "linear_attention", "ssd"]), T=st.integers(1, 80),
       H=st.integers(1, 3), D=st.sampled_from([16, 32]), victim=st.integers(0, 6), dim=st.integers(0, 3),
       how=st.sampled_from(["rank", "dim", "integer dtype", "other device", "not a tensor"]))
def test_bad_input_names_the_argument(op, T, H, D, victim, dim, how, nothing_runs):
    _check_bad_input(op, T, H, D, victim, dim, how, "cpu")


@pytest.mark.gpu
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["gemm", "attention", "linear_attention", "ssd"]), T=st.integers(1, 80),
       H=st.integers(1, 3), victim=st.integers(0, 6), dim=st.integers(0, 3),
       how=st.sampled_from(["rank", "dim", "integer dtype", "other device", "not a tensor"]))
def test_gpu_bad_input_names_the_argument(op, T, H, victim, dim, how, nothing_runs):
    """The same on CUDA tensors (bfloat16, head dims the GPU kernels take): no compile, no launch."""
    _check_bad_input(op, T, H, 64, victim, dim, how, "cuda")


def _check_bad_input(op, T, H, D, victim, dim, how, device):
    args = _valid_call(op, T, H, D, device)
    name = list(args)[victim % len(args)]
    args[name] = _break(args[name], how, dim, TIED.get((op, name), list(range(args[name].dim()))))
    with pytest.raises((TypeError, ValueError)) as error:
        getattr(ops, op)(**args)
    # "name: ...", or the argument that sized a dim first: "(T = 11 from name)", "name's", "name is on"
    named = rf"(^{name}:|from {name}\)|\b{name}'s|\b{name} is on)"
    assert re.search(named, str(error.value)), f"{how} {name}: {error.value}"


def test_mixed_dtypes_name_both_arguments(nothing_runs):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(TypeError, match="k: dtype bf16 differs from q's f32"):
        ops.attention(q, q.bfloat16(), q)


def test_hopper_head_dims_are_checked_before_compiling():
    """A head dim the GPU kernels cannot tile is a ValueError naming the argument (CPU-checkable:
    the same check runs first on every CUDA call)."""
    q = torch.zeros(1, 4, 2, 96, dtype=torch.bfloat16)
    v = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16)
    binding = ops.linear_attention_fwd.bind(dict(q=q, k=q, v=v, scale=1.0))
    with pytest.raises(ValueError, match="q: its K dim is 96; the GPU kernels take multiples of 64"):
        check_hopper_dims(binding, {})
    a, b = torch.zeros(8, 12, dtype=torch.float16), torch.zeros(12, 16, dtype=torch.float16)
    gemm = ops.gemm_fwd.bind(dict(a=a, b=b))
    with pytest.raises(ValueError, match="a: its K dim is 12"):
        check_hopper_dims(gemm, {})
    single = ops.linear_attention_fwd.bind(dict(q=v.float(), k=v.float(), v=v.float(), scale=1.0))
    with pytest.raises(TypeError, match="q: the GPU kernels take bfloat16 or float16 tensors, got f32"):
        check_hopper_dims(single, {})


@pytest.mark.gpu
def test_gpu_bad_input_is_refused_before_launch(nothing_runs):
    q = torch.randn(1, 8, 2, 96, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q: its K dim is 96"):
        ops.linear_attention(q, q, q[..., :64].contiguous())
    with pytest.raises(ValueError, match="k is on cpu but q is on cuda"):
        ops.attention(q[..., :64], q[..., :64].cpu(), q[..., :64])


def test_tensors_on_different_gpus_are_refused():
    """The device check compares whole devices (index included); CPU-testable with stand-ins."""
    from types import SimpleNamespace

    from tilemix.ops.runtime import check_devices

    on = lambda index: SimpleNamespace(device=torch.device("cuda", index))  # noqa: E731
    with pytest.raises(ValueError, match="k is on cuda:1 but q is on cuda:0"):
        check_devices({"q": on(0), "k_": on(1)}, {"k_": "k"})
    assert check_devices({"q": on(1), "k": on(1)}, {}) == torch.device("cuda", 1)


@pytest.mark.parametrize("op", ["gemm", "attention", "linear_attention", "ssd"])
def test_torch_ops_check_before_running(op, nothing_runs):
    """torch.ops.tilemix.* called directly (no public wrapper in front) refuses a mismatched
    argument by name before anything runs."""
    t = torch.randn
    calls = {"gemm": (lambda: (t(8, 16), t(17, 8)), "b"),
             "attention": (lambda: (t(1, 8, 2, 16), t(1, 9, 2, 16), t(1, 8, 2, 16), False, 1.0), "k"),
             "linear_attention": (lambda: (t(1, 8, 2, 16), t(1, 8, 2, 16), t(1, 8, 3, 16), 1.0, None, False), "v"),
             "ssd": (lambda: (t(1, 8, 2, 16), torch.rand(1, 8, 2), -torch.rand(2), t(1, 8, 1, 16), t(1, 8, 1, 16),
                              t(3), None, False), "D")}
    make, name = calls[op]
    with pytest.raises((TypeError, ValueError), match=rf"(^{name}:|from {name}\)|\b{name}'s)"):
        getattr(torch.ops.tilemix, op)(*make())


@pytest.mark.parametrize("scale", ["0.5", torch.tensor(0.5), True, [0.5]])
@pytest.mark.parametrize("op", ["attention", "linear_attention"])
def test_scale_must_be_a_number(op, scale, nothing_runs):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(TypeError, match="^scale: expected a Python number"):
        getattr(ops, op)(q, q, q, scale=scale)


@pytest.mark.parametrize("value", ["False", "no", 0, 1, None, torch.tensor(True)])
@pytest.mark.parametrize("op, flag", [("attention", "causal"), ("linear_attention", "output_final_state"),
                                      ("ssd", "output_final_state")])
def test_flags_must_be_bools(op, flag, value, nothing_runs):
    """A flag is True or False: ``causal="False"`` would otherwise run causal (a non-empty string is true)."""
    args = _valid_call(op, 8, 2, 16)
    with pytest.raises(TypeError, match=f"^{flag}: expected True or False, got"):
        getattr(ops, op)(**args, **{flag: value})
