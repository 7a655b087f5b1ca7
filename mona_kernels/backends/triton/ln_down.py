"""F1, the forward's first pass: LayerNorm-scaling and the down projection.

Reads x (M, C); writes h1 = y W1^T + b1 (M, d) in the compute dtype and the per-token mean and rstd
(M,) in the accumulation dtype. y = LN(x) * gamma + x * gammax never reaches memory. Seven more
programs merge the three convs into the one (50, d) kernel that F2 and B2 read.
Budget per token (2-byte x): reads 2C, writes 2d + 8 bytes; 2Cd FLOP on tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.utils import cdiv
from .common import WIDE_C, Kernel, block_d, merge_taps, precision, rows_and_stages

# Tokens a program and channels a step: a (128, 64) tile of x and a (128, d) fp32 accumulator.
BLOCK_M = 128
BLOCK_C = 64
WARPS = 4
# Over WIDE_C channels a program takes WIDE_BLOCK_M tokens: at C = 768 a token is six times the work of
# one at C = 128, and at 4x32x32x768 on an H100 F1 took 88 us with 128-token programs (32 programs),
# 42 with 32 tokens and 28.5 with 16.
WIDE_BLOCK_M = 16
WIDE_BLOCK_C = 64
WIDE_WARPS = 4


@triton.jit
def ln_scale_rows(x, mean, rstd, w_ln_ptr, b_ln_ptr, gamma_ptr, gammax_ptr, cols, cmask, ACC: tl.constexpr):
    """``(y, xn)`` for a (rows, channels) tile of x: xn = (x - mean) * rstd and
    y = (xn * w_ln + b_ln) * gamma + x * gammax, in ACC."""
    w = tl.load(w_ln_ptr + cols, mask=cmask, other=0.0).to(ACC)
    b = tl.load(b_ln_ptr + cols, mask=cmask, other=0.0).to(ACC)
    gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(ACC)
    gammax = tl.load(gammax_ptr + cols, mask=cmask, other=0.0).to(ACC)
    xn = (x - mean[:, None]) * rstd[:, None]
    return (xn * w[None, :] + b[None, :]) * gamma[None, :] + x * gammax[None, :], xn


@triton.jit
def _row_program(pid, x_ptr, w_ln_ptr, b_ln_ptr, gamma_ptr, gammax_ptr, w1_ptr, b1_ptr, h1_ptr, mean_ptr, rstd_ptr,
                 M, C, D, eps, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    CDT: tl.constexpr = h1_ptr.dtype.element_ty
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    # Statistics in one pass, shifted by each row's first element so that a large common offset
    # costs no precision in the variance.
    shift = tl.load(x_ptr + rows * C, mask=rmask, other=0.0).to(ACC)
    s1 = tl.zeros([BLOCK_M], dtype=ACC)
    s2 = tl.zeros([BLOCK_M], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC)
        xs = tl.where(mask, x - shift[:, None], 0.0)
        s1 += tl.sum(xs, axis=1)
        s2 += tl.sum(xs * xs, axis=1)
    m1 = s1 / C
    mean = shift + m1
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 / C - m1 * m1, 0.0) + eps)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)

    ch = tl.arange(0, BLOCK_D)
    dmask = ch < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(ACC)
        y, _ = ln_scale_rows(x, mean, rstd, w_ln_ptr, b_ln_ptr, gamma_ptr, gammax_ptr, cols, cmask, ACC)
        # W1^T as a (channels, d) tile: element [c, k] = W1[k, c].
        w1t = tl.load(w1_ptr + ch[None, :] * C + cols[:, None], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.dot(y.to(CDT), w1t.to(CDT), input_precision=PRECISION, out_dtype=ACC)
    h1 = acc + tl.load(b1_ptr + ch, mask=dmask, other=0.0).to(ACC)[None, :]
    tl.store(h1_ptr + rows[:, None] * D + ch[None, :], h1.to(CDT), mask=rmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["M", "n_rows"])
def ln_down_kernel(x_ptr, w_ln_ptr, b_ln_ptr, gamma_ptr, gammax_ptr, w1_ptr, b1_ptr, w3_ptr, b3_ptr, w5_ptr, b5_ptr,
                   w7_ptr, b7_ptr, h1_ptr, mean_ptr, rstd_ptr, k_ptr, M, C, D, eps, n_rows, BLOCK_M: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """x (M, C) any float dtype -> h1 (M, D) in the compute dtype, mean and rstd (M,) in the
    accumulation dtype: programs below ``n_rows`` take BLOCK_M tokens each; the seven after them
    write the merged kernel (50, D) in the accumulation dtype, a tap row each."""
    pid = tl.program_id(0)
    if pid < n_rows:
        _row_program(pid, x_ptr, w_ln_ptr, b_ln_ptr, gamma_ptr, gammax_ptr, w1_ptr, b1_ptr, h1_ptr, mean_ptr,
                     rstd_ptr, M, C, D, eps, BLOCK_M, BLOCK_C, BLOCK_D, PRECISION)
    else:
        ch = tl.arange(0, BLOCK_D)
        merge_taps(pid - n_rows, w3_ptr, b3_ptr, w5_ptr, b5_ptr, w7_ptr, b7_ptr, k_ptr, D, ch, ch < D,
                   mean_ptr.dtype.element_ty)


_ln_down = Kernel(ln_down_kernel)


def meta(x_dtype: torch.dtype, cdt: torch.dtype, d: int, C: int) -> dict:
    """The kernel's block sizes and launch options for these dtypes, channels and bottleneck width. C
    picks one of two compiles: up to WIDE_C channels, or more."""
    wide = C > WIDE_C
    block = WIDE_BLOCK_M if wide else BLOCK_M
    if x_dtype.itemsize == 4 and cdt.itemsize == 2:
        # fp32 tokens under autocast (a timm Swin's residual stream): x is no tl.dot operand here, so
        # its tiles keep their rows; on an H100 at 32x56x56x128, 257 -> 169 us
        block *= 2
    rows, options = rows_and_stages(block, x_dtype, cdt)
    return dict(BLOCK_M=rows, BLOCK_C=WIDE_BLOCK_C if wide else BLOCK_C, BLOCK_D=block_d(d),
                PRECISION=precision(cdt), num_warps=WIDE_WARPS if wide else WARPS, **options)


def ln_down(x, w_ln, b_ln, gamma, gammax, W1, b1, w3, b3, w5, b5, w7, b7, eps: float, cdt: torch.dtype,
            acc: torch.dtype):
    """``(h1, mean, rstd, K)`` for tokens x (M, C): K the merged conv kernel, taps-major (50, d) with
    the bias last."""
    M, C = x.shape
    d = W1.shape[0]
    h1 = x.new_empty((M, d), dtype=cdt)
    mean = x.new_empty((M,), dtype=acc)
    rstd = x.new_empty((M,), dtype=acc)
    K = x.new_empty((50, d), dtype=acc)
    options = meta(x.dtype, cdt, d, C)
    n_rows = cdiv(M, options["BLOCK_M"])
    _ln_down[(n_rows + 7,)](x, w_ln, b_ln, gamma, gammax, W1, b1, w3, b3, w5, b5, w7, b7, h1, mean, rstd, K, M, C, d,
                            eps, n_rows, **options)
    return h1, mean, rstd, K
