"""The derived backward (``tilemix.tiles.autodiff``) as GPU kernels on CUDA tensors.

Per call: the states program saves each chunk's entering state ([B, H, NC, r, c] fp32) where a
reverse program reads them, then one program per input gradient runs over the chunks (the other
way, reading those checkpoints, or forward-fused, recomputing the states: ``tiles.autodiff``);
one program per gradient keeps each one's live tiles within the registers (``backward_launches``),
but a per-token or per-head scalar's gradient rides in a program whose adjoints it needs anyway.
A state whose columns are wider than ``SPLIT_WIDTH`` and independent in the forward (``wide_columns``)
is cut into column blocks: inside each CTA (the schedule's split) for a gradient whose own programs
contract none of those columns (``whole_width``), else on the host, each block differentiated alone:
the inputs with that dim take their block's gradient (a ``Seq`` input's programs write their columns
of it in place), the others sum the blocks' shares, which stay in the dtype their programs wrote
until that one combining pass."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tilemix.codegen.compile import MissingTool, compile_cuda, resources
from tilemix.codegen.env import read
from tilemix.codegen.launch import Launch, prepare_launch
from tilemix.codegen.schedule import SPLIT_WIDTH, default_schedule, wide_columns
from tilemix.codegen.specialise import kernel_source
from tilemix.tiles import Kernel, TileError
from tilemix.tiles.autodiff import DerivedKernel, derive_backward, gradient_groups, reduce_gradient
from tilemix.tiles.params import Binding, BoundParam
from tilemix.tiles.types import DType

from .runtime import device_arch

__all__ = ["derived_gradients_cuda", "backward_launches", "column_split", "whole_width"]

_TORCH = {DType.bf16: torch.bfloat16, DType.f16: torch.float16, DType.f32: torch.float32, DType.f64: torch.float64}


def column_split(kernel: Kernel, binding: Binding) -> str | None:
    """The state column dim the backward runs in ``SPLIT_WIDTH``-wide blocks (the first of
    ``wide_columns`` that they cut whole), or None."""
    return next((dim for dim in wide_columns(kernel, binding) if binding.extent(dim) % SPLIT_WIDTH == 0), None)


def backward_launches(kernel: Kernel, binding: Binding, grads_given: Iterable[str], wrt: Iterable[str],
                      transpose: bool = False) -> list[tuple[str | None, DerivedKernel, Binding]]:
    """The programs one column block's backward launches, in order: ``(None, states kernel, its
    binding)`` (where a gradient program reads checkpoints), then ``(input, its gradient's kernel,
    its binding)`` per program, which also writes the gradients riding in it (its kernel's ``wrt``:
    ``tiles.autodiff.gradient_groups``). ``binding``: the forward call's at the block's width;
    ``transpose``: the gradient programs carry their tiles transposed where they can (``whole_width``).

    Gradients that carry no state gradient run forward-fused (``tiles.autodiff``) where that leaves
    no program reading checkpoints, so the states program and its checkpoints go; where one still
    needs them, every gradient reads them: a fused program holds the recurrence's state beside its
    own tiles, a cost worth paying only when it removes the checkpoints' writes and reads."""
    groups = gradient_groups(kernel, binding, sorted(wrt))
    backwards = [derive_backward(kernel, binding, grads_given, group, transpose=transpose) for group in groups]
    if any(b.states is not None for b in backwards):
        backwards = [derive_backward(kernel, binding, grads_given, group, False, transpose) for group in groups]
    first, launches = [], []
    for (name, *_), backward in zip(groups, backwards):
        (states, reverse), (states_binding, reverse_binding) = backward.kernels(kernel, binding), \
            backward.bindings(binding)
        if not first and states is not None:  # one states program: the checkpoints serve every reader
            first.append((None, states, states_binding))
        launches.append((name, reverse, reverse_binding))
    return first + launches


_LAUNCHES: dict[tuple, Launch] = {}  # per program, binding, arch, device and argument layouts


