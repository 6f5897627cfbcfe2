"""The benchmark suite's shapes and plots (no GPU: plots from a synthetic result)."""

from __future__ import annotations

import pytest

from tilemix.bench.bench import SHAPE, sweep_rows
from tilemix.bench.plots import plot_results


def test_sweep_holds_tokens_constant():
    rows = sweep_rows()
    assert {r[0] for r in rows} == {"linear_attention", "ssd", "attention"}
    assert {r[2] for r in rows} == {1024, 2048, 4096, 8192, 16384, 32768, 65536}
    assert {r[4] for r in rows} == {64, 128, 256}  # every head dim the ops lower
    assert all(B * T * H == SHAPE[0] * SHAPE[1] * SHAPE[2] for _, B, T, H, _ in rows)
    backward = sweep_rows(head_dims=(128,), names=("ssd-bwd",))  # any case sweeps, backward ones too
    assert [r[1:] for r in backward] == [r[1:] for r in rows if r[0] == "ssd" and r[4] == 128]
    assert {r[0] for r in backward} == {"ssd-bwd"}


def test_plots_from_a_result(tmp_path):
    pytest.importorskip("matplotlib")
    records = [dict(op="linear_attention", shape=dict(B=8 * 4096 // T, T=T, H=16, K=128, V=128), ms=0.2 * T / 4096,
                    peer="fla-chunk_linear_attn", peer_ms=0.5 * T / 4096, roofline_fraction=0.9)
               for T in (1024, 4096, 16384)]
    records += [dict(r, direction="bwd", ms=3 * r["ms"]) for r in records[:2]]  # a series of its own
    result = dict(gpu="H100", date="2026-11-24", versions=dict(torch="2.11"), records=records)
    written = plot_results(result, tmp_path)
    assert {p.name for p in written} == {"linear_attention-d128-time.png", "linear_attention-bwd-d128-time.png",
                                         "roofline.png"}
    assert all(p.stat().st_size > 1000 for p in written)


def test_markdown_and_json_path_from_a_result(tmp_path, capsys):
    import json

    from tilemix.bench.bench import default_json_path
    from tilemix.bench.plots import main
    from tilemix.bench.report import results_markdown

    records = [dict(op="ssd", shape=dict(B=8, T=4096, H=16), ms=0.3, host_us=90.0, peer="fla-chunk_simple_gla",
                    peer_ms=0.5, speedup=0.5 / 0.3, roofline_fraction=0.31)]
    result = dict(gpu="NVIDIA H100 80GB HBM3", date="2026-11-24", versions=dict(torch="2.11"), copy_tbps=3.0,
                  mma_tflops=790.0, command="tilemix bench ssd", records=records)
    assert default_json_path(result).name == "h100-2026-11-24.json"
    assert default_json_path(result).parent.name == "results"
    text = results_markdown(result)
    assert "| ssd | B=8 T=4096 H=16 | 0.300 | 90 | fla-chunk_simple_gla | 0.500 | 1.67x | 31% |" in text
    assert "copy 3.00 TB/s" in text and "790 TFLOP/s" in text
    path = tmp_path / "run.json"
    path.write_text(json.dumps(result))
    main(str(path), str(tmp_path / "out"), md=True)  # no sweep series: the table only (no matplotlib needed)
    assert (tmp_path / "out" / "results.md").read_text() == text


def test_generic_runs_have_their_own_json_and_heading():
    """tilemix bench --target generic: records and result carry target "generic"; the default JSON
    path and the markdown heading say so (a Hopper run of the same day is not overwritten)."""
    from tilemix.bench.bench import default_json_path
    from tilemix.bench.report import results_markdown

    records = [dict(op="gemm", target="generic", arch="sm_90", shape=dict(M=4096), ms=0.5, peer="cublas",
                    peer_ms=0.2, speedup=0.4, roofline_fraction=0.3)]
    result = dict(gpu="NVIDIA H100 80GB HBM3", date="2026-11-30", target="generic", records=records)
    assert default_json_path(result).name == "h100-2026-11-30-generic.json"
    assert "generic (mma.sync) kernels" in results_markdown(result).splitlines()[0]
    assert default_json_path(dict(result, target="sm_90a")).name == "h100-2026-11-30.json"


# -- backward rows (issue 6) -----------------------------------------------------------------------------
BWD_ROWS = ("linear_attention-bwd", "ssd-bwd", "attention-bwd", "attention-bwd-flash2", "gemm-bwd")


def test_backward_rows_are_cases_and_default_rows():
    from tilemix.bench.bench import ATTENTION_SHAPE, CASES, default_rows, direction

    assert set(BWD_ROWS) <= set(CASES)
    rows = {row[0]: row[1:] for row in default_rows(None)}
    assert set(BWD_ROWS) <= set(rows)  # `tilemix bench` with no names times them too
    assert rows["attention-bwd"] == ATTENTION_SHAPE and rows["linear_attention-bwd"] == SHAPE
    assert [direction(n) for n in ("attention-bwd-flash2", "gemm-bwd", "attention-noncausal-flash2", "gemm")] == \
        ["bwd", "bwd", "fwd", "fwd"]
    assert [r[0] for r in default_rows(["gemm-bwd", "attention-bwd"])] == ["gemm-bwd", "attention-bwd"]


@pytest.mark.parametrize("name", ["linear_attention-bwd", "attention-bwd", "gemm-bwd", "ssd-bwd"])
def test_backward_case_runs_forward_once_then_gradients(name, monkeypatch):
    """A backward row's timed call (CPU stand-in: the interpreter at a small shape) runs the op's
    forward on its first call only and returns a gradient of every input each call."""
    import functools

    import torch

    from tilemix import ops
    from tilemix.bench import bench

    op = name.split("-")[0]
    forwards = []
    real = getattr(ops, op)
    monkeypatch.setattr(ops, op, lambda *a, **kw: forwards.append(1) or real(*a, **kw))
    build = bench.CASES[name]
    if name == "gemm-bwd":
        build = functools.partial(build, n=24)
    ours, peer, peer_name, nbytes, flops, shape = build(1, 70, 2, 16, torch.float32, device="cpu")
    try:
        first = ours()
    except NotImplementedError:
        pytest.skip(f"{op} has no backward programs yet")
    second = ours()
    assert len(forwards) == 1 and len(first) == len(second) >= 2
    for a, b in zip(first, second):
        assert torch.equal(a, b) and a.isfinite().all()
    assert nbytes > 0 and flops > 0 and peer_name and callable(peer)


def _fake_gpu(monkeypatch, bench, torch):
    monkeypatch.delenv("TILEMIX_TARGET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 3e12)
    monkeypatch.setattr(bench, "matmul_rate", lambda: 8e14)
    monkeypatch.setattr(bench, "time_ms", lambda fn, **timing: fn() or 2.0)
    monkeypatch.setattr(bench, "host_us", lambda fn, **timing: 50.0)


def test_run_bench_without_peers_keeps_rows_of_a_run_cut_short(tmp_path, monkeypatch):
    """--no-peers never calls a peer (NaN columns); the JSON holds every row measured before the
    run was interrupted."""
    import json

    import torch

    from tilemix.bench import bench

    def build(interrupt):
        def make(B, T, H, D, dtype):
            def ours():
                if interrupt:
                    raise KeyboardInterrupt

            def peer():
                raise AssertionError("a peer was timed with peers=False")
            return ours, peer, "peer", 1e6, 1e9, dict(B=B, T=T)
        return make

    _fake_gpu(monkeypatch, bench, torch)
    monkeypatch.setattr(bench, "CASES", {"first": build(False), "second": build(True)})
    path = tmp_path / "run.json"
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(["first", "second"], json_path=str(path), peers=False)
    records = json.loads(path.read_text())["records"]
    assert [r["op"] for r in records] == ["first"] and records[0]["peer_ms"] != records[0]["peer_ms"]


def test_run_bench_records_backward_direction(tmp_path, monkeypatch):
    """run_bench with fakes for the GPU, the timer and the cases: a -bwd row's record says
    direction "bwd" (op without the suffix), the forward's "fwd"; the markdown row says (bwd); a peer
    that raises is NaN, not the end of the run."""
    import json

    import torch

    from tilemix.bench import bench

    def case(peer_error=None):
        def build(B, T, H, D, dtype):
            def peer():
                if peer_error:
                    raise peer_error
            return (lambda: None), peer, "peer", 1e6, 1e9, dict(B=B, T=T)
        return build

    _fake_gpu(monkeypatch, bench, torch)
    monkeypatch.setattr(bench, "CASES", {"toy": case(), "toy-bwd": case(RuntimeError("no backward here"))})
    path, md = tmp_path / "run.json", tmp_path / "run.md"
    assert bench.run_bench(["toy", "toy-bwd"], json_path=str(path), md_path=str(md)) == 0
    records = json.loads(path.read_text())["records"]
    assert [(r["op"], r["direction"]) for r in records] == [("toy", "fwd"), ("toy", "bwd")]
    assert records[0]["peer_ms"] == 2.0 and records[1]["peer_ms"] != records[1]["peer_ms"]  # NaN
    text = md.read_text()
    assert "| toy | B=8 T=4096 |" in text and "| toy (bwd) | B=8 T=4096 |" in text
    assert "| peer | 2.000 | 1.00x |" in text and "| peer | — | — |" in text  # a NaN peer reads as a dash


def test_run_bench_kernels_lists_each_rows_kernels(tmp_path, monkeypatch, capsys):
    """--kernels: under the row, its kernels longest first as ``kernel_ms`` measured them; the record
    keeps them all; without the flag neither the lines nor the field."""
    import json

    import torch

    from tilemix.bench import bench

    _fake_gpu(monkeypatch, bench, torch)
    monkeypatch.setattr(bench, "CASES", {"toy": lambda B, T, H, D, dtype: (lambda: None, None, "peer", 1e6, 1e9,
                                                                            dict(B=B, T=T))})
    launched = [(f"tilemix_kernel_{i}", 1.0 / (i + 1)) for i in range(bench.KERNELS_SHOWN + 2)]
    monkeypatch.setattr(bench, "kernel_ms", lambda fn: launched)
    for kernels in (True, False):
        path = tmp_path / f"{kernels}.json"
        assert bench.run_bench(["toy"], json_path=str(path), kernels=kernels) == 0
        record = json.loads(path.read_text())["records"][0]
        out = capsys.readouterr().out
        shown = [line.split()[-1] for line in out.splitlines() if line.strip().endswith(tuple(n for n, _ in launched))]
        if kernels:
            assert record["kernels"] == [[n, round(t, 4)] for n, t in launched]
            assert shown == [n for n, _ in launched[:bench.KERNELS_SHOWN]]
        else:
            assert "kernels" not in record and not shown


@pytest.mark.gpu
def test_kernel_ms_finds_the_kernels_of_a_call():
    """``kernel_ms`` on a matmul then an add: both kernels, each under the call's event-timed length."""
    import torch

    from tilemix.ops.timing import kernel_ms, time_ms

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    launched = kernel_ms(lambda: (a @ a).add_(1.0))
    assert len(launched) >= 2 and all(t > 0 for _, t in launched)
    assert launched[0][1] >= launched[-1][1] and sum(t for _, t in launched) < 2 * time_ms(lambda: (a @ a).add_(1.0))


def test_a_users_program_is_a_case_without_peer():
    """`tilemix bench module:kernel`: the program through ops.run on inputs kernel_inputs builds, its
    bytes those of its inputs and outputs, no peer."""
    import torch
    from test_user_mixers import gla_fwd

    from tilemix.bench import bench

    ours, peer, peer_name, nbytes, flops, shape = bench.program_case(gla_fwd)(1, 70, 2, 16, torch.float32,
                                                                             device="cpu")
    out = ours()
    assert set(out) == {"o", "s"} and out["o"].shape == (1, 70, 2, 16) and out["o"].isfinite().all()
    assert peer is None and flops == 0 and shape == dict(B=1, T=70, H=2, D=16)
    assert nbytes == 4 * (5 * 70 * 2 * 16 + 2 * 16 * 16)  # q, k, v, g and o; the state


# -- rows of the derived backwards and the gated / delta-rule mixers (issues 23 and 28) ----------------------
MIXER_ROWS = ("linear_attention-bwd-derived", "ssd-bwd-derived", "retention", "gla-bwd", "rwkv6-bwd",
              "delta_rule", "gated_delta_rule-bwd", "based", "based-bwd", "rwkv7", "rwkv7-bwd", "gla-strong",
              "rwkv6-strong-bwd", "gla-exact-bwd", "rwkv6-exact")


@pytest.mark.parametrize("name", MIXER_ROWS)
def test_mixer_rows_run_and_say_which_backward(name):
    """Each row's timed call runs on the interpreter at a small shape; backward rows return a
    gradient of every floating input and their records say the backward is the derived one."""
    import torch

    from tilemix.bench import bench

    ours, peer, peer_name, nbytes, flops, shape = bench.CASES[name](1, 70, 2, 16, torch.float32, device="cpu")
    out = ours()
    if bench.direction(name) == "bwd":
        assert len(out) >= 3 and all(g.isfinite().all() for g in out)
        assert bench._backward_field(name) == {"backward": "derived"}
    else:
        assert out.shape == (1, 70, 2, 16) and out.isfinite().all() and bench._backward_field(name) == {}
    assert peer_name.startswith(("fla-", "mamba_ssm-")) and callable(peer) and nbytes > 0 and flops > 0


def test_based_rows_run_at_the_bar_shape():
    """Values 64, as issue 29's bar (the bench's D is the value dim: q and k keep 16 features)."""
    from tilemix.bench import bench

    rows = bench.default_rows(["based", "based-bwd"])
    assert rows == [("based", 8, 4096, 16, 64), ("based-bwd", 8, 4096, 16, 64)]


def test_rwkv7_rows_run_at_the_bar_shape():
    """Issue 28's RWKV bar: 32 heads of 64, B = 8, T = 4096."""
    from tilemix.bench import bench

    assert bench.default_rows(["rwkv7", "rwkv7-bwd"]) == [("rwkv7", 8, 4096, 32, 64), ("rwkv7-bwd", 8, 4096, 32, 64)]


def test_hand_written_backward_rows_say_so():
    from tilemix.bench import bench

    assert bench._backward_field("ssd-bwd-mamba") == {"backward": "hand-written"}
    assert bench._backward_field("ssd-mamba") == {}


# -- the grid of issue 25 --------------------------------------------------------------------------------------
def test_grid_rows_cover_heads_by_lengths_as_memory_allows():
    from tilemix.bench.bench import GRID_BH, GRID_MAX_ELEMENTS, GRID_T, grid_rows

    rows = grid_rows(names=("ssd",), head_dims=(64,))
    points = {(B * H, T) for _, B, T, H, _ in rows}
    assert points == {(bh, t) for bh in GRID_BH for t in GRID_T if bh * t * 64 <= GRID_MAX_ELEMENTS}
    assert (1, 131072) in points and (256, 131072) not in points  # 256 x 128k x 64 is 2^31 elements
    assert all(H == min(16, B * H) for _, B, T, H, _ in rows)


def test_grid_run_records_and_heat_maps(tmp_path, monkeypatch):
    """run_bench(grid=True) with fakes for the GPU, the timer and the cases: every record says grid,
    and the plots include one speedup heat map per op, peer and head dim."""
    import json

    import torch

    from tilemix.bench import bench
    from tilemix.bench.plots import plot_results

    pytest.importorskip("matplotlib")

    def build(B, T, H, D, dtype):
        return (lambda: None), (lambda: None), "fla-x", 1e6, 1e9, dict(B=B, T=T, H=H, D=D)

    _fake_gpu(monkeypatch, bench, torch)
    monkeypatch.setattr(bench, "CASES", {"linear_attention": build})
    monkeypatch.setattr(bench, "GRID_BH", (1, 16, 32))
    monkeypatch.setattr(bench, "GRID_T", (1024, 4096))
    path = tmp_path / "grid.json"
    assert bench.run_bench(["linear_attention"], json_path=str(path), grid=True, head_dims=(64,)) == 0
    result = json.loads(path.read_text())
    assert len(result["records"]) == 6 and all(r["grid"] for r in result["records"])
    written = plot_results(result, tmp_path / "plots")
    assert [p.name for p in written] == ["linear_attention-fla-x-d64-grid.png"]


# -- the hybrid model's rows (issue 24): the peer is the same model on the peers' kernels -------------------
def _mamba_layout_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False):
    """``mamba_chunk_scan_combined``'s contract as a float64 token loop, the state ``[B, H, P, N]``."""
    import torch

    batch, T, H, P = x.shape
    state = torch.zeros(batch, H, P, B.shape[-1], dtype=torch.float64) if initial_states is None \
        else initial_states.clone()
    ys = []
    for t in range(T):
        ys.append(_token_update(state, x[:, t], dt[:, t, :, None].expand(batch, H, P),
                                A[:, None, None].expand(H, P, B.shape[-1]), B[:, t], C[:, t],
                                None if D is None else D[:, None].expand(H, P)))
    y = torch.stack(ys, 1)
    return (y, state) if return_final_states else y


def _mamba_layout_step(state, x, dt, A, B, C, D=None, dt_bias=None):
    """``selective_state_update``'s contract (heads share B and C per group), the state updated in place."""
    # mamba_ssm 2.3.2 reads dt_bias.stride() when dt and A are broadcast over P x N, as the swap passes them
    assert dt_bias is not None and dt_bias.stride(-1) == 0, "selective_state_update needs a dt_bias here"
    return _token_update(state, x, dt + dt_bias, A, B, C, D)


def _token_update(state, x, dt, A, B, C, D):
    """One token of the scan in mamba_ssm's state layout ``[B, H, P, N]``, the state updated in place."""
    import torch

    heads, groups = x.shape[1], B.shape[1]
    Bh, Ch = (t.repeat_interleave(heads // groups, 1) for t in (B, C))  # [batch, H, N]
    state.mul_(torch.exp(dt[..., None] * A)).add_(dt[..., None] * x[..., None] * Bh[:, :, None, :])
    y = (state * Ch[:, :, None, :]).sum(-1)
    return y if D is None else y + D * x


def test_model_peer_is_the_same_model_on_other_kernels():
    """The peer model (SDPA, Mamba-2's scan and decode step in mamba_ssm's state layout) equals ours in
    float64 on the CPU, logits and greedy generation: only the kernels differ between the two rows."""
    import torch

    from tilemix.bench.model import build_model, peer_mixers

    model = build_model(heads=2, head_dim=16, dtype=torch.float64, device="cpu", vocab_size=50, dim=32,
                        state_dim=16)
    tokens = torch.randint(0, 50, (2, 70))
    ours = model(tokens)
    generated = model.generate(tokens[:, :40], 5)
    with peer_mixers(_mamba_layout_scan, _mamba_layout_step):
        peer = model(tokens)
        peer_generated = model.generate(tokens[:, :40], 5)
    assert torch.allclose(ours, peer, rtol=1e-9, atol=1e-9)
    assert torch.equal(generated, peer_generated)


@pytest.mark.parametrize("name, direction", [("model-generate", "generate"), ("model-train", "train")])
def test_model_rows_run_on_a_tiny_model(name, direction, monkeypatch):
    """Each model row's timed call runs (a tiny model on the CPU) and its record names its direction."""
    import torch

    from tilemix.bench import bench, model

    monkeypatch.setitem(model.MODEL, "vocab_size", 50)
    monkeypatch.setitem(model.MODEL, "dim", 32)
    monkeypatch.setitem(model.MODEL, "state_dim", 16)
    monkeypatch.setattr(model, "NEW_TOKENS", 3)
    ours, peer, peer_name, nbytes, flops, shape = bench.CASES[name](2, 20, 2, 16, torch.float32, device="cpu")
    out = ours()
    assert out.shape == (2, 23) if direction == "generate" else (out.dim() == 0 and out.isfinite())
    assert bench.direction(name) == direction and peer_name == "torch-sdpa+mamba_ssm" and nbytes > 0 and flops > 0
