"""``tilemix bench --cp``: scaling of the context-parallel ops (``tilemix.ops.context_parallel``) over
the GPUs of one host, one NCCL rank per GPU, forward + backward.

Weak scaling (linear attention, SSD): every rank holds ``tokens`` tokens, so ``W`` ranks do ``W`` times
the work of one; strong scaling (causal ring attention): ``W`` ranks share one sequence of ``tokens``
tokens. A record's ``efficiency`` is the time one GPU takes for ``1/W`` of the work (the single-GPU op
on one rank's tokens; for attention a ``W``-th of the whole sequence's time) over the time of ``W``
ranks (the slowest rank's). The same harness runs on the CPU over gloo (the interpreter, small shapes),
which is how it is tested without GPUs."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tilemix import ops

__all__ = ["run_cp_bench", "CP_ROWS"]

# (op, scaling, B, tokens, H, D): tokens per rank (weak) or in all (strong), the bar shapes
CP_ROWS = (("linear_attention", "weak", 1, 131072, 16, 128), ("ssd", "weak", 1, 131072, 16, 128),
           ("attention", "strong", 1, 131072, 16, 128))


def _inputs(op: str, B: int, T: int, H: int, D: int, device: str, seed: int) -> tuple[dict, Callable, Callable]:
    """Random inputs of ``T`` tokens, the single-GPU op and its context-parallel form (each called with
    the inputs, returning the output to backpropagate from). Timing needs only each rank's shapes: a
    rank draws its own tokens (with its own ``seed``) rather than slicing a whole sequence."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    if op == "linear_attention":
        args = dict(q=rnd(B, T, H, D, scale=D ** -0.5), k=rnd(B, T, H, D, scale=D ** -0.5), v=rnd(B, T, H, D))
        return args, lambda **a: ops.linear_attention(**a)[0], lambda **a: ops.linear_attention_cp(**a)[0]
    if op == "ssd":
        args = dict(x=rnd(B, T, H, D), dt=(torch.rand(B, T, H, generator=g) * 0.1).to(device),
                    A=-torch.rand(H, generator=g).to(device), B=rnd(B, T, 1, D), C=rnd(B, T, 1, D))
        return args, lambda **a: ops.ssd(**a)[0], lambda **a: ops.ssd_cp(**a)[0]
    args = dict(q=rnd(B, T, H, D), k=rnd(B, T, H, D), v=rnd(B, T, H, D))
    return args, lambda **a: ops.attention(**a, causal=True), lambda **a: ops.attention_cp(**a, causal=True)


def _training_step(fn: Callable, args: dict) -> Callable[[], None]:
    """Forward and backward of ``fn`` on leaf copies of the floating-point inputs."""
    leaves = {n: t.detach().clone().requires_grad_(t.is_floating_point() and t.dim() > 1) for n, t in args.items()}

    def step():
        out = fn(**leaves)
        out.backward(torch.ones_like(out))
    return step


def _seconds(step: Callable[[], None], device: str, reps: int, together: bool = False) -> float:
    """Wall time of one ``step`` after a warm-up; ``together``: every rank of the default group runs it
    at once, and the slowest rank's time counts."""
    step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if together:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / reps
    elapsed = torch.tensor([seconds], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    if together:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _rank_main(rank: int, world: int, init_file: str, rows: tuple, device: str, reps: int, out_file: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    records = []
    try:
        for op, scaling, B, tokens, H, D in rows:
            local = tokens if scaling == "weak" else tokens // world
            args, single, parallel = _inputs(op, B, local, H, D, device, seed=rank)
            parallel_s = _seconds(_training_step(parallel, args), device, reps, together=True)
            if rank == 0:  # one GPU: the op on one rank's tokens (weak), on the whole sequence (strong)
                one = args if scaling == "weak" else _inputs(op, B, tokens, H, D, device, seed=world)[0]
                single_s = _seconds(_training_step(single, one), device, reps)
                share = single_s if scaling == "weak" else single_s / world
                records.append(dict(op=op, direction="fwd+bwd", scaling=scaling, world_size=world,
                                    shape=dict(B=B, T=local * world, H=H, D=D), ms=parallel_s * 1e3,
                                    single_ms=single_s * 1e3, efficiency=share / parallel_s))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(records, f)


def run_cp_bench(world_sizes: tuple[int, ...] | None = None, rows: tuple = CP_ROWS, device: str = "cuda",
                 reps: int = 5, json_path: str | None = None) -> list[dict] | None:
    """Time ``rows`` at each world size (default: 2, 4, 8 up to the GPUs there are) and print the
    records (and write them to ``json_path``); None, with the reason printed, where the host has fewer
    than two CUDA GPUs. ``device="cpu"``: the same over gloo processes (a test of the harness)."""
    if device == "cuda" and torch.cuda.device_count() < 2:
        print(f"tilemix bench --cp needs at least 2 CUDA GPUs on one host (found {torch.cuda.device_count()}): "
              "context parallelism runs one NCCL rank per GPU")
        return None
    if world_sizes is None:
        world_sizes = tuple(w for w in (2, 4, 8) if w <= torch.cuda.device_count())
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for world in world_sizes:
            out_file = os.path.join(scratch, f"records-{world}.json")
            mp.spawn(_rank_main, args=(world, os.path.join(scratch, f"rendezvous-{world}"), rows, device, reps,
                                       out_file), nprocs=world)
            with open(out_file) as f:
                records += json.load(f)
    for r in records:
        print(f"{r['op']} {r['scaling']} x{r['world_size']} {r['shape']}: {r['ms']:.3f} ms "
              f"(one GPU {r['single_ms']:.3f} ms), efficiency {r['efficiency']:.0%}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(command="tilemix bench --cp", records=records), f, indent=2)
    return records
