"""B2, the backward's second pass: the conv's input gradient and the LayerNorm-scaling backward.

dh1 = conv7(dh2, K rotated by 180 degrees); dy = dh1 W1; t = dy * gamma * w_ln;
dx = g + dy * gammax + rstd * (t - mean_C(t) - xn * mean_C(t * xn)). Writes dh1 (M, d) in the compute
dtype (for B3's weight gradients) and dx (M, C) in x's dtype. y and dy never reach memory.
Budget per token (2-byte x and g): reads 2d (+halo from L2) + 2C (x) + 2C (g) + 8, writes 2d + 2C
bytes; 98d FLOP of conv on CUDA cores, 4Cd on tensor cores (dy is computed twice, once for the
row statistics and once for dx, instead of being held for C channels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.utils import cdiv
from .common import (WIDE_C, Kernel, block_d, conv7_tile, pixel_reciprocals, precision, rows_and_stages,
                     tile_coords)

TILE = 64
BLOCK_N = 64
WARPS = 4
# Over WIDE_C channels a program takes WIDE_TILE pixels: a pixel's two passes over C are the bulk of
# the work there, and 64-pixel tiles leave SMs idle at small maps, while each tile reads W1 again. On
# an H100, B2 alone at 16 / 32 / 64 pixels: 84.8 / 52.4 / 58.7 us at 2x50x84x512, 46.5 / 51.6 / 58.1
# at 32x14x14x512, 58.2 / 66.8 / 81.9 at 4x32x32x768 (one call); at 32x56x56x128 32 pixels took 200
# us against 155 for 64.
WIDE_TILE = 32
WIDE_BLOCK_N = 64


@triton.jit
def _dy_xn(dh1, w1_ptr, x_ptr, mean, rstd, pix, inside, n, nmask, ch, cmask, C, D, PRECISION: tl.constexpr,
           ACC: tl.constexpr):
    """``(dy, x, xn)`` for output channels ``n`` of a tile: dy = dh1 W1[:, n], and x with its
    normalised value."""
    w1 = tl.load(w1_ptr + ch[:, None] * C + n[None, :], mask=cmask[:, None] & nmask[None, :], other=0.0)
    dy = tl.dot(dh1, w1.to(dh1.dtype), input_precision=PRECISION, out_dtype=ACC)
    x = tl.load(x_ptr + pix[:, None] * C + n[None, :], mask=inside[:, None] & nmask[None, :], other=0.0).to(ACC)
    return dy, x, (x - mean[:, None]) * rstd[:, None]


@triton.jit(do_not_specialize=["H", "W", "M"])
def conv_ln_bwd_kernel(dh2_ptr, k_ptr, w1_ptr, x_ptr, mean_ptr, rstd_ptr, g_ptr,
                       w_ln_ptr, gamma_ptr, gammax_ptr, dh1_ptr, dx_ptr, H, W, M, C, D,
                       TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dh2 (M, D) in the compute dtype, x and g (M, C), mean and rstd (M,) in ACC -> dh1 (M, D) and
    dx (M, C) in x's dtype."""
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    CDT: tl.constexpr = dh2_ptr.dtype.element_ty
    m_hw, m_w = pixel_reciprocals(H, W)
    pix, i, j, inside = tile_coords(tl.program_id(0), H, W, M, m_hw, m_w, TILE)
    ch = tl.arange(0, BLOCK_D)
    cmask = ch < D
    dh1 = conv7_tile(dh2_ptr, k_ptr, pix, i, j, inside, H, W, D, ch, cmask, TILE, BLOCK_D, True, ACC).to(CDT)
    tl.store(dh1_ptr + pix[:, None] * D + ch[None, :], dh1, mask=inside[:, None] & cmask[None, :])
    mean = tl.load(mean_ptr + pix, mask=inside, other=0.0)
    rstd = tl.load(rstd_ptr + pix, mask=inside, other=0.0)
    s1 = tl.zeros([TILE], dtype=ACC)
    s2 = tl.zeros([TILE], dtype=ACC)
    for n0 in range(0, C, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < C
        dy, x, xn = _dy_xn(dh1, w1_ptr, x_ptr, mean, rstd, pix, inside, n, nmask, ch, cmask, C, D, PRECISION, ACC)
        t = dy * (tl.load(gamma_ptr + n, mask=nmask, other=0.0).to(ACC)
                  * tl.load(w_ln_ptr + n, mask=nmask, other=0.0).to(ACC))[None, :]
        s1 += tl.sum(t, axis=1)
        s2 += tl.sum(t * xn, axis=1)
    s1 = s1 / C
    s2 = s2 / C
    for n0 in range(0, C, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < C
        dy, x, xn = _dy_xn(dh1, w1_ptr, x_ptr, mean, rstd, pix, inside, n, nmask, ch, cmask, C, D, PRECISION, ACC)
        gamma = tl.load(gamma_ptr + n, mask=nmask, other=0.0).to(ACC)
        w_ln = tl.load(w_ln_ptr + n, mask=nmask, other=0.0).to(ACC)
        gammax = tl.load(gammax_ptr + n, mask=nmask, other=0.0).to(ACC)
        t = dy * (gamma * w_ln)[None, :]
        offs = pix[:, None] * C + n[None, :]
        mask = inside[:, None] & nmask[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        dx = g + dy * gammax[None, :] + rstd[:, None] * (t - s1[:, None] - xn * s2[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_conv_ln_bwd = Kernel(conv_ln_bwd_kernel)


def meta(x_dtype: torch.dtype, cdt: torch.dtype, d: int, C: int) -> dict:
    """The kernel's tile and launch options for these dtypes, channels and bottleneck width. C picks
    one of two compiles, as in ln_down: up to WIDE_C channels, or more."""
    wide = C > WIDE_C
    tile, options = rows_and_stages(WIDE_TILE if wide else TILE, x_dtype, cdt)
    return dict(TILE=tile, BLOCK_D=block_d(d), BLOCK_N=WIDE_BLOCK_N if wide else BLOCK_N, PRECISION=precision(cdt),
                num_warps=WARPS, **options)


def conv_ln_bwd(dh2, x, mean, rstd, g, K, W1, w_ln, gamma, gammax, H: int, W: int):
    """``(dh1, dx)``, K the merged conv kernel (50, d) of the forward."""
    M, d = dh2.shape
    C = x.shape[1]
    dh1 = torch.empty_like(dh2)
    dx = torch.empty_like(x)
    options = meta(x.dtype, dh2.dtype, d, C)
    _conv_ln_bwd[(cdiv(M, options["TILE"]),)](
        dh2, K, W1, x, mean, rstd, g, w_ln, gamma, gammax, dh1, dx, H, W, M, C, d, **options)
    return dh1, dx
