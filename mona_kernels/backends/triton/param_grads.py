"""B3, the backward's third pass: partial sums of every parameter gradient that B1 does not make.

One launch, two kinds of program:
- channel programs, one per (token split, block of C): dW2 = g^T a', db2 = sum g, and
  P = dh1^T x, Q = dh1^T xn, db1 = sum dh1 with xn recomputed from x, mean and rstd; the sums stay in
  registers across the split, and at its end make dW1 = dh1^T y and the LayerNorm-scaling
  parameters' sums (dgamma = sum dy (xn w_ln + b_ln), dgammax = sum dy x, dw_ln = sum dy gamma xn,
  db_ln = sum dy gamma, dy = dh1 W1), all linear in P, Q and db1;
- tap programs, one per (token split, tap row, block of d): the merged kernel's gradient
  dK[u, v] = sum dh2 * h1 shifted by (u - 3, v - 3), and its bias gradient sum dh2.
Each writes one partial row; B4 sums the rows in a fixed order (deterministic, no atomics).
Budget per token (2-byte tensors): reads 2C (g) + 2C (x) + 4d (a', dh1) + 8 + 4d (dh2, h1) bytes;
6Cd FLOP on tensor cores and 98d on CUDA cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.utils import cdiv
from .common import Kernel, block_d, pixel_reciprocals, precision, rows_and_stages, tile_coords, within

BLOCK_M = 128
WARPS = 4
TAP_TILE = 32  # pixels a tap program adds per step (2-byte activations): seven (32, 64) fp32 accumulators
TAP_BLOCK_D = 64
# Programs of each kind per SM (adapter.partial_rows): each writes one partial row that B4 sums.
CHANNEL_PROGRAMS_PER_SM = 1
TAP_PROGRAMS_PER_SM = 4


def tap_block(d: int) -> int:
    """Channels of d a tap program owns."""
    return min(TAP_BLOCK_D, block_d(d))


def channel_block(d: int) -> int:
    """Channels of C a channel program owns: its two fp32 accumulators hold 2 * BLOCK_D * block."""
    return max(16, min(64, 4096 // block_d(d)))


@triton.jit
def _channel_program(prog, g_ptr, a_ptr, dh1_ptr, x_ptr, mean_ptr, rstd_ptr, w_ln_ptr, b_ln_ptr, gamma_ptr,
                     gammax_ptr, w1_ptr, partial_ptr, M, C, D, tokens, n_cblk, ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    CDT: tl.constexpr = a_ptr.dtype.element_ty
    split = prog // n_cblk
    n = (prog % n_cblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < C
    ch = tl.arange(0, BLOCK_D)
    cmask = ch < D
    # Every gradient of this program but dW2 and db2 is linear in three sums over its tokens:
    # P = dh1^T x, Q = dh1^T xn and db1 = sum dh1. With y = xn * (w_ln gamma) + b_ln gamma + x gammax and
    # dy = dh1 W1: dW1 = dh1^T y = Q (w_ln gamma) + db1 (b_ln gamma) + P gammax, and the column sums
    # sum dy x, sum dy xn, sum dy are the column sums of W1 * P, W1 * Q and W1 * db1. So the token loop
    # runs three tensor-core products and two sums, and no product or reduction over (tokens, C) tiles:
    # on an H100 at 32x56x56x128 the channel programs alone took 95 us this way, 189 with dW1 = dh1^T y,
    # dy = dh1 W1 and four column sums of dy a step.
    p = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    q = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    dw2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    db2 = tl.zeros([BLOCK_N], dtype=ACC)
    db1 = tl.zeros([BLOCK_D], dtype=ACC)
    start = split.to(tl.int64) * tokens
    for m0 in range(0, tokens, BLOCK_M):
        rows = start + m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        xmask = rmask[:, None] & nmask[None, :]
        dmask = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + rows[:, None] * C + n[None, :], mask=xmask, other=0.0)
        a = tl.load(a_ptr + rows[:, None] * D + ch[None, :], mask=dmask, other=0.0)
        dw2 += tl.dot(tl.trans(g.to(CDT)), a, input_precision=PRECISION, out_dtype=ACC)
        db2 += tl.sum(g.to(ACC), axis=0)
        dh1 = tl.load(dh1_ptr + rows[:, None] * D + ch[None, :], mask=dmask, other=0.0)
        db1 += tl.sum(dh1.to(ACC), axis=0)
        x = tl.load(x_ptr + rows[:, None] * C + n[None, :], mask=xmask, other=0.0)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xn = (x.to(ACC) - mean[:, None]) * rstd[:, None]
        p += tl.dot(tl.trans(dh1), x.to(CDT), input_precision=PRECISION, out_dtype=ACC)
        q += tl.dot(tl.trans(dh1), xn.to(CDT), input_precision=PRECISION, out_dtype=ACC)
    w_ln = tl.load(w_ln_ptr + n, mask=nmask, other=0.0).to(ACC)
    b_ln = tl.load(b_ln_ptr + n, mask=nmask, other=0.0).to(ACC)
    gamma = tl.load(gamma_ptr + n, mask=nmask, other=0.0).to(ACC)
    gammax = tl.load(gammax_ptr + n, mask=nmask, other=0.0).to(ACC)
    # W1 rounded to the compute dtype, as the forward's product uses it
    w1 = tl.load(w1_ptr + ch[:, None] * C + n[None, :], mask=cmask[:, None] & nmask[None, :],
                 other=0.0).to(CDT).to(ACC)
    dw1 = q * (w_ln * gamma)[None, :] + db1[:, None] * (b_ln * gamma)[None, :] + p * gammax[None, :]
    sum_dy_xn = tl.sum(w1 * q, axis=0)
    sum_dy = tl.sum(w1 * db1[:, None], axis=0)
    # The row: [dw_ln, db_ln, dgamma, dgammax (C each), dW1 (D, C), db1 (D), dW2 (C, D), db2 (C)].
    row = partial_ptr + split.to(tl.int64) * (4 * C + 2 * D * C + D + C)
    tl.store(row + n, sum_dy_xn * gamma, mask=nmask)
    tl.store(row + C + n, sum_dy * gamma, mask=nmask)
    tl.store(row + 2 * C + n, sum_dy_xn * w_ln + sum_dy * b_ln, mask=nmask)
    tl.store(row + 3 * C + n, tl.sum(w1 * p, axis=0), mask=nmask)
    tl.store(row + 4 * C + ch[:, None] * C + n[None, :], dw1, mask=cmask[:, None] & nmask[None, :])
    if prog % n_cblk == 0:
        tl.store(row + 4 * C + D * C + ch, db1, mask=cmask)
    tail = row + 4 * C + D * C + D
    tl.store(tail + n[:, None] * D + ch[None, :], dw2, mask=nmask[:, None] & cmask[None, :])
    tl.store(tail + C * D + n, db2, mask=nmask)


@triton.jit
def _shifted(dh2, src, j, W, D, row_ok, cmask, V: tl.constexpr, ACC: tl.constexpr):
    """dh2 times the tile's pixels of h1 V - 3 columns over (``src`` points at the tile's own pixels of
    the tap row), zero outside the image."""
    jj = j + (V - 3)
    ok = row_ok & within(jj, W)
    h = tl.load(src + (V - 3) * D, mask=ok[:, None] & cmask[None, :], other=0.0)
    return dh2 * h.to(ACC)


@triton.jit
def tap_program(prog, h1_ptr, dh2_ptr, partial_ptr, H, W, M, D, n_tiles, n_splits, n_dblk, ACC: tl.constexpr,
                TILE: tl.constexpr, BLOCK_D: tl.constexpr):
    split = prog // (7 * n_dblk)
    u = (prog // n_dblk) % 7
    ch = (prog % n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = ch < D
    # One (TILE, BLOCK_D) accumulator a column tap, each fed by a plain 2-D load of the tile shifted by
    # that tap: a [tile, 8 taps, channels] gather compiled to 1416 instructions a step for 128
    # multiply-adds on sm_90, these seven to 496 for 112.
    acc0 = tl.zeros([TILE, BLOCK_D], dtype=ACC)
    acc1 = tl.zeros([TILE, BLOCK_D], dtype=ACC)
    acc2 = tl.zeros([TILE, BLOCK_D], dtype=ACC)
    acc3 = tl.zeros([TILE, BLOCK_D], dtype=ACC)
    acc4 = tl.zeros([TILE, BLOCK_D], dtype=ACC)
    acc5 = tl.zeros([TILE, BLOCK_D], dtype=ACC)
    acc6 = tl.zeros([TILE, BLOCK_D], dtype=ACC)
    bias = tl.zeros([TILE, BLOCK_D], dtype=ACC)
    m_hw, m_w = pixel_reciprocals(H, W)  # once: the loop divides every tile's pixels by H * W and W
    for tile in range(split, n_tiles, n_splits):
        pix, i, j, inside = tile_coords(tile, H, W, M, m_hw, m_w, TILE)
        offs = pix[:, None] * D + ch[None, :]
        dh2 = tl.load(dh2_ptr + offs, mask=inside[:, None] & cmask[None, :], other=0.0).to(ACC)
        ii = i + (u - 3)
        row_ok = inside & within(ii, H)
        src = h1_ptr + offs + (u - 3) * W * D
        acc0 += _shifted(dh2, src, j, W, D, row_ok, cmask, 0, ACC)
        acc1 += _shifted(dh2, src, j, W, D, row_ok, cmask, 1, ACC)
        acc2 += _shifted(dh2, src, j, W, D, row_ok, cmask, 2, ACC)
        acc3 += _shifted(dh2, src, j, W, D, row_ok, cmask, 3, ACC)
        acc4 += _shifted(dh2, src, j, W, D, row_ok, cmask, 4, ACC)
        acc5 += _shifted(dh2, src, j, W, D, row_ok, cmask, 5, ACC)
        acc6 += _shifted(dh2, src, j, W, D, row_ok, cmask, 6, ACC)
        bias += dh2
    # The row: the 49 taps' dK (tap-major, D each), then the bias gradient.
    row = partial_ptr + split.to(tl.int64) * (50 * D)
    taps = row + u * 7 * D + ch
    tl.store(taps, tl.sum(acc0, axis=0), mask=cmask)
    tl.store(taps + D, tl.sum(acc1, axis=0), mask=cmask)
    tl.store(taps + 2 * D, tl.sum(acc2, axis=0), mask=cmask)
    tl.store(taps + 3 * D, tl.sum(acc3, axis=0), mask=cmask)
    tl.store(taps + 4 * D, tl.sum(acc4, axis=0), mask=cmask)
    tl.store(taps + 5 * D, tl.sum(acc5, axis=0), mask=cmask)
    tl.store(taps + 6 * D, tl.sum(acc6, axis=0), mask=cmask)
    if u == 0:
        tl.store(row + 49 * D + ch, tl.sum(bias, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["H", "W", "M", "tokens", "n_tiles", "n_channel", "n_splits", "channel_off",
                             "tap_off"])
def param_grads_kernel(g_ptr, a_ptr, dh1_ptr, x_ptr, mean_ptr, rstd_ptr, w_ln_ptr, b_ln_ptr, gamma_ptr,
                       gammax_ptr, w1_ptr, h1_ptr, dh2_ptr, partial_ptr, channel_off, tap_off, H, W, M, C, D, tokens,
                       n_cblk, n_channel, n_tiles, n_splits, n_dblk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, TAP_TILE: tl.constexpr, TAP_BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Programs below ``n_channel`` are channel programs (rows from element ``channel_off`` of
    ``partial``), the rest tap programs (rows from ``tap_off``); partial sums in ACC, the activations
    in the compute dtype."""
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    prog = tl.program_id(0)
    if prog < n_channel:
        _channel_program(prog, g_ptr, a_ptr, dh1_ptr, x_ptr, mean_ptr, rstd_ptr, w_ln_ptr, b_ln_ptr, gamma_ptr,
                         gammax_ptr, w1_ptr, partial_ptr + channel_off, M, C, D, tokens, n_cblk, ACC, BLOCK_M,
                         BLOCK_N, BLOCK_D,
                         PRECISION)
    else:
        tap_program(prog - n_channel, h1_ptr, dh2_ptr, partial_ptr + tap_off, H, W, M, D, n_tiles, n_splits, n_dblk,
                     ACC, TAP_TILE, TAP_BLOCK_D)


