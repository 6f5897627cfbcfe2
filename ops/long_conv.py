"""Long convolutions (Hyena, H3, S4's convolution mode): ``long_conv(u, kernel)``, the causal
per-channel convolution ``y_t = Σ_{s≤t} k_s u_{t-s}``, and H3's gated form
``gated_long_conv(q, k, v, kernel) = q ⊙ long_conv(k ⊙ v, kernel)``, its gates fused into the first
and the last program.

Both run as FFTs of length ``2L`` built from DFT tile matmuls (``ops/long_conv_programs.py``):
``u``'s transform, the product with the kernel's spectrum and the inverse transform, the kernel's
spectrum computed by the same programs on each call. The backward is the same machinery with the
conjugated spectrum (a correlation): ``du = corr(dy, kernel)`` and ``dkernel = Σ_b corr(dy_b, u_b)``,
``u``'s own spectrum in the kernel's place. The batch's rows travel in pairs, its two halves as one
complex signal (``ops/long_conv_programs.py``): the kernel's spectrum is a real signal's, computed
once per call. Sequences are zero-padded to a multiple of 64 samples, channels to a multiple of 64
(the programs' tiles) and an odd batch by a zero row where they are not."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .eager import torch_custom_op
from .long_conv_programs import (
    ROWS,
    long_conv_cols,
    long_conv_cols_inverse,
    long_conv_cols_inverse_pair,
    long_conv_rows,
    long_conv_spectrum_rows,
)
from .runtime import check_call, current_target, run_kernel, use_target

__all__ = ["long_conv", "gated_long_conv"]

PARTS = ("er", "ei", "odd_r", "odd_i")  # step 1's outputs: even k1 (re, im), odd k1 (re, im)


def _blocks_view(x: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, L, C]`` as steps 1 and 3 see it: ``M = L/64`` samples; a head per (row, 64 channels).
    None (an absent gate or imaginary part) as None."""
    if x is None:
        return None
    b, length, channels = x.shape
    return x.view(b, length // ROWS, channels, ROWS)


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """``[B, L, C]`` as step 2 sees it: ``L`` samples; a head per 64 channels."""
    b, length, channels = x.shape
    return x.view(b, length, channels // ROWS, ROWS)


def _exact(x: torch.Tensor) -> bool:
    """Whether the block DFTs reduce their phases exactly: in fp32 and fp64 programs, whose bounds
    the plain phases' rounding would exceed at long L (16-bit programs: plain, fewer registers)."""
    return x.dtype in (torch.float32, torch.float64)


def _halves(x: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A batch of an even count of rows as its two halves, the real and imaginary parts of one
    complex signal per row pair (views: nothing is copied); None as None."""
    if x is None:
        return None, None
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _transform(x: torch.Tensor, gate: torch.Tensor | None = None, paired: bool = True) -> list[torch.Tensor]:
    """Step 1 of ``x`` (times ``gate``): its four parts. ``paired``: ``x``'s batch halves as one
    complex signal (an even batch), each part ``[B/2, L, C]``; else ``x`` real, each part ``[B, L, C]``."""
    m = x.shape[1] // ROWS
    (x_re, x_im), (g_re, g_im) = (_halves(x), _halves(gate)) if paired else ((x, None), (gate, None))
    out = run_kernel(long_conv_cols, dict(x=_blocks_view(x_re), x_im=_blocks_view(x_im), gate=_blocks_view(g_re),
                                          gate_im=_blocks_view(g_im), period=2.0 * m, turn=math.pi / m,
                                          scale=(2 * m) ** -0.5, exact=_exact(x)))
    return [out[name].view(x_re.shape) for name in PARTS]


def _spectrum(x: torch.Tensor, gate: torch.Tensor | None = None, paired: bool = True) -> list[torch.Tensor]:
    """The unitary spectrum of ``x`` (times ``gate``), in the four parts step 2 multiplies by
    (``paired`` as in ``_transform``)."""
    parts, turn = _transform(x, gate, paired), math.pi / x.shape[1]
    spectrum = []
    for parity in (0, 1):
        re, im = (_rows_view(t) for t in parts[2 * parity:2 * parity + 2])
        out = run_kernel(long_conv_spectrum_rows, dict(re=re, im=im, turn=turn, parity=float(parity), exact=_exact(x)))
        spectrum += [out["out_r"].view(parts[0].shape), out["out_i"].view(parts[0].shape)]
    return spectrum


def _rows(parts: list[torch.Tensor], spectrum: list[torch.Tensor], conjugate: bool) -> list[torch.Tensor]:
    """Step 2: the transform ``parts`` times ``spectrum`` (a batch of 1 or of the parts'),
    conjugated for a correlation; the parts step 3 takes back in time."""
    shape = parts[0].shape
    n = 2 * shape[1]
    rows = []
    for parity in (0, 1):
        re, im = (_rows_view(t) for t in parts[2 * parity:2 * parity + 2])
        hr, hi = (_rows_view(t.expand(shape)) for t in spectrum[2 * parity:2 * parity + 2])
        out = run_kernel(long_conv_rows, dict(re=re, im=im, hr=hr, hi=hi, turn=2 * math.pi / n, parity=float(parity),
                                              scale=math.sqrt(n), conjugate=conjugate, exact=_exact(re)))
        rows += [_blocks_view(out["out_r"].view(shape)), _blocks_view(out["out_i"].view(shape))]
    return rows


def _inverse_args(rows: list[torch.Tensor]) -> dict:
    """Step 3's arguments but its gates: the parts ``rows``, the phase step and the scale."""
    m = rows[0].shape[1]
    return dict(zip(PARTS, rows), period=2.0 * m, turn=math.pi / m, scale=(2 * m) ** -0.5, exact=_exact(rows[0]))


def _apply(parts: list[torch.Tensor], spectrum: list[torch.Tensor], conjugate: bool,
           gate: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 2 and 3 of a paired transform (``_transform``'s ``parts``): times ``spectrum``,
    conjugated for a correlation, back in time (times ``gate``), the batch whole again ``[B, L, C]``
    (each half written where it belongs: no concatenation)."""
    shape = parts[0].shape
    y = torch.empty((2 * shape[0], *shape[1:]), dtype=parts[0].dtype, device=parts[0].device)
    y_re, y_im = _halves(y)
    g_re, g_im = _halves(gate)
    args = dict(_inverse_args(_rows(parts, spectrum, conjugate)), gate=_blocks_view(g_re), gate_im=_blocks_view(g_im))
    run_kernel(long_conv_cols_inverse_pair, args, into=dict(y=_blocks_view(y_re), y_im=_blocks_view(y_im)))
    return y


def _correlation_sum(parts: list[torch.Tensor], spectrum: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_b corr(a_b, x_b)`` ``[L, C]`` from paired transforms of ``a`` (``parts``) and ``x``
    (``spectrum``): per row pair ``Re corr(a + i·a', x + i·x') = corr(a, x) + corr(a', x')``, the
    real part all that step 3 computes."""
    y = run_kernel(long_conv_cols_inverse, _inverse_args(_rows(parts, spectrum, True)))["y"]
    return y.view(parts[0].shape).sum(0, dtype=torch.float32)


def _padded(x: torch.Tensor, length: int, channels: int, batch: int | None = None) -> torch.Tensor:
    """``x [B, L, C]`` zero-padded to ``[batch, length, channels]`` (``batch`` None: B), itself where
    nothing is missing."""
    missing_b, missing_l, missing_c = (batch or x.shape[0]) - x.shape[0], length - x.shape[1], channels - x.shape[2]
    if missing_b or missing_l or missing_c:
        return F.pad(x, (0, missing_c, 0, missing_l, 0, missing_b))
    return x.contiguous()


def _tiles(n: int) -> int:
    return -(-n // ROWS) * ROWS


def _kernel_in_time(kernel: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``kernel [C, L]`` as a batch of one ``[1, L', C']`` signal padded as ``like``, in its dtype."""
    return _padded(kernel.t().unsqueeze(0).to(like.dtype), like.shape[1], like.shape[2], 1)


def _kernel_spectrum(kernel: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
    """The filters' spectrum, a batch of one (a real signal, not a pair), once per call."""
    return _spectrum(_kernel_in_time(kernel, like), paired=False)


def _padder(b: int, length: int, channels: int):
    """Pads ``[B, L, C]`` tensors (None stays None) to whole tiles and an even batch (row pairs)."""
    return lambda t: None if t is None else _padded(t, _tiles(length), _tiles(channels), b + b % 2)


def _forward(u, kernel, q, v) -> torch.Tensor:
    """``q ⊙ conv(u ⊙ v, kernel)`` (``q``, ``v`` None: ungated)."""
    b, length, channels = u.shape
    if 0 in u.shape:
        return torch.zeros_like(u)
    pad = _padder(b, length, channels)
    u, q, v = pad(u), pad(q), pad(v)
    y = _apply(_transform(u, v), _kernel_spectrum(kernel, u), False, q)
    return y[:b, :length, :channels].contiguous()


def _backward(dy, u, kernel, q, v, needs) -> list[torch.Tensor | None]:
    """The gradients of ``_forward`` wanted by ``needs`` (u, kernel, q, v): ``w = u ⊙ v``,
    ``dw = corr(dy ⊙ q, kernel)``, ``du = dw ⊙ v``, ``dv = dw ⊙ u``, ``dq = dy ⊙ conv(w, kernel)``,
    ``dkernel = Σ_b corr(dy_b ⊙ q_b, w_b)``."""
    b, length, channels = u.shape
    grads = [None] * 4
    if 0 in u.shape:
        return [torch.zeros_like(t) if t is not None and need else None for t, need in zip((u, kernel, q, v), needs)]
    pad = _padder(b, length, channels)
    dy_p, u_p, q_p, v_p = pad(dy), pad(u), pad(q), pad(v)
    crop = lambda t: t[:b, :length, :channels].contiguous()  # noqa: E731
    h = _kernel_spectrum(kernel, u_p) if needs[0] or needs[2] or needs[3] else None
    dy_parts = _transform(dy_p, q_p)
    if needs[0] or needs[3]:
        dw = crop(_apply(dy_parts, h, True))
        grads[0] = dw if v is None else dw * v
        grads[3] = dw * u if needs[3] else None
    if needs[1]:
        grads[1] = _correlation_sum(dy_parts, _spectrum(u_p, v_p))[:length, :channels].t().to(kernel.dtype)
    if needs[2]:
        grads[2] = crop(_apply(_transform(u_p, v_p), h, False, dy_p))
    return grads


def _none_as_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Ops return tensors only: an empty one stands for a gradient nobody asked for."""
    return torch.empty(0, dtype=like.dtype, device=like.device) if t is None else t


@torch_custom_op("tilemix::long_conv", mutates_args=())
def long_conv_op(u: torch.Tensor, kernel: torch.Tensor, q: torch.Tensor | None = None,
                 v: torch.Tensor | None = None) -> torch.Tensor:
    """``q ⊙ conv(u ⊙ v, kernel)``; ``q`` and ``v`` both given or both None."""
    return _forward(u, kernel, q, v)


@long_conv_op.register_fake
def _(u, kernel, q=None, v=None):
    return torch.empty_like(u)


@torch_custom_op("tilemix::long_conv_backward", mutates_args=())
def long_conv_backward_op(dy: torch.Tensor, u: torch.Tensor, kernel: torch.Tensor, q: torch.Tensor | None,
                          v: torch.Tensor | None, needs: list[bool]) -> list[torch.Tensor]:
    """The gradients of ``long_conv_op`` for (u, kernel, q, v), an empty tensor where ``needs`` says
    no."""
    grads = _backward(dy, u, kernel, q, v, needs)
    return [_none_as_empty(g, u) for g in grads]


@long_conv_backward_op.register_fake
def _(dy, u, kernel, q, v, needs):
    likes = (u, kernel, q, v)
    return [torch.empty_like(like) if need and like is not None else torch.empty(0, dtype=u.dtype, device=u.device)
            for like, need in zip(likes, needs)]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.target = current_target()


def _gradients(ctx, dy):
    u, kernel, q, v = ctx.saved_tensors
    given = len(ctx.needs_input_grad)  # q and v left out: two inputs
    needs = [bool(n) for n in ctx.needs_input_grad] + [False] * (4 - given)
    with use_target(ctx.target):  # the backward programs run on the forward's target
        grads = long_conv_backward_op(dy.contiguous(), u, kernel, q, v, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))[:given]


long_conv_op.register_autograd(_gradients, setup_context=_setup)


def _check(u: torch.Tensor, kernel: torch.Tensor, name: str = "u") -> None:
    if u.dim() != 3:
        raise ValueError(f"{name}: expected [B, L, C], got shape {tuple(u.shape)}")
    if not u.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {u.dtype}")
    if u.device.type == "cuda" and u.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: the GPU kernels take bfloat16 or float16, got {u.dtype} (float32 and float64 "
                        "run through the interpreter on CPU tensors)")
    b, length, channels = u.shape
    if kernel.dim() != 2 or tuple(kernel.shape) != (channels, length):
        raise ValueError(f"kernel: expected [C, L] = [{channels}, {length}] (one filter per channel, as long as "
                         f"{name}), got shape {tuple(kernel.shape)}")
    if not kernel.is_floating_point():
        raise TypeError(f"kernel: expected a floating-point tensor, got {kernel.dtype}")
    if kernel.device != u.device:
        raise ValueError(f"kernel is on {kernel.device} but {name} is on {u.device}; all tensors must be on one device")


def long_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The causal convolution of each channel of ``u`` with its filter:
    ``y[b, t, c] = Σ_{s≤t} kernel[c, s] · u[b, t-s, c]`` (Hyena's ``fftconv`` without its bias term).

    u: ``[B, L, C]``; kernel: ``[C, L]``, cast to u's dtype. Returns ``[B, L, C]`` in u's dtype.
    Runs as FFTs of length 2L from DFT tile matmuls, fp32 accumulation, 16-bit values in between
    on a GPU. Differentiable in both (the backward is a correlation by the same programs)."""
    check_call("long_conv", differentiable=True, u=u, kernel=kernel)
    _check(u, kernel)
    return long_conv_op(u, kernel)


def gated_long_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """H3's gated long convolution ``q ⊙ long_conv(k ⊙ v, kernel)``, the gates fused into the
    transforms. q, k, v: ``[B, L, C]``; kernel: ``[C, L]``. Differentiable in all four."""
    check_call("gated_long_conv", differentiable=True, q=q, k=k, v=v, kernel=kernel)
    _check(k, kernel, "k")
    for name, t in (("q", q), ("v", v)):
        if t.shape != k.shape or t.dtype != k.dtype:
            raise ValueError(f"{name}: expected k's shape {tuple(k.shape)} and dtype {k.dtype}, got "
                             f"{tuple(t.shape)} {t.dtype}")
    return long_conv_op(k, kernel, q, v)
