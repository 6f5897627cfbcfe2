"""Context parallelism (ops/context_parallel.py): with the sequence sharded over process groups of 2,
3 and 4 gloo processes on the CPU (uneven slices, lengths that are not multiples of 64), every rank's
outputs, the final state and every gradient equal the single-process op's (float64 interpreter).
One spawn of 4 processes serves all three groups (2 and 3 as subgroups, 4 as the default group):
each process imports tilemix and traces its programs once."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tilemix.ops import attention, attention_cp, linear_attention, linear_attention_cp, ssd, ssd_cp
from tilemix.ops.context_parallel import zigzag_shard, zigzag_unshard

TOLERANCE = 1e-9
PROCESSES = 4
LENGTHS = [70, 45, 37, 29]  # scan tokens held by each process, none a multiple of 64
GROUPS = ((0, 1), (1, 2, 3), None)  # the process groups the ops run over (None: the default group, all 4)
CHUNK = 13  # causal ring attention: 2W zig-zag chunks of this many tokens


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _reference(fn, inputs: dict, upstream: tuple) -> tuple[tuple, dict]:
    """``fn(**inputs)``'s outputs and the gradients of Σ output·upstream for every input that is a tensor."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in inputs.items() if isinstance(t, torch.Tensor)}
    outputs = fn(**{**inputs, **leaves})
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    sum(((o * u).sum() for o, u in zip(outputs, upstream) if u is not None), torch.zeros(())).backward()
    return tuple(o.detach() for o in outputs), {n: t.grad for n, t in leaves.items()}


def _members(group: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(range(PROCESSES)) if group is None else group


def _cases(group: tuple[int, ...] | None) -> dict:
    """Whole-sequence inputs, upstream gradients and the single-process results for each op over ``group``."""
    members = _members(group)
    world = len(members)
    g = torch.Generator().manual_seed(world)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    T = sum(LENGTHS[m] for m in members)
    la = dict(q=rnd(1, T, 2, 8), k=rnd(1, T, 2, 8), v=rnd(1, T, 2, 12), scale=0.3, initial_state=rnd(1, 2, 8, 12),
              output_final_state=True)
    la_up = (rnd(1, T, 2, 12), rnd(1, 2, 8, 12))
    ssd_in = dict(x=rnd(1, T, 4, 8), dt=torch.rand(1, T, 4, generator=g, dtype=torch.float64) * 0.5,
                  A=-torch.rand(4, generator=g, dtype=torch.float64) * 2, B=rnd(1, T, 2, 8), C=rnd(1, T, 2, 8),
                  D=rnd(4), initial_state=rnd(1, 4, 8, 8), output_final_state=True)
    ssd_up = (rnd(1, T, 4, 8), rnd(1, 4, 8, 8))
    Ta = 2 * world * CHUNK
    attn = {causal: dict(q=rnd(1, Ta, 2, 8), k=rnd(1, Ta, 2, 8), v=rnd(1, Ta, 2, 6), causal=causal, scale=0.4)
            for causal in (True, False)}
    attn_up = {causal: (rnd(1, Ta, 2, 6),) for causal in (True, False)}
    return dict(
        linear_attention=(la, la_up, _reference(linear_attention, la, la_up)),
        ssd=(ssd_in, ssd_up, _reference(ssd, ssd_in, ssd_up)),
        attention={c: (attn[c], attn_up[c], _reference(attention, attn[c], attn_up[c])) for c in (True, False)})


def _check_scan(rank: int, slices: list[int], group, fn, case, sequence: tuple[str, ...],
                whole: tuple[str, ...]) -> None:
    """``fn`` on this rank's slice of the ``sequence`` inputs matches the single-process results: the output
    slice, the final state, the slices of the sequence inputs' gradients, ``initial_state``'s gradient
    (on rank 0) and, summed over the ranks, the gradients of the ``whole`` inputs (A, D)."""
    inputs, (d_out, d_final), ((out, final), grads) = case
    start, length = sum(slices[:rank]), slices[rank]
    local = {n: (t[:, start:start + length] if n in sequence else t) for n, t in inputs.items()}
    if rank:
        local["initial_state"] = None
    leaves = {n: t.clone().requires_grad_(True) for n, t in local.items() if isinstance(t, torch.Tensor)}
    got, got_final = fn(**{**local, **leaves}, group=group)
    upstream_final = d_final if rank == len(slices) - 1 else torch.zeros_like(d_final)  # its gradient on one rank
    ((got * d_out[:, start:start + length]).sum() + (got_final * upstream_final).sum()).backward()
    assert _rel(got, out[:, start:start + length]) <= TOLERANCE
    assert _rel(got_final, final) <= TOLERANCE
    for name in sequence:
        assert _rel(leaves[name].grad, grads[name][:, start:start + length]) <= TOLERANCE, name
    for name in whole:
        summed = leaves[name].grad.clone()
        dist.all_reduce(summed, group=group)
        assert _rel(summed, grads[name]) <= TOLERANCE, name
    if rank == 0:
        assert _rel(leaves["initial_state"].grad, grads["initial_state"]) <= TOLERANCE


def _check_attention(rank: int, world: int, group, case) -> None:
    """Ring attention on this rank's tokens (zig-zag when causal, else contiguous) matches the
    single-process output and q, k, v gradients on those tokens."""
    inputs, (d_out,), ((out,), grads) = case
    if inputs["causal"]:
        shard = lambda t: zigzag_shard(t, rank, world)  # noqa: E731
    else:
        shard = lambda t: t.chunk(world, 1)[rank]  # noqa: E731
    leaves = {n: shard(inputs[n]).clone().requires_grad_(True) for n in ("q", "k", "v")}
    got = attention_cp(**leaves, causal=inputs["causal"], scale=inputs["scale"], group=group)
    (got * shard(d_out)).sum().backward()
    assert _rel(got, shard(out)) <= TOLERANCE
    for name, leaf in leaves.items():
        assert _rel(leaf.grad, shard(grads[name])) <= TOLERANCE, name


def _worker(process: int, init_file: str, cases: list[dict]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=process, world_size=PROCESSES)
    try:
        for members, case in zip(GROUPS, cases):
            group = None if members is None else dist.new_group(list(members))  # every process creates each
            if process not in _members(members):
                continue
            rank, slices = _members(members).index(process), [LENGTHS[m] for m in _members(members)]
            _check_scan(rank, slices, group, linear_attention_cp, case["linear_attention"], ("q", "k", "v"), ())
            _check_scan(rank, slices, group, ssd_cp, case["ssd"], ("x", "dt", "B", "C"), ("A", "D"))
            for attention_case in case["attention"].values():
                _check_attention(rank, len(slices), group, attention_case)
    finally:
        dist.destroy_process_group()


def test_context_parallel_matches_the_single_process_ops_over_2_3_and_4_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), [_cases(group) for group in GROUPS]), nprocs=PROCESSES)