_param_grads = Kernel(param_grads_kernel)


def meta(x_dtype: torch.dtype, cdt: torch.dtype, d: int) -> dict:
    """The kernel's block sizes and launch options for these dtypes and bottleneck width."""
    rows, options = rows_and_stages(BLOCK_M, x_dtype, cdt)
    # Two stages for 2-byte tiles too: Triton's default three give the channel programs' prefetched
    # tiles 166 KB of shared memory on sm_90, one program an SM, which halves the tap programs'
    # occupancy (taps alone 124 -> 180 us at 32x56x56x128 on an H100); two take 99 KB.
    options.setdefault("num_stages", 2)
    # 4- and 8-byte activations take half and a quarter of the pixels, as the other tiles do
    tap_tile = max(4, TAP_TILE * 2 // max(2, cdt.itemsize))
    return dict(BLOCK_M=rows, BLOCK_N=channel_block(d), BLOCK_D=block_d(d), TAP_TILE=tap_tile,
                TAP_BLOCK_D=tap_block(d), PRECISION=precision(cdt), num_warps=WARPS, **options)


def param_grads(g, a, dh1, x, mean, rstd, w_ln, b_ln, gamma, gammax, W1, h1, dh2, H: int, W: int, partial,
                channel_offset: int, splits: int, tap_offset: int, tap_splits: int):
    """Writes into the flat ``partial``: ``splits`` channel rows of 4C + 2dC + d + C from element
    ``channel_offset``, and ``tap_splits`` tap rows of 50d from ``tap_offset``."""
    M, C = x.shape
    d = h1.shape[1]
    options = meta(x.dtype, h1.dtype, d)
    n_cblk = cdiv(C, options["BLOCK_N"])
    tokens = cdiv(cdiv(M, splits), options["BLOCK_M"]) * options["BLOCK_M"]
    n_dblk = cdiv(d, options["TAP_BLOCK_D"])
    n_channel = splits * n_cblk
    _param_grads[(n_channel + tap_splits * 7 * n_dblk,)](
        g, a, dh1, x, mean, rstd, w_ln, b_ln, gamma, gammax, W1, h1, dh2, partial, channel_offset, tap_offset,
        H, W, M, C, d, tokens, n_cblk, n_channel, cdiv(M, options["TAP_TILE"]), tap_splits, n_dblk, **options)
