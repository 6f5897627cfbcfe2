"""The tile programs of ``long_conv``: a causal convolution of length ``L = 64·M`` as a length
``N = 2L`` FFT (the zero padding makes the circular convolution causal), built from DFT tiles.

Four-step (Cooley–Tukey) split of the ``N = 64 · 2M`` transform: sample ``n = 64·n1 + n2`` (``n1``
the 64-sample block, ``n2`` the row within it), frequency ``k = k1 + 2M·k2``.

1. ``long_conv_cols``: per row ``n2`` and channel, the length-``2M`` DFT over the blocks ``n1 < M``
   (the padding is zero). It splits the frequencies ``k1`` into even ``2m`` and odd ``2m + 1``, each
   ``M`` long, so the program reads and writes sequences of ``M`` samples. The sequence is ``n1``;
   a head is one ``(n2, 64 channels)`` pair: ``[B, L, C]`` seen as ``[B, M, C, 64]`` (``C`` heads:
   64 rows times ``C/64`` channel groups).
2. ``long_conv_rows``: per ``k1``, the twiddle ``W_N^{n2·k1}``, the 64-point DFT over ``n2`` (a
   64 x 64 tile matmul), the product with a spectrum, the inverse 64-point DFT and twiddle. The
   sequence is ``64·m + n2`` of ``[B, L, C/64, 64]``: step 1's memory, no transpose between them.
   ``long_conv_spectrum_rows`` stops after the forward DFT: the spectrum of a kernel (or of ``u``).
   Called once for the even and once for the odd ``k1`` (``parity``): half the live tiles.
3. ``long_conv_cols_inverse``: the inverse of 1, back to the samples ``n1 < M`` (the causal half
   of the circular convolution), its real part; ``long_conv_cols_inverse_pair`` both parts.

Two real signals travel as one complex signal ``x + i·x_im`` (``x_im`` given to step 1): the
filter is real, so convolving ``x + i·x_im`` convolves each, and step 3's
``long_conv_cols_inverse_pair`` returns ``x``'s convolution as the real part, ``x_im``'s as the
imaginary part. Every intermediate then carries two signals: per signal, half the bytes and half
step 2's work of a real signal sent alone.

Each DFT is unitary (scaled by the root of its length); with the kernel's unitary spectrum ``Ĥ``
(``long_conv_spectrum_rows``), ``y = √N · IDFT_u(DFT_u(u) · Ĥ)``, the ``√N`` applied by step 2.
Complex values travel as real and imaginary tiles; the DFT tiles are built in the programs from
positions (``cos``/``sin`` of their phases)."""

from __future__ import annotations

import math

from tilemix.tiles import (
    Const,
    Out,
    Scalar,
    Seq,
    blocks,
    chunks,
    colsum,
    cos,
    iota,
    kernel,
    position,
    sin,
    where,
    zeros,
)

__all__ = ["long_conv_cols", "long_conv_rows", "long_conv_cols_inverse", "long_conv_cols_inverse_pair",
           "long_conv_spectrum_rows", "ROWS"]

ROWS = 64  # the samples a 64-point DFT tile transforms (step 2), and the chunk of steps 1 and 3
ROW_TURN = 2 * math.pi / ROWS  # the phase step of the 64-point DFT
# halvings in _mod: the products it reduces are below period · 64 or below 8192, so below period · 2^13
# at any length
MOD_STEPS = 13


def _mod(x, period, steps=MOD_STEPS):
    """``x mod period`` for integer-valued ``x`` in ``[0, period · 2^steps)``, exactly: subtract
    ``period · 2^j`` where it fits, ``j`` from high to low (fp32 holds these integers exactly)."""
    for j in reversed(range(steps)):
        step = period * float(2 ** j)
        x = where(x >= step, x - step, x)
    return x


def _wrap(x, period):
    """``x mod period`` for ``x`` in ``[0, 2 · period)``."""
    return where(x >= period, x - period, x)


def _block_start(i):
    """The first position of block ``i``, a ``1 x 1`` tile (exact: a sum of equal integers)."""
    return colsum(position(i) - iota(ROWS)) * (1.0 / ROWS)


