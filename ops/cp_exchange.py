"""The collectives context parallelism runs over ``torch.distributed`` (any backend: gloo on the
CPU, NCCL on GPUs), with the gradients they need: an all-gather whose backward is an all-reduce of
the gathered gradients, and one step of a ring (send to the next rank, receive from the previous).

A collective in a backward runs only when every rank's backward reaches it, so every rank must
backpropagate through the outputs of a context-parallel op (as with DistributedDataParallel)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather", "ring_pass", "RingTransfer", "rank_and_size"]


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` (None: the default group) and the group's size; a clear error
    where ``torch.distributed`` is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                           "first (context-parallel ops shard the sequence over a process group)")
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGather(torch.autograd.Function):
    """``[W, *x.shape]``: every rank's ``x``. Backward: each rank's gradient of the gathered tensor,
    summed over the ranks (all-reduce), sliced at this rank: what reaches ``x`` from every rank's use."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        rank, world = rank_and_size(group)
        ctx.rank = rank
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``x`` (same shape on every rank), stacked in rank order as ``[W, *x.shape]``;
    differentiable."""
    return _AllGather.apply(x, group)


class RingTransfer:
    """Tensors on their way around the ring: ``wait()`` returns the previous rank's."""

    def __init__(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None):
        rank, world = rank_and_size(group)
        self.received, self._requests = tensors, []
        if world == 1:
            return
        to_rank, from_rank = (_global_rank(group, (rank + step) % world) for step in (1, -1))
        self._sent = [t.contiguous() for t in tensors]  # alive until the sends complete
        self.received = [torch.empty_like(t) for t in self._sent]
        ops = [dist.P2POp(dist.isend, t, to_rank, group) for t in self._sent]
        ops += [dist.P2POp(dist.irecv, t, from_rank, group) for t in self.received]
        self._requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for request in self._requests:
            request.wait()
        return self.received


def ring_pass(tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> RingTransfer:
    """Start sending ``tensors`` to the next rank of the ring and receiving the previous rank's (same
    shapes and dtypes on every rank; one ``batch_isend_irecv``), so that work can overlap the transfer.
    Not differentiable: ring attention passes its gradients explicitly."""
    return RingTransfer(tensors, group)


def _global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    """``rank`` of ``group`` as a rank of the default group (what point-to-point ops address)."""
    return rank if group is None else dist.get_global_rank(group, rank)
