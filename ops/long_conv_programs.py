"""The tile programs of ``long_conv``: a causal convolution of length ``L = 64·M`` as a length
``N = 2L`` FFT (the zero padding makes the circular convolution causal), built from DFT tiles.

Four-step (Cooley–Tukey) split of the ``N = 64 · 2M`` transform: sample ``n = 64·n1 + n2`` (``n1``
the 64-sample block, ``n2`` the row within it), frequency ``k = k1 + 2M·k2``.

1. ``long_conv_cols``: per row ``n2`` and channel, the length-``2M`` DFT over the blocks ``n1 < M``
   (the padding is zero). It splits the frequencies ``k1`` into even ``2m`` and odd ``2m + 1``, each
   ``M`` long, so the program reads and writes sequences of ``M`` samples. The sequence is ``n1``;
   a head is one ``(n2, 64 channels)`` pair: ``[B, L, C]`` seen as ``[B, M, 64·C/64, 64]``.
2. ``long_conv_rows``: per ``k1``, the twiddle ``W_N^{n2·k1}``, the 64-point DFT over ``n2`` (a
   64 x 64 tile matmul), the product with a spectrum, the inverse 64-point DFT and twiddle. The
   sequence is ``64·m + n2`` of ``[B, L, C/64, 64]``: step 1's memory, no transpose between them.
   ``long_conv_spectrum_rows`` stops after the forward DFT: the spectrum of a kernel (or of ``u``).
   Called once for the even and once for the odd ``k1`` (``parity``): half the live tiles.
3. ``long_conv_cols_inverse``: the inverse of 1, back to the samples ``n1 < M`` (the causal half
   of the circular convolution); real, as the convolution of real signals is.

Each DFT is unitary (scaled by the root of its length); with the kernel's unitary spectrum ``Ĥ``
(``long_conv_spectrum_rows``), ``y = √N · IDFT_u(DFT_u(u) · Ĥ)``, the ``√N`` applied by step 2. Complex values travel as
real and imaginary tiles; the DFT tiles are built in the programs from positions (``cos``/``sin``
of their phases, which ``sin``/``cos`` reduce modulo 2π)."""

from __future__ import annotations

import math

from tilemix.tiles import Const, Out, Scalar, Seq, blocks, chunks, cos, iota, kernel, position, sin, zeros

__all__ = ["long_conv_cols", "long_conv_rows", "long_conv_cols_inverse", "long_conv_spectrum_rows", "ROWS"]

ROWS = 64  # the samples a 64-point DFT tile transforms (step 2), and the chunk of steps 1 and 3
ROW_TURN = 2 * math.pi / ROWS  # the phase step of the 64-point DFT


def _outer_phase(rows, cols, turn):
    """``rows · colsᵀ · turn``: the phases of a DFT tile between the positions ``rows`` and ``cols``
    (column vectors)."""
    return rows * cols.T * turn


@kernel
def long_conv_cols(x: Seq["C"], turn: Scalar, scale: Scalar, er: Out[Seq["C"]], ei: Out[Seq["C"]],
                   odd_r: Out[Seq["C"]], odd_i: Out[Seq["C"]], gate: Seq["C"] = None):
    """Step 1 over ``M`` blocks (``turn = π / M``): ``e[m] = Σ_n1 x[n1] W^{2m·n1}`` and ``odd[m] =
    Σ_n1 x[n1] W^{(2m+1)·n1}`` with ``W = exp(-i·turn)``, times ``scale``; ``x ⊙ gate`` when given
    (H3's ``k ⊙ v``)."""
    for i in blocks(ROWS):
        even_k, odd_k = position(i) * 2.0, position(i) * 2.0 + 1.0
        acc_er, acc_ei, acc_or, acc_oi = (zeros(ROWS, x.cols) for _ in range(4))
        for c in chunks(ROWS):
            xc = x[c] if gate is None else x[c] * gate[c]
            even, odd = _outer_phase(even_k, position(c), turn), _outer_phase(odd_k, position(c), turn)
            acc_er, acc_ei = acc_er + cos(even) @ xc, acc_ei - sin(even) @ xc
            acc_or, acc_oi = acc_or + cos(odd) @ xc, acc_oi - sin(odd) @ xc
        er[i], ei[i], odd_r[i], odd_i[i] = acc_er * scale, acc_ei * scale, acc_or * scale, acc_oi * scale


