"""Attention of a few queries against a long KV cache, split over the keys (flash-decoding).

A decode step has one query (or a few: speculative tokens, a short chunk) per sequence and
thousands of keys: one program instance per (batch, head) would leave most of the GPU idle while
each streams the whole cache. ``attention_decode_split`` is a grid over both the query block and
splits of ``split`` keys; each instance writes its split's normalised partial output and the
log-sum-exp of its scores, one 64-row tile per split, by block number (``o_part[j] = ...``, along the
dim ``P`` of ``block`` rows per split). ``attention_decode_combine`` weighs each split's partial by
``exp(lse_split - lse)`` over the splits. Causal masks align to the end (query i sees keys
``j <= i + Tk - Tq``), as the cross-attention programs' do; a split a query sees none of weighs 0.

``attention()`` takes this path by itself (``decode_split`` says when): no gradient wanted, at most
``DECODE_QUERIES`` queries, and batch x heads too few to fill the GPU twice over, with keys enough
for two splits of ``MIN_SPLIT`` or more."""

from __future__ import annotations

import torch

from tilemix.codegen import schedule as schedules
from tilemix.tiles import Const, GroupSeq, Out, Scalar, Seq, blocks, chunks, exp, full, kernel, log, maximum, zeros

from ._library import tile_op
from .attention_tiles import KEYS, LOG2E, NO_SCORE_YET, key_chunk, nonzero_denominator, online_softmax, variant

__all__ = ["attention_decode", "attention_decode_split", "attention_decode_split_gqa", "attention_decode_combine",
           "decode_split", "DECODE_QUERIES"]

PARTS = "P"  # the partial results' dim: ``block`` rows per split
DECODE_QUERIES = 64  # one query block: the most queries the decode path takes
MIN_SPLIT = 512  # keys per split at the least: a split's partial costs a 64-row tile write and read
CTAS_PER_SM = 2  # the splits aim at this many program instances per SM
NOMINAL_SMS = 132  # an H100's SMs: the count the rule takes for CPU tensors and under torch.compile


@kernel
def attention_decode_split(q: Seq["D"], k: Seq.along(KEYS)["D"], v: Seq.along(KEYS)["V"], scale: Scalar,
                           o_part: Out[Seq.along(PARTS)["V"]], lse_part: Out[Seq.along(PARTS)[1]],
                           is_causal: Const = False, split: Const = 2048, block: Const = 64, chunk: Const = 128):
    """Per query block and split of ``split`` keys: the split's softmax-normalised output and
    log-sum-exp (natural log; about ``NO_SCORE_YET`` for a row that sees none of its keys)."""
    for i in blocks(block):
        for j in blocks(split, dim=k.seq_dim):  # the splits side by side
            own = chunks(chunk, dim=k.seq_dim, start=j, through=j)  # the split's own key chunks
            acc, m, denom = online_softmax(q[i], k, v, i, scale, is_causal, None, block, chunk, True, own)
            denom = nonzero_denominator(denom, True)
            o_part[j] = acc / denom
            lse_part[j] = m * (1 / LOG2E) + log(denom)


attention_decode_split_gqa = variant(attention_decode_split, "gqa",
                                      dict(k=GroupSeq.along(KEYS)["D"], v=GroupSeq.along(KEYS)["V"]))
schedules.declare(attention_decode_split, attention_decode_split_gqa, consts=key_chunk, own_blocks=True)


@kernel
def attention_decode_combine(o_part: Seq.along(PARTS)["V"], lse_part: Seq.along(PARTS)[1], o: Out[Seq["V"]],
                             block: Const = 64):
    """Each query's output: the splits' partials weighed by ``exp(lse_split - max)``, normalised
    by the weights' sum (one online pass over the splits, a split per ``block`` rows of P)."""
    for i in blocks(block):
        m, total, acc = full(block, 1, NO_SCORE_YET), zeros(block, 1), zeros(block, o_part.cols)
        for c in chunks(block, dim=o_part.seq_dim):
            lse = lse_part[c]
            m_new = maximum(m, lse)
            alpha, weight = exp(m - m_new), exp(lse - m_new)
            total = total * alpha + weight
            acc = acc * alpha + weight * o_part[c]
            m = m_new
        o[i] = acc / total


def decode_split(q: torch.Tensor, k: torch.Tensor) -> int | None:
    """The keys per split the decode path runs ``q`` against ``k`` with, or None where it does not
    pay: more than ``DECODE_QUERIES`` queries, or batch x heads enough for ``CTAS_PER_SM`` instances
    per SM without splitting, or fewer than two splits. Otherwise the splits that reach that many
    instances, each a power of two of keys, at least ``MIN_SPLIT`` (a few compiled kernels). Sizes
    torch.compile keeps symbolic take the cross-attention programs (None)."""
    if q.dim() != 4 or k.dim() != 4:
        return None  # a wrong rank: the programs' binding names the argument
    if not all(type(s) is int for s in (*q.shape, *k.shape)):
        return None  # symbolic sizes (torch.compile, dynamic shapes): the cross-attention programs
    B, Tq, H, _ = q.shape
    Tk = k.shape[1]
    if Tq > DECODE_QUERIES or Tk == 0:
        return None
    traced = torch.compiler.is_compiling()  # the device query stays out of a traced graph
    sms = schedules.sm_count(q.device.index) if q.is_cuda and not traced else NOMINAL_SMS
    wanted = -(-CTAS_PER_SM * sms // max(1, B * H))
    if wanted < 2:
        return None
    split = max(MIN_SPLIT, 1 << (-(-Tk // wanted) - 1).bit_length())
    return split if Tk > split else None


def _split_args(q, k, v, causal, scale, split):
    parts = -(-k.shape[1] // split) * DECODE_QUERIES
    return dict(q=q, k=k, v=v, scale=scale, is_causal=causal, split=split, P=parts), {}, None


_SPLIT_SCHEMA = "(Tensor q, Tensor k, Tensor v, bool causal, float scale, int split) -> (Tensor, Tensor)"
_split_ops = {grouped: tile_op(f"attention_decode_split{'_gqa' if grouped else ''}", _SPLIT_SCHEMA, program,
                               _split_args, lambda out: (out["o_part"], out["lse_part"]))
              for grouped, program in ((False, attention_decode_split), (True, attention_decode_split_gqa))}
_combine_op = tile_op("attention_decode_combine", "(Tensor o_part, Tensor lse_part, int T) -> Tensor",
                      attention_decode_combine,
                      lambda o_part, lse_part, T: (dict(o_part=o_part, lse_part=lse_part, T=T), {}, None),
                      lambda out: out["o"])


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                     split: int) -> torch.Tensor:
    """``attention(q, k, v, causal, scale)`` for at most ``DECODE_QUERIES`` queries, the keys in
    splits of ``split`` (a multiple of the 128-key chunk): the split program, then the combine
    program. Checked by ``attention()``, which calls it; no gradient."""
    o_part, lse_part = _split_ops[k.shape[2] != q.shape[2]](q, k, v, causal, scale, split)
    return _combine_op(o_part, lse_part, q.shape[1])