def _block_dft(acc_er, acc_ei, acc_or, acc_oi, even, odd, xc, xc_im):
    """The accumulators of ``long_conv_cols`` plus one chunk's terms of ``xc + i·xc_im`` (``xc_im``
    None: a real chunk), the DFT tiles' phases given: ``(c - i·s)(x + i·x_im)`` per parity."""
    ce, se, co, so = cos(even), sin(even), cos(odd), sin(odd)
    if xc_im is None:
        return acc_er + ce @ xc, acc_ei - se @ xc, acc_or + co @ xc, acc_oi - so @ xc
    return (acc_er + ce @ xc + se @ xc_im, acc_ei + ce @ xc_im - se @ xc,
            acc_or + co @ xc + so @ xc_im, acc_oi + co @ xc_im - so @ xc)


def _inverse_block_dft(even, odd, er, ei, odd_r, odd_i, imaginary):
    """One chunk's terms of step 3, ``Σ_k (er + i·ei)(c + i·s)`` over both parities, the DFT tiles'
    phases given: the real part, and the imaginary part when ``imaginary`` (else None)."""
    ce, se, co, so = cos(even), sin(even), cos(odd), sin(odd)
    re = ce @ er - se @ ei + co @ odd_r - so @ odd_i
    return re, (ce @ ei + se @ er + co @ odd_i + so @ odd_r) if imaginary else None


def _chunk(x, gate, c):
    """Chunk ``c`` of ``x`` (times ``gate``'s when given); None where ``x`` is."""
    if x is None:
        return None
    return x[c] if gate is None else x[c] * gate[c]


@kernel
def long_conv_cols(x: Seq["C"], period: Scalar, turn: Scalar, scale: Scalar, er: Out[Seq["C"]], ei: Out[Seq["C"]],
                   odd_r: Out[Seq["C"]], odd_i: Out[Seq["C"]], gate: Seq["C"] = None, x_im: Seq["C"] = None,
                   gate_im: Seq["C"] = None, exact: Const = False):
    """Step 1 over ``M`` blocks (``period = 2M``): ``e[m] = Σ_n1 x[n1] W^{2m·n1}`` and ``odd[m] =
    Σ_n1 x[n1] W^{(2m+1)·n1}`` with ``W = exp(-i·turn)``, ``turn = 2π / period``, times ``scale``;
    ``x ⊙ gate`` when given (H3's ``k ⊙ v``); ``x`` the complex signal ``x + i·x_im`` when ``x_im``
    is given (a second real signal, gated by ``gate_im``).

    The phase ``k·n mod period`` of frequency ``k = k0 + kr`` (``k0`` the block's first, ``kr`` the
    row's offset) and sample ``n = n0 + nc`` is kept in four exact parts, ``k0·n0`` and ``kr·n0``
    carried from chunk to chunk (each step adds ``64·k0`` or ``64·kr``, reduced), ``k0·nc`` per block,
    and the tile ``kr·nc`` (below 8192): phases stay small, so fp32 ``sin``/``cos`` stay accurate at
    any length, when ``exact``. Else the phase is the plain product ``k·n``: off by up to 1e-4 at
    L = 16384, below a 16-bit operand's rounding and free of the carried parts' registers."""
    if not exact:
        _cols_plain(x, turn, scale, er, ei, odd_r, odd_i, gate, x_im, gate_im)
        return
    for i in blocks(ROWS):
        cols = iota(1, ROWS, axis=1)
        k0, even_kr, odd_kr = _block_start(i) * 2.0, iota(ROWS) * 2.0, iota(ROWS) * 2.0 + 1.0
        k0_nc = _mod(k0 * cols, period)
        k0_step, even_step, odd_step = (_mod(k * float(ROWS), period) for k in (k0, even_kr, odd_kr))
        k0_n0, even_n0, odd_n0 = zeros(1, 1), zeros(ROWS, 1), zeros(ROWS, 1)
        acc_er, acc_ei, acc_or, acc_oi = (zeros(ROWS, x.cols) for _ in range(4))
        for c in chunks(ROWS):
            even = (k0_n0 + k0_nc + even_n0 + even_kr * cols) * turn
            odd = (k0_n0 + k0_nc + odd_n0 + odd_kr * cols) * turn
            acc_er, acc_ei, acc_or, acc_oi = _block_dft(acc_er, acc_ei, acc_or, acc_oi, even, odd,
                                                        _chunk(x, gate, c), _chunk(x_im, gate_im, c))
            k0_n0 = _wrap(k0_n0 + k0_step, period)
            even_n0, odd_n0 = _wrap(even_n0 + even_step, period), _wrap(odd_n0 + odd_step, period)
        er[i], ei[i], odd_r[i], odd_i[i] = acc_er * scale, acc_ei * scale, acc_or * scale, acc_oi * scale