@kernel
def long_conv_cols_inverse(er: Seq["C"], ei: Seq["C"], odd_r: Seq["C"], odd_i: Seq["C"], turn: Scalar,
                           scale: Scalar, y: Out[Seq["C"]], gate: Seq["C"] = None):
    """Step 3, the inverse of ``long_conv_cols``: ``y[n1] = Re Σ_m e[m] W^{-2m·n1} + odd[m]
    W^{-(2m+1)·n1}`` times ``scale`` (and ``gate``, H3's ``q``, when given)."""
    for i in blocks(ROWS):
        acc = zeros(ROWS, er.cols)
        for c in chunks(ROWS):
            even = _outer_phase(position(i), position(c) * 2.0, turn)
            odd = _outer_phase(position(i), position(c) * 2.0 + 1.0, turn)
            acc = acc + cos(even) @ er[c] - sin(even) @ ei[c] + cos(odd) @ odd_r[c] - sin(odd) @ odd_i[c]
        y[i] = acc * scale if gate is None else acc * scale * gate[i]


def _twiddle(re, im, phase):
    """``(re + i·im) · exp(i·phase)``, ``phase`` a column vector (one per row)."""
    c, s = cos(phase), sin(phase)
    return re * c - im * s, im * c + re * s


def _dft_rows(re, im, sign):
    """The 64-point DFT over the rows of ``re + i·im`` (``sign`` -1: forward, +1: inverse), unitary."""
    phase = _outer_phase(iota(ROWS), iota(ROWS), ROW_TURN)
    c, s = cos(phase) * (1.0 / 8.0), sin(phase) * (sign / 8.0)
    return c @ re - s @ im, c @ im + s @ re


def _row_frequencies(c, parity):
    """Each row's ``k1`` in chunk ``c`` (chunk ``m`` holds ``k1 = 2m + parity``)."""
    return (position(c) - iota(ROWS)) * (2.0 / ROWS) + parity


@kernel
def long_conv_rows(re: Seq["C"], im: Seq["C"], hr: Seq["C"], hi: Seq["C"], turn: Scalar, parity: Scalar,
                   scale: Scalar, out_r: Out[Seq["C"]], out_i: Out[Seq["C"]], conjugate: Const = False):
    """Step 2 for the even (``parity`` 0) or odd (1) ``k1`` of step 1's output (``turn = 2π / N``):
    the forward 64-point DFT, the product with the spectrum ``h`` (conjugated if ``conjugate``: a
    correlation, the convolution's backward), the inverse DFT, times ``scale`` (in fp32 after the
    matmuls: ``√N`` for a unitary ``h`` keeps every stored value and matmul operand at the scale of
    the inputs)."""
    for c in chunks(ROWS):
        phase = iota(ROWS) * _row_frequencies(c, parity) * turn
        yr, yi = _dft_rows(*_twiddle(re[c], im[c], -phase), -1.0)
        hrc, hic = hr[c], (-hi[c] if conjugate else hi[c])
        zr, zi = _dft_rows(yr * hrc - yi * hic, yr * hic + yi * hrc, 1.0)
        out_r[c], out_i[c] = _twiddle(zr * scale, zi * scale, phase)


@kernel
def long_conv_spectrum_rows(re: Seq["C"], im: Seq["C"], turn: Scalar, parity: Scalar, out_r: Out[Seq["C"]],
                            out_i: Out[Seq["C"]]):
    """Step 2's forward half: the (unitary) spectrum of the even or odd ``k1``."""
    for c in chunks(ROWS):
        phase = iota(ROWS) * _row_frequencies(c, parity) * turn
        yr, yi = _dft_rows(*_twiddle(re[c], im[c], -phase), -1.0)
        out_r[c], out_i[c] = yr, yi
