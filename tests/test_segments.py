"""Sequence-parallel state passing (ops/_segments.py): cutting a scan into segments that run in
parallel gives the sequential scan's outputs and final state; when it is chosen."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix.codegen.schedule import MIN_LENGTH, segment_count
from tilemix.ops.linear_attention import linear_attention_fwd, linear_attention_scan
from tilemix.ops.runtime import run_kernel
from tilemix.ops.ssd import ssd_fwd, ssd_scan
from tilemix.ops.ssd_backward import ssd_bwd_dc, ssd_bwd_dc_scan, ssd_bwd_dx, ssd_bwd_dx_scan


def _args(op: str, B: int, T: int, H: int, initial: bool, seed: int):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if op == "linear_attention":
        args = dict(q=rnd(B, T, H, 32), k=rnd(B, T, H, 32), v=rnd(B, T, H, 16), scale=0.25,
                    s=rnd(B, H, 32, 16) if initial else None)
        return linear_attention_fwd, linear_attention_scan, args
    G = 1 if H % 2 else 2
    args = dict(x=rnd(B, T, H, 16), dt=torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.5,
                A=-torch.rand(H, generator=g, dtype=torch.float64) * 2, B=rnd(B, T, G, 32), C=rnd(B, T, G, 32),
                D=rnd(H), h=rnd(B, H, 32, 16) if initial else None)
    return ssd_fwd, ssd_scan, args


@pytest.mark.parametrize("op", ["linear_attention", "ssd"])
@pytest.mark.parametrize("segments", [2, 4])
@pytest.mark.parametrize("initial", [False, True])
def test_segments_match_the_sequential_scan(op, segments, initial):
    kernel, scan, args = _args(op, B=2, T=256, H=2, initial=initial, seed=segments)
    expected = run_kernel(kernel, args)
    got = scan(args, segments=segments)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel, scan, state", [(ssd_bwd_dc, ssd_bwd_dc_scan, "h"),
                                                 (ssd_bwd_dx, ssd_bwd_dx_scan, "g")])
@pytest.mark.parametrize("segments", [2, 4])
def test_ssd_backward_segments_match_the_sequential_programs(kernel, scan, state, segments):
    """The SSD backward's programs in segments: ``ssd_bwd_dc`` carries the forward's state first to
    last, ``ssd_bwd_dx`` the state's gradient last to first (the final state is then the gradient
    of the initial one); outputs and final states as the sequential programs give them."""
    _, _, args = _args("ssd", B=2, T=256, H=2, initial=True, seed=segments)
    args = {name: value for name, value in args.items() if name in kernel.specs and name != "h"}
    args.update(dy=torch.randn_like(args["x"]), **{state: torch.randn(2, 2, 32, 16, dtype=torch.float64)})
    expected = run_kernel(kernel, args)
    got = scan(args, segments=segments)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(segments=st.sampled_from([2, 4, 8]), chunks=st.integers(1, 2), heads_per_group=st.sampled_from([1, 2]),
       G=st.integers(1, 2), strong_decay=st.booleans(), seed=st.integers(0, 2**16))
def test_ssd_backward_segments_property(segments, chunks, heads_per_group, G, strong_decay, seed):
    """Any segment count, segment length, grouping and decay strength: both backward programs in
    segments agree with the sequential ones (float64 interpreter), states and all."""
    g = torch.Generator().manual_seed(seed)
    B, T, H, N, P = 1, 64 * chunks * segments, G * heads_per_group, 16, 16

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    scale = 8.0 if strong_decay else 0.5
    args = dict(x=rnd(B, T, H, P), dt=torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.5,
                A=-torch.rand(H, generator=g, dtype=torch.float64) * scale, B=rnd(B, T, G, N), C=rnd(B, T, G, N),
                dy=rnd(B, T, H, P))
    for kernel, scan, state in ((ssd_bwd_dc, ssd_bwd_dc_scan, "h"), (ssd_bwd_dx, ssd_bwd_dx_scan, "g")):
        call = {name: value for name, value in args.items() if name in kernel.specs}
        call[state] = rnd(B, H, N, P)
        expected = run_kernel(kernel, call)
        got = scan(call, segments=segments)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-9, msg=f"{kernel.name} {name}")


def test_segments_need_whole_chunks():
    _, scan, args = _args("linear_attention", B=1, T=200, H=1, initial=False, seed=0)
    with pytest.raises(ValueError, match="multiple of 256"):
        scan(args, segments=4)


def test_final_state_only_when_asked():
    _, scan, args = _args("ssd", B=1, T=128, H=1, initial=True, seed=0)
    assert set(scan(args, final_states=(), segments=2)) == {"y"}


@pytest.mark.parametrize("T, programs, expected", [
    (4096, 16, 1),  # short: the sequential scan
    (MIN_LENGTH, 132, 1),  # enough CTAs already
    (MIN_LENGTH, 64, 4),  # 256 CTAs >= 1.5 per SM
    (32768, 32, 8),
    (65536, 16, 16),
    (65536, 1, 64),  # as many as 1024-token segments allow
    (MIN_LENGTH + 64, 16, 1),  # no power of two divides it into whole chunks
])
def test_segment_count(T, programs, expected, monkeypatch):
    monkeypatch.delenv("TILEMIX_SEGMENTS", raising=False)
    assert segment_count(T, programs, sms=132) == expected


def test_segment_count_from_a_scans_own_length(monkeypatch):
    """A scan with more work per chunk (the SSD backward) is cut from a shorter length."""
    monkeypatch.delenv("TILEMIX_SEGMENTS", raising=False)
    assert segment_count(8192, 64, sms=132) == 1
    assert segment_count(8192, 64, sms=132, min_length=ssd_bwd_dx_scan.min_length) == 4
    assert ssd_bwd_dc_scan.min_length == ssd_bwd_dx_scan.min_length == 8192


def test_segment_count_forced(monkeypatch):
    monkeypatch.setenv("TILEMIX_SEGMENTS", "4")
    assert segment_count(1024, 500, sms=132) == 4
    assert segment_count(1000, 500, sms=132) == 1  # T does not split into 4 x whole chunks
    monkeypatch.setenv("TILEMIX_SEGMENTS", "four")
    with pytest.raises(ValueError, match="TILEMIX_SEGMENTS must be a positive integer"):
        segment_count(1024, 1, sms=132)


@pytest.mark.parametrize("op", ["linear_attention", "ssd", "ssd_bwd_dx"])
@pytest.mark.parametrize("D", [64, 128])
def test_states_programs_lower_to_wgmma_without_spills(op, D):
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    from tilemix.codegen.compile import compile_cuda, ptxas_report, resources, sass
    from tilemix.codegen.schedule import default_source
    from tilemix.ops.examples import example_specs

    scan = {"linear_attention": linear_attention_scan, "ssd": ssd_scan, "ssd_bwd_dx": ssd_bwd_dx_scan}[op]
    specs = example_specs("linear_attention" if op == "linear_attention" else "ssd", D=D)
    specs = {name: spec for name, spec in dict(specs, dy=specs.get("x")).items() if name in scan.states.specs}
    source = default_source(scan.states, scan.states.bind(specs))
    binary = compile_cuda(source.source, "sm_90a", source.name)
    text, usage = sass(binary), resources(binary)
    assert "HGMMA" in text and "LDL" not in text and "STL" not in text
    assert usage["stack"] == usage["local"] == 0, usage
    assert "C7515" not in ptxas_report(source.source, "sm_90a", source.name)