@kernel
def long_conv_cols_inverse(er: Seq["C"], ei: Seq["C"], odd_r: Seq["C"], odd_i: Seq["C"], period: Scalar,
                           turn: Scalar, scale: Scalar, y: Out[Seq["C"]], gate: Seq["C"] = None, exact: Const = False):
    """Step 3, the inverse of ``long_conv_cols``: ``y[n1] = Re Σ_m e[m] W^{-2m·n1} + odd[m]
    W^{-(2m+1)·n1}`` times ``scale`` (and ``gate``, H3's ``q``, when given); phases in exact parts
    as there when ``exact``, the frequencies ``k = k0 + kc`` now the chunk's (``k0`` advancing by 128).
    The real part only: a sum of pairs' correlations (the filter's gradient) has no use for the rest."""
    _inverse(er, ei, odd_r, odd_i, period, turn, scale, exact, y, gate)


@kernel
def long_conv_cols_inverse_pair(er: Seq["C"], ei: Seq["C"], odd_r: Seq["C"], odd_i: Seq["C"], period: Scalar,
                                turn: Scalar, scale: Scalar, y: Out[Seq["C"]], y_im: Out[Seq["C"]],
                                gate: Seq["C"] = None, gate_im: Seq["C"] = None, exact: Const = False):
    """``long_conv_cols_inverse`` of a pair of real signals sent as one (``long_conv_cols``'s
    ``x_im``): the first in ``y`` (times ``gate``), the second, the imaginary part, in ``y_im``
    (times ``gate_im``)."""
    _inverse(er, ei, odd_r, odd_i, period, turn, scale, exact, y, gate, y_im, gate_im)


def _inverse(er, ei, odd_r, odd_i, period, turn, scale, exact, y, gate, y_im=None, gate_im=None):
    """Step 3 into ``y`` (the real part) and, when given, ``y_im`` (the imaginary part), each times
    its gate when given: the body of both inverse programs, its phases exact or plain (``exact``)."""
    imaginary = y_im is not None
    for i in blocks(ROWS):
        acc_re, acc_im = zeros(ROWS, er.cols), (zeros(ROWS, er.cols) if imaginary else None)
        if exact:
            rows = iota(ROWS)
            n0, even_kc, odd_kc = _block_start(i), iota(1, ROWS, axis=1) * 2.0, iota(1, ROWS, axis=1) * 2.0 + 1.0
            even_n0, odd_n0 = _mod(n0 * even_kc, period), _mod(n0 * odd_kc, period)
            n0_step, rows_step = _mod(n0 * float(2 * ROWS), period), _mod(rows * float(2 * ROWS), period)
            n0_k0, rows_k0 = zeros(1, 1), zeros(ROWS, 1)
            for c in chunks(ROWS):
                even = (n0_k0 + even_n0 + rows_k0 + rows * even_kc) * turn
                odd = (n0_k0 + odd_n0 + rows_k0 + rows * odd_kc) * turn
                acc_re, acc_im = _accumulate(acc_re, acc_im, _inverse_block_dft(even, odd, er[c], ei[c], odd_r[c],
                                                                                  odd_i[c], imaginary))
                n0_k0, rows_k0 = _wrap(n0_k0 + n0_step, period), _wrap(rows_k0 + rows_step, period)
        else:
            for c in chunks(ROWS):
                even = position(i) * (position(c) * 2.0).T * turn
                odd = position(i) * (position(c) * 2.0 + 1.0).T * turn
                acc_re, acc_im = _accumulate(acc_re, acc_im, _inverse_block_dft(even, odd, er[c], ei[c], odd_r[c],
                                                                                  odd_i[c], imaginary))
        y[i] = acc_re * scale if gate is None else acc_re * scale * gate[i]
        if imaginary:
            y_im[i] = acc_im * scale if gate_im is None else acc_im * scale * gate_im[i]