def test_zigzag_unshard_inverts_zigzag_shard():
    x = torch.arange(2 * 36 * 3).reshape(2, 36, 3)
    shards = [zigzag_shard(x, rank, 3) for rank in range(3)]
    assert shards[0][:, :6].equal(x[:, :6]) and shards[0][:, 6:].equal(x[:, 30:])  # chunks 0 and 5
    assert zigzag_unshard(shards).equal(x)


def test_bad_sharding_is_a_clear_error():
    with pytest.raises(ValueError, match="x: zig-zag sharding over 3 ranks"):
        zigzag_shard(torch.zeros(1, 20, 2), 0, 3)
    q = torch.zeros(1, 7, 2, 8)
    with pytest.raises(ValueError, match="q: causal ring attention needs an even number"):
        attention_cp(q, q, q, causal=True)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        linear_attention_cp(q, q, q)


def test_cp_bench_times_every_row_over_gloo_processes(tmp_path):
    from tilemix.bench.cp import run_cp_bench

    rows = (("linear_attention", "weak", 1, 70, 2, 16), ("ssd", "weak", 1, 70, 2, 16),
            ("attention", "strong", 1, 52, 2, 16))
    records = run_cp_bench(world_sizes=(2,), rows=rows, device="cpu", reps=1, json_path=str(tmp_path / "cp.json"))
    assert [(r["op"], r["world_size"], r["shape"]["T"]) for r in records] == [
        ("linear_attention", 2, 140), ("ssd", 2, 140), ("attention", 2, 52)]
    assert all(r["efficiency"] > 0 and r["ms"] > 0 for r in records)
    assert "records" in (tmp_path / "cp.json").read_text()


def test_cp_bench_explains_missing_gpus(monkeypatch, capsys):
    from tilemix.bench.cp import run_cp_bench

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert run_cp_bench() is None
    assert "needs at least 2 CUDA GPUs on one host (found 1)" in capsys.readouterr().out
