"""Ring attention: softmax attention over a sequence sharded across a process group.

Each rank keeps its queries and passes its keys and values around the ring (``cp_exchange.ring_pass``,
overlapped with the compute); at each of the ``W`` steps it attends its queries to the block it holds
with the attention program that also writes the rows' log-sum-exp (``attention_fwd_lse``) and merges
the partial outputs by their log-sum-exp. Causal attention shards zig-zag (rank r holds chunks r and
``2W-1-r`` of ``2W`` equal chunks), so every rank has the same work: its own block is causal, an
earlier rank's first chunk is seen whole by both local chunks, a later rank's two chunks are seen whole
by the second local chunk only. The backward is FlashAttention-2's per block (``attention_bwd_dq``,
``attention_bwd_dkdv``) with the merged log-sum-exp; key and value gradients travel around the ring
with their block and arrive home after ``W`` passes."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .attention import attention_bwd_dkdv_op, attention_bwd_dq_op, attention_lse_op
from .cp_exchange import rank_and_size, ring_pass
from .runtime import call_with_target, check_call, current_target, default_scale, use_target

__all__ = ["attention_cp", "zigzag_shard", "zigzag_unshard"]

ALL = slice(None)


def _blocks(rank: int, source: int, causal: bool, length: int) -> list[tuple[slice, slice, bool]]:
    """(query slice, key slice, causal) of the local queries and the keys from rank ``source`` that see
    each other, as equal-length pieces (the attention programs take as many keys as queries)."""
    if not causal or source == rank:
        return [(ALL, ALL, causal)]  # own block: the two local chunks are in sequence order
    first, second = slice(0, length // 2), slice(length // 2, length)
    if source < rank:  # its first chunk precedes both local chunks; its second follows both
        return [(first, first, False), (second, first, False)]
    return [(second, first, False), (second, second, False)]  # only the local second chunk follows it


def _merge(o: torch.Tensor, lse: torch.Tensor, o_part: torch.Tensor, lse_part: torch.Tensor) -> None:
    """Fold a partial softmax (``o_part``, ``lse_part``) into the running one (``o``, ``lse``), in place."""
    merged = torch.logaddexp(lse, lse_part)
    o.mul_((lse - merged).exp().unsqueeze(-1)).add_(o_part.to(o.dtype) * (lse_part - merged).exp().unsqueeze(-1))
    lse.copy_(merged)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, group):
        rank, world = rank_and_size(group)
        length = q.shape[1]
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        o = torch.zeros(*q.shape[:3], v.shape[3], dtype=work, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=work, device=q.device)
        block = (k, v)
        for step in range(world):
            transfer = ring_pass(list(block), group) if step < world - 1 else None
            for qs, ks, block_causal in _blocks(rank, (rank - step) % world, causal, length):
                o_part, lse_part = attention_lse_op(q[:, qs].contiguous(), block[0][:, ks].contiguous(),
                                                    block[1][:, ks].contiguous(), block_causal, scale)
                _merge(o[:, qs], lse[:, qs], o_part, lse_part)
            if transfer is not None:
                block = tuple(transfer.wait())
        o = o.to(q.dtype)
        ctx.causal, ctx.scale, ctx.group, ctx.target = causal, scale, group, current_target()
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        rank, world = rank_and_size(ctx.group)
        length, do = q.shape[1], do.contiguous()
        work = lse.dtype
        dq = torch.zeros_like(q, dtype=work)
        kb, vb, dk, dv = k, v, torch.zeros_like(k, dtype=work), torch.zeros_like(v, dtype=work)
        with use_target(ctx.target):
            for step in range(world):
                transfer = ring_pass([kb, vb], ctx.group) if step < world - 1 else None  # overlaps the compute
                for qs, ks, block_causal in _blocks(rank, (rank - step) % world, ctx.causal, length):
                    args = (q[:, qs].contiguous(), kb[:, ks].contiguous(), vb[:, ks].contiguous(),
                            do[:, qs].contiguous(), lse[:, qs].contiguous(), block_causal, ctx.scale)
                    dq_part, delta = attention_bwd_dq_op(*args, o[:, qs].contiguous())
                    dk_part, dv_part = attention_bwd_dkdv_op(*args, delta)
                    dq[:, qs] += dq_part
                    dk[:, ks] += dk_part
                    dv[:, ks] += dv_part
                # the gradients go on with their block (after the last step, home)
                dk, dv = ring_pass([dk, dv], ctx.group).wait()
                if transfer is not None:
                    kb, vb = transfer.wait()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def attention_cp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                 scale: float | None = None, *, group: dist.ProcessGroup | None = None,
                 target: str | None = None) -> torch.Tensor:
    """``attention`` on a sequence sharded along T over ``group`` (None: the default group): q, k, v
    are this rank's ``[B, L, H, *]`` tokens, the same L on every rank; with ``causal``, L even and the
    rank's two zig-zag chunks side by side (``zigzag_shard``). Returns this rank's ``[B, L, H, V]``.
    Differentiable (every rank must backpropagate: the gradients travel the ring)."""
    check_call("attention_cp", differentiable=True, target=target, flags=dict(causal=causal), q=q, k=k, v=v)
    if causal and q.shape[1] % 2:
        raise ValueError(f"q: causal ring attention needs an even number of tokens per rank (two zig-zag chunks), "
                         f"got {q.shape[1]}")
    return call_with_target(target, _RingAttention.apply, q, k, v, bool(causal), default_scale(q, scale), group)


def zigzag_shard(x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s tokens of the whole sequence ``x`` for causal ``attention_cp``: chunks ``rank`` and
    ``2·world_size - 1 - rank`` of ``2·world_size`` equal chunks along ``dim``, side by side."""
    if x.shape[dim] % (2 * world_size):
        raise ValueError(f"x: zig-zag sharding over {world_size} ranks needs a length along dim {dim} that is a "
                         f"multiple of {2 * world_size}, got {x.shape[dim]}")
    chunks = x.chunk(2 * world_size, dim)
    return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim)


def zigzag_unshard(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's ``zigzag_shard`` (in rank order): its inverse."""
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)