def _accumulate(acc_re, acc_im, terms):
    """The accumulators of ``_inverse`` plus one chunk's ``terms`` (the imaginary ones None where
    only the real part is wanted)."""
    re, im = terms
    return acc_re + re, (None if im is None else acc_im + im)


def _cols_plain(x, turn, scale, er, ei, odd_r, odd_i, gate, x_im, gate_im):
    """``long_conv_cols`` with the plain phases ``k·n · turn``."""
    for i in blocks(ROWS):
        even_k, odd_k = position(i) * 2.0, position(i) * 2.0 + 1.0
        acc_er, acc_ei, acc_or, acc_oi = (zeros(ROWS, x.cols) for _ in range(4))
        for c in chunks(ROWS):
            even, odd = even_k * position(c).T * turn, odd_k * position(c).T * turn
            acc_er, acc_ei, acc_or, acc_oi = _block_dft(acc_er, acc_ei, acc_or, acc_oi, even, odd,
                                                        _chunk(x, gate, c), _chunk(x_im, gate_im, c))
        er[i], ei[i], odd_r[i], odd_i[i] = acc_er * scale, acc_ei * scale, acc_or * scale, acc_oi * scale


def _twiddle(re, im, phase):
    """``(re + i·im) · exp(i·phase)``, ``phase`` a column vector (one per row)."""
    c, s = cos(phase), sin(phase)
    return re * c - im * s, im * c + re * s


def _dft_rows(re, im, sign, exact):
    """The 64-point DFT over the rows of ``re + i·im`` (``sign`` -1: forward, +1: inverse), unitary;
    its phases reduced exactly when ``exact`` (as ``long_conv_cols``)."""
    turns = iota(ROWS) * iota(ROWS).T
    phase = (_mod(turns, float(ROWS), steps=6) if exact else turns) * ROW_TURN  # products < 64 · 2^6
    c, s = cos(phase) * (1.0 / 8.0), sin(phase) * (sign / 8.0)
    return c @ re - s @ im, c @ im + s @ re


def _row_frequencies(i, parity):
    """Each row's ``k1`` in block ``i`` (block ``m`` holds ``k1 = 2m + parity``)."""
    return (position(i) - iota(ROWS)) * (2.0 / ROWS) + parity


@kernel
def long_conv_rows(re: Seq["C"], im: Seq["C"], hr: Seq["C"], hi: Seq["C"], turn: Scalar, parity: Scalar,
                   scale: Scalar, out_r: Out[Seq["C"]], out_i: Out[Seq["C"]], conjugate: Const = False,
                   exact: Const = False):
    """Step 2 for the even (``parity`` 0) or odd (1) ``k1`` of step 1's output (``turn = 2π / N``):
    the forward 64-point DFT, the product with the spectrum ``h`` (conjugated if ``conjugate``: a
    correlation, the convolution's backward), the inverse DFT, times ``scale`` (in fp32 after the
    matmuls: ``√N`` for a unitary ``h`` keeps every stored value and matmul operand at the scale of
    the inputs). Each ``k1`` (a 64-row block) is its own program instance: nothing passes from one
    to the next, so the grid, not a loop, spans the sequence."""
    for i in blocks(ROWS):
        phase = iota(ROWS) * _row_frequencies(i, parity) * turn
        yr, yi = _dft_rows(*_twiddle(re[i], im[i], -phase), -1.0, exact)
        hrc, hic = hr[i], (-hi[i] if conjugate else hi[i])
        zr, zi = _dft_rows(yr * hrc - yi * hic, yr * hic + yi * hrc, 1.0, exact)
        out_r[i], out_i[i] = _twiddle(zr * scale, zi * scale, phase)


@kernel
def long_conv_spectrum_rows(re: Seq["C"], im: Seq["C"], turn: Scalar, parity: Scalar, out_r: Out[Seq["C"]],
                            out_i: Out[Seq["C"]], exact: Const = False):
    """Step 2's forward half: the (unitary) spectrum of the even or odd ``k1``, a program instance
    per ``k1`` as in ``long_conv_rows``."""
    for i in blocks(ROWS):
        phase = iota(ROWS) * _row_frequencies(i, parity) * turn
        yr, yi = _dft_rows(*_twiddle(re[i], im[i], -phase), -1.0, exact)
        out_r[i], out_i[i] = yr, yi
