"""Packed variable-length batches: flash-linear-attention's ``cu_seqlens`` for every sequence program.

N sequences of different lengths are packed into one row, ``[1, T, H, ...]`` with ``T`` the sum of
their lengths, and ``cu_seqlens`` (int32 ``[N + 1]``: 0, the running sums of the lengths, T) says
where each starts. Every sequence is a program instance of its own: its states start from its
initial state (``[N, H, ...]``) and end as its final state, nothing carries (or attends) across a
boundary. A program with a second sequence (``Seq.along("S")``: attention's keys) takes its own
offsets for it (FlashAttention's ``cu_seqlens_k``, the same N): ``Packed``.

CPU tensors run the interpreter on each sequence's slice (the reference semantics). CUDA tensors
launch one kernel over N x H program instances: the generated code reads the sequence's first
token and length from ``cu_seqlens`` (``codegen``'s ``varlen`` lowering), so a sequence costs its
own chunks, the last one partial, and no token of another sequence. A program with a grid of
blocks over the sequence (attention's query blocks) spans the longest sequence's blocks, read from
the offsets (a host sync) unless the caller gives it (``Packed.longest``, FlashAttention's
``max_seqlen``: trusted on a GPU, as there), and the CTAs past a shorter sequence's end return at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tilemix.codegen import launch as launches
from tilemix.codegen.env import read
from tilemix.codegen.schedule import launch_schedule
from tilemix.codegen.structure import packed_offsets
from tilemix.tiles import Kernel
from tilemix.tiles.ir import Loop

from .derived import derived_gradients
from .runtime import (
    call_signature,
    check_devices,
    check_hopper_dims,
    device_arch,
    host_read,
    new_outputs,
    output_specs,
    recall,
    remember,
    run_kernel,
)

__all__ = ["Packed", "check_cu_seqlens", "check_longest", "sequence_count", "run_varlen", "fake_varlen",
           "per_sequence", "join_sequences", "sequence_index", "varlen_gradients", "grid_length", "packed_binding"]

ARGUMENT = "cu_seqlens"


@dataclasses.dataclass(frozen=True)
class Packed:
    """A packed batch's offsets per sequence dim (``"T"``: ``cu_seqlens``; a ``Seq.along`` dim's its
    own, attention's keys' ``cu_seqlens_k``) and the longest length along each dim where the caller
    gives it (``max_seqlen``): a grid sized without reading the offsets."""

    offsets: dict[str, torch.Tensor]
    longest: dict[str, int] = dataclasses.field(default_factory=dict)


def _packed(cu_seqlens: torch.Tensor | Packed) -> Packed:
    """``cu_seqlens`` as a ``Packed`` (a tensor: T's offsets alone)."""
    return cu_seqlens if isinstance(cu_seqlens, Packed) else Packed({"T": cu_seqlens})


def sequence_count(cu_seqlens: torch.Tensor | Packed) -> int:
    """N, the sequences ``cu_seqlens`` packs (from its shape: no read of its values)."""
    return _packed(cu_seqlens).offsets["T"].shape[0] - 1


def check_cu_seqlens(cu_seqlens: Any, packed: torch.Tensor, packed_name: str, name: str = ARGUMENT,
                     trusted: bool = False) -> int:
    """N, after checking ``cu_seqlens`` (the argument ``name``) against ``packed`` (a ``[1, T, ...]``
    input named ``packed_name``): an int32 ``[N + 1]`` tensor (N >= 1) on ``packed``'s device,
    starting at 0, non-decreasing (a sequence may be empty) and ending at T; a batch of one row.
    The values are read (a host sync on a GPU) unless a CUDA graph is being captured, torch.compile
    traces, or ``trusted`` (the caller gave the longest length: no sync, FlashAttention's contract)
    on a GPU."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 tensor of [N + 1] offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32 (flash-linear-attention's convention), "
                        f"got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{name}: expected a 1-D tensor of N + 1 offsets (N >= 1 sequences), "
                         f"got shape {list(cu_seqlens.shape)}")
    if packed.dim() < 2 or packed.shape[0] != 1:
        raise ValueError(f"{packed_name}: with {name} the sequences are packed into one row, "
                         f"[1, T, ...]; got shape {list(packed.shape)}")
    if cu_seqlens.device != packed.device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but {packed_name} is on {packed.device}; "
                         "all tensors must be on one device")
    unread = cu_seqlens.is_cuda and (trusted or torch.cuda.is_current_stream_capturing())
    if torch.compiler.is_compiling() or unread:
        return sequence_count(cu_seqlens)
    offsets = cu_seqlens.tolist()
    host_read()
    T = packed.shape[1]
    if offsets[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name}: offsets must be non-decreasing (each sequence's length is the "
                         f"difference of two), got {offsets}")
    if offsets[-1] != T:
        raise ValueError(f"{name}: must end at T = {T}, the tokens of {packed_name}; got {offsets[-1]}")
    return sequence_count(cu_seqlens)


def check_longest(longest: Any, cu_seqlens: torch.Tensor, name: str) -> int | None:
    """``longest`` (the argument ``name``: None, or a non-negative int, the longest sequence
    ``cu_seqlens`` packs, FlashAttention's ``max_seqlen``). Checked against the offsets on the CPU
    (one below the longest would drop rows); on a GPU trusted, as FlashAttention does (no sync)."""
    if longest is None:
        return None
    if not isinstance(longest, int) or isinstance(longest, bool):
        raise TypeError(f"{name}: expected an int (the longest sequence's length) or None, got {longest!r}")
    if longest < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {longest}")
    if not cu_seqlens.is_cuda and not torch.compiler.is_compiling():
        real = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        host_read()
        if longest < real:
            raise ValueError(f"{name}: {longest} is below the longest sequence's {real} tokens "
                             "(its rows past it would be dropped)")
    return longest


# -- the interpreter: every sequence's slice on its own -------------------------------------------------
def per_sequence(kernel: Kernel, args: dict[str, Any], cu_seqlens: torch.Tensor | Packed,
                 n: int) -> dict[str, Any]:
    """Sequence ``n``'s arguments of ``kernel``: per-token tensors sliced to its tokens (along their
    sequence dim's offsets), states to its row, the rest as given."""
    offsets = _packed(cu_seqlens).offsets
    sliced = {}
    for name, value in args.items():
        kind = kernel.specs[name].kind if name in kernel.specs else None
        if isinstance(value, torch.Tensor) and kind in ("seq", "group_seq"):
            bos, eos = (int(x) for x in offsets[kernel.specs[name].length][n:n + 2].tolist())
            value = value[:, bos:eos]
        elif isinstance(value, torch.Tensor) and kind == "state":
            value = value[n:n + 1]
        sliced[name] = value
    return sliced


def join_sequences(kernel: Kernel, results: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The per-sequence results of ``kernel`` packed as one call's: states stacked on the batch dim
    (``[N, H, ...]``), per-token outputs concatenated along the tokens."""
    return {name: torch.cat([r[name] for r in results], dim=0 if kernel.specs[name].kind == "state" else 1)
            for name in results[0]}


# -- one kernel over every sequence ---------------------------------------------------------------------
def _one_row(kernel: Kernel, args: dict[str, Any], labels: dict[str, str] | None, sequences: int) -> dict[str, Any]:
    """``args`` with each state cut to one row, as a one-row batch's (what binding checks); a state
    with other than N rows is a ValueError naming it."""
    one_row = dict(args)
    for name, value in args.items():
        if isinstance(value, torch.Tensor) and name in kernel.specs and kernel.specs[name].kind == "state":
            if value.dim() < 1 or value.shape[0] != sequences:
                raise ValueError(f"{(labels or {}).get(name, name)}: a packed batch of {sequences} sequences takes "
                                 f"one state per sequence, [{sequences}, H, ...]; got shape {list(value.shape)}")
            one_row[name] = value[:1]
    return one_row


def packed_binding(kernel: Kernel, args: dict[str, Any], labels: dict[str, str] | None, sequences: int,
                   longest: int | dict[str, int] | None = None):
    """The call's binding with B = N sequences: bound on the packed row, states as one row of theirs;
    ``longest``: the grid's ``T_max`` (programs with blocks() loops), or per grid dim (``S_max`` too)."""
    binding = kernel.bind(_one_row(kernel, args, labels, sequences), labels)
    longest = {"T": longest} if isinstance(longest, int) else longest or {}
    extra = {f"{dim}_max": length for dim, length in longest.items()}
    return dataclasses.replace(binding, sizes={**binding.sizes, "B": sequences, **extra})


_GRIDS: dict[Kernel, tuple[str, ...]] = {}


def _grid_dims(kernel: Kernel, args: dict[str, Any], labels: dict[str, str] | None, sequences: int) -> tuple[str, ...]:
    """The sequence dims of the program's blocks() loops (a grid sized by the longest sequence along
    each); traced once."""
    if kernel not in _GRIDS:
        program = kernel.trace(packed_binding(kernel, args, labels, sequences))
        grids = {op.dim for op in program.walk() if isinstance(op, Loop) and op.kind == "blocks"}
        _GRIDS[kernel] = tuple(sorted(grids))
    return _GRIDS[kernel]


def grid_length(cu_seqlens: torch.Tensor, longest: int | None = None) -> int:
    """The longest sequence's length (``longest`` where given, else read from the offsets: a host
    sync) rounded up to a power of two (at least 64): what a grid program's launch spans (its CTAs
    past a shorter sequence's end return at once), one compiled launch for batches of similar lengths."""
    if longest is None:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        host_read()
    return max(64, 1 << max(0, longest - 1).bit_length())


def fake_varlen(kernel: Kernel, args: dict[str, Any], labels: dict[str, str] | None,
                final_states: tuple[str, ...] | None, cu_seqlens: torch.Tensor | Packed) -> dict[str, torch.Tensor]:
    """What ``run_varlen`` returns, as empty tensors (torch.compile's fake tensors)."""
    device = check_devices({k: v for k, v in args.items() if isinstance(v, torch.Tensor)}, labels or {})
    binding = packed_binding(kernel, args, labels, sequence_count(cu_seqlens))
    return {name: torch.empty(shape, dtype=dtype, device=device)
            for name, shape, dtype in output_specs(binding, args, final_states)}


def run_varlen(kernel: Kernel, args: dict[str, Any], labels: dict[str, str] | None,
               final_states: tuple[str, ...] | None, cu_seqlens: torch.Tensor | Packed) -> dict[str, torch.Tensor]:
    """``kernel`` on the packed sequences ``cu_seqlens`` delimits (checked by the caller): outputs as
    ``args``' packed row, states ``[N, H, ...]``. CPU tensors: the interpreter on each sequence;
    CUDA tensors: the varlen kernel, one launch."""
    packed = _packed(cu_seqlens)
    tokens = [v.shape[1] for n, v in args.items() if isinstance(v, torch.Tensor) and n in kernel.specs
              and kernel.specs[n].kind in ("seq", "group_seq")]
    sequences = sequence_count(packed)
    if packed.offsets["T"].device.type != "cuda" or 0 in tokens:  # no token at all: nothing for a kernel to tile
        packed_binding(kernel, args, labels, sequences)  # the states' rows checked
        results = [run_kernel(kernel, per_sequence(kernel, args, packed, n), labels, final_states)
                   for n in range(sequences)]
        return join_sequences(kernel, results)
    longest = {dim: grid_length(packed.offsets[dim], packed.longest.get(dim))
               for dim in _grid_dims(kernel, args, labels, sequences)}
    offsets = {packed_offsets(dim): t for dim, t in packed.offsets.items()}
    signature = call_signature(kernel, {**args, **offsets}, final_states, "varlen", tuple(longest.items()))
    prepared = recall(signature)
    if prepared is None:
        prepared = _prepare(kernel, args, labels, final_states, sequences, longest)
        if signature is not None:
            remember(signature, prepared)
    return prepared({**args, **offsets})


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """One varlen call signature's launch: the outputs to allocate and the prepared kernel."""

    outputs: tuple[tuple[str, tuple[int, ...], torch.dtype, None], ...]
    launch: launches.Launch
    device: torch.device
    poison: bool

    def __call__(self, args: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = new_outputs(self.outputs, args, self.device, self.poison)
        with torch.cuda.device(self.device):
            self.launch(args, outputs)
        return outputs


def _prepare(kernel: Kernel, args: dict[str, Any], labels: dict[str, str] | None,
             final_states: tuple[str, ...] | None, sequences: int, longest: dict[str, int]) -> _Prepared:
    device = check_devices({k: v for k, v in args.items() if isinstance(v, torch.Tensor)}, labels or {})
    binding = packed_binding(kernel, args, labels, sequences, longest)
    check_hopper_dims(binding, labels or {})
    arch = device_arch(device)
    extra = kernel.consts_for(arch, _one_row(kernel, args, labels, sequences))
    if extra:
        args = {**args, **extra}
        binding = packed_binding(kernel, args, labels, sequences, longest)
    schedule = launch_schedule(kernel, binding, device.index, arch)
    launch = launches.prepare_launch(kernel, binding, args, schedule, arch, device.index, varlen=True)
    outputs = tuple((*spec, None) for spec in output_specs(binding, args, final_states))
    return _Prepared(outputs, launch, device, bool(read("TILEMIX_POISON")))


def sequence_index(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each token's sequence, int64 ``[tokens]`` (no host sync: the count is given)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths,
                                   output_size=tokens)


def varlen_gradients(kernel: Kernel, args: dict[str, Any], output_grads: dict[str, torch.Tensor],
                     wrt: list[str], cu_seqlens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``derived_gradients`` of a packed batch: each sequence's on its own slice, packed back (a
    per-head input's summed over the sequences, as over a batch). On CUDA tensors that is one
    backward per sequence (and a read of the offsets): the derived backward's per-chunk
    checkpoints (``ChunkState``) have no packed-batch kernel yet."""
    results = []
    for n in range(sequence_count(cu_seqlens)):
        grads = per_sequence(kernel, output_grads, cu_seqlens, n)
        results.append(derived_gradients(kernel, per_sequence(kernel, args, cu_seqlens, n), grads, wrt))
    packed = join_sequences(kernel, [{n: r[n] for n in wrt if kernel.specs[n].kind != "head"} for r in results])
    for name in wrt:
        if kernel.specs[name].kind == "head":
            total = torch.stack([r[name] for r in results]).sum(0, dtype=torch.float64)
            packed[name] = total.to(results[0][name].dtype)
    return packed
