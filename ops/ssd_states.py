"""What the SSD scans need to run in sequence segments (``ops/_segments.py``): the state a segment
reaches from zero, for the forward and for ``ssd_bwd_dc``; the state gradient a segment carries out
from zero walking last to first, for ``ssd_bwd_dx``; and each segment's total log decay."""

from __future__ import annotations

import torch

from tilemix.tiles import GroupSeq, Head, Seq, State, chunks, colsum, cumsum, exp, kernel

__all__ = ["ssd_states", "ssd_bwd_dx_states", "segment_log_decay"]


@kernel
def ssd_states(x: Seq["P"], dt: Seq[1], A: Head[1], B: GroupSeq["N"], h: State["N", "P"] = None):
    """The state a sequence (a segment of one) reaches from zero: pass 1 of the segmented scan."""
    for c in chunks(64):
        log_decay = dt[c] * A
        decay_to_end = exp(cumsum(log_decay, reverse=True, exclusive=True))
        h = h * exp(colsum(log_decay)) + B[c].T @ (x[c] * (dt[c] * decay_to_end))


@kernel
def ssd_bwd_dx_states(dt: Seq[1], A: Head[1], C: GroupSeq["N"], dy: Seq["P"], g: State["N", "P"] = None):
    """The state gradient a sequence (a segment of one) carries out of its first chunk from zero,
    walking last to first with ``ssd_bwd_dx``'s update: pass 1 of its segmented run."""
    for c in chunks(64, reverse=True):
        log_decay = dt[c] * A
        g = g * exp(colsum(log_decay)) + C[c].T @ (dy[c] * exp(cumsum(log_decay)))


def segment_log_decay(args: dict, segments: int) -> torch.Tensor:
    """Each segment's ``Σ dt·A`` as ``[B, S, H]`` (float64: a handful of numbers per segment)."""
    dt = args["dt"]
    return dt.reshape(dt.shape[0], segments, -1, dt.shape[2]).sum(2, dtype=torch.float64) * args["A"]