def _run(derived: DerivedKernel, binding: Binding, args: dict[str, Any], outputs: dict[str, torch.Tensor],
         arch: str) -> None:
    """``run_tiles``, with each launch prepared once per signature (as the ops' own calls are): a
    backward runs several programs per column block, and preparing each again costs host time."""
    device = next(iter(outputs.values())).device.index
    layouts = tuple((n, tuple(t.shape), t.stride(), t.dtype) for n, t in args.items() if isinstance(t, torch.Tensor))
    key = (id(derived), binding.key(), arch, device, layouts, tuple((n, t.stride()) for n, t in outputs.items()))
    launch = _LAUNCHES.get(key)
    if launch is None:
        launch = _LAUNCHES[key] = prepare_launch(derived, binding, args, None, arch, device, outputs=outputs)
    launch(args, outputs)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A derived program's output buffer: NaN under ``TILEMIX_POISON``, as ``run_kernel``'s outputs
    (tests, and compute-sanitizer's initcheck, then see any element a kernel leaves unwritten)."""
    if read("TILEMIX_POISON"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _output(p: BoundParam, device: torch.device) -> torch.Tensor:
    return _empty(p.shape, _TORCH[p.dtype], device)


def _turned(t: Any) -> Any:
    """A state passed to or read from a program that declares it transposed."""
    return t.transpose(-1, -2).contiguous() if isinstance(t, torch.Tensor) else t


def _block_gradients(kernel: Kernel, args: dict[str, Any], output_grads: dict[str, torch.Tensor],
                     wrt: list[str], arch: str, device: torch.device, transpose: bool = False,
                     into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Gradients of one column block in the inputs' layouts, each in the dtype its program wrote
    (no fp32 copy: a column block's gradient is read once more, by ``_combine``), but those in
    ``into``, which their programs write there (a column block of the whole gradient, in place);
    ``transpose``: as ``backward_launches``."""
    into = into or {}
    binding = kernel.bind(args)
    saved: dict[str, torch.Tensor] = {}
    grads = {}
    for name, derived, derived_binding in backward_launches(kernel, binding, output_grads, wrt, transpose):
        if name is None:  # the states program: each chunk's entering state
            saved = {p.name: _output(p, device) for p in derived_binding.params if p.spec.kind == "chunk_state"}
            _run(derived, derived_binding, args, saved, arch)
            continue
        seeds = {f"d_{n}": g.to(_TORCH[derived_binding.param(f"d_{n}").dtype]) for n, g in output_grads.items()}
        given = {n: _turned(t) if n in derived.transposed else t for n, t in {**args, **saved, **seeds}.items()}
        out = {f"d_{n}": into[n] if n in into else _output(derived_binding.param(f"d_{n}"), device)
               for n in derived.wrt}
        _run(derived, derived_binding, given, out, arch)
        for n in (n for n in derived.wrt if n not in into):
            grad = _turned(out[f"d_{n}"]) if f"d_{n}" in derived.transposed else out[f"d_{n}"]
            grads[n] = reduce_gradient(binding.param(n), grad, binding.sizes)
    return grads


def _block(kernel: Kernel, name: str, t: Any, dim: str, cols: slice) -> Any:
    """``t`` (parameter ``name``'s, or its gradient's) cut to ``cols`` along ``dim``, if it has it."""
    layout = kernel.specs[name].layout
    if not isinstance(t, torch.Tensor) or dim not in layout:
        return t
    return t[(slice(None),) * layout.index(dim) + (cols,)]


def _fits(derived: DerivedKernel, binding: Binding, arch: str) -> bool:
    """Whether the program lowers for ``arch`` with its default schedule and compiles without local
    memory (a spill costs more than host blocks save)."""
    try:
        source = kernel_source(derived, binding, default_schedule(derived, binding, arch), arch)
    except TileError:  # e.g. the generic target splits no state along its rows, read or not
        return False
    try:
        return resources(compile_cuda(source.source, arch, source.name))["local_memory"] == 0
    except MissingTool:  # nothing to compile with here: the split alone decides
        return True


def whole_width(kernel: Kernel, binding: Binding, grads_given: Iterable[str], wrt: Iterable[str],
                arch: str = "sm_90a") -> dict[str, bool]:
    """The gradients (of ``wrt``) that run once at the forward call's full width (``binding``), each
    with whether its programs carry their tiles transposed: those whose programs, as derived or else
    transposed (``tiles.transpose_carried``), let the schedule cut a state's columns into blocks
    inside each CTA and compile for ``arch`` without local memory. No host blocks, no partial
    gradients, no combine: at D = 128 on sm_90a linear attention's dv as derived, its dq and dk
    transposed (they contract the state's V columns, and then its K rows)."""
    key = (kernel, binding.key(), frozenset(grads_given), tuple(sorted(wrt)), arch)
    if key in _WHOLE:
        return _WHOLE[key]
    whole = {}
    for name in sorted(wrt):
        for transpose in (False, True):
            launches = backward_launches(kernel, binding, grads_given, [name], transpose)
            if all(wide_columns(derived, derived_binding) and _fits(derived, derived_binding, arch)
                   for _, derived, derived_binding in launches):
                whole[name] = transpose
                break
    _WHOLE[key] = whole
    return whole


_WHOLE: dict[tuple, dict[str, bool]] = {}  # whole_width's answers (each lowers and compiles programs)


def derived_gradients_cuda(kernel: Kernel, args: dict[str, Any], output_grads: dict[str, torch.Tensor],
                           wrt: Iterable[str], arch: str | None = None) -> dict[str, torch.Tensor]:
    """``ops.derived.derived_gradients`` on CUDA tensors: the gradients of the inputs named in
    ``wrt`` given ``output_grads`` (by output or state name; missing ones are zero), each in its
    input's shape and dtype. ``arch``: the kernels' (default: the device's, ``device_arch``)."""
    wrt = sorted(wrt)
    device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device
    arch = arch or device_arch(device)
    binding = kernel.bind(args)
    dim = column_split(kernel, binding)
    whole = dict.fromkeys(wrt, False) if dim is None else whole_width(kernel, binding, output_grads, wrt, arch)
    grads = {}
    for transpose in (False, True):
        names = [name for name, turned in whole.items() if turned is transpose]
        if names:
            grads.update(_block_gradients(kernel, args, output_grads, names, arch, device, transpose))
    blocked = [name for name in wrt if name not in whole]
    if blocked:
        width = binding.extent(dim)
        # a Seq input with the dim: each block's program writes its columns of the gradient in place
        placed = {n: _empty(args[n].shape, args[n].dtype, device) for n in blocked
                  if kernel.specs[n].kind == "seq" and dim in kernel.specs[n].layout}
        # a gradient of a result without the dim (a second state, say) seeds one block: every block
        # recomputes that result, and the shares are summed
        shares = [_block_gradients(kernel, {n: _block(kernel, n, a, dim, cols) for n, a in args.items()},
                                   {n: _block(kernel, n, g, dim, cols) for n, g in output_grads.items()
                                    if start == 0 or dim in kernel.specs[n].layout},
                                   blocked, arch, device, into={n: _block(kernel, n, t, dim, cols)
                                                                for n, t in placed.items()})
                  for start, cols in ((s, slice(s, s + SPLIT_WIDTH)) for s in range(0, width, SPLIT_WIDTH))]
        grads.update(placed)
        grads.update({name: _combine(kernel, name, [share[name] for share in shares], dim, args[name])
                      for name in blocked if name not in placed})
    return {name: grads[name].to(args[name].dtype) for name in wrt}


def _combine(kernel: Kernel, name: str, parts: list[torch.Tensor], dim: str, like: torch.Tensor) -> torch.Tensor:
    """The column blocks' gradients of input ``name`` as one gradient in ``like``'s dtype, each part
    read once: an input with the split dim takes its block's columns (a ``GroupSeq``'s: a ``Seq``'s
    programs wrote them in place), the others the blocks' sum (in fp32: two parts in one ``add``,
    which rounds once)."""
    out = torch.empty(like.shape, dtype=like.dtype, device=parts[0].device)
    if dim in kernel.specs[name].layout:
        for cols, part in zip((slice(i * SPLIT_WIDTH, (i + 1) * SPLIT_WIDTH) for i in range(len(parts))), parts):
            _block(kernel, name, out, dim, cols).copy_(part)
        return out
    if len(parts) == 2:  # head dim 128, the usual split: one pass
        return torch.add(*parts, out=out)
    total = parts[0].float()
    for part in parts[1:]:
        total += part
    return out.copy_(total)
