"""F2, the forward's second pass: merged 7x7 depthwise conv, projector, GELU, dropout, up projection
and residual.

Reads h1 (M, d) with its 3-pixel halo (from L2), the merged conv kernel K (50, d) that F1 wrote and
x (M, C); writes out = x + a' W2^T + b2 (M, C), a' = dropout(gelu(h3)), h3 = h2 + h2 Wp^T + bp,
h2 = conv7(h1, K) + bias_K, and h2 (M, d) itself for the backward: saving it costs 2d bytes a token
each way and spares B1 a conv pass (B1 154 -> 71 us on an H100 at 32x56x56x128). h3 and a' stay in
registers, rounded to the compute dtype where the reference's modules round them.
Budget per token (2-byte x): reads 2d + 2C, writes 2C + 2d bytes; 98d FLOP of conv on CUDA cores,
2d^2 + 2Cd on tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.utils import cdiv
from .common import (Kernel, block_d, conv7_tile, dropout_args, gelu, keep_tile, pixel_reciprocals, precision,
                     rows_and_stages, tile_coords)

# Pixels a program (consecutive in the row-major grid), output channels a step of the up projection,
# and warps.
TILE = 32
BLOCK_N = 64
WARPS = 4


@triton.jit
def project(h2, wp_ptr, bp_ptr, D, ch, cmask, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """h3 = h2 + h2 Wp^T + bp of one (rows, BLOCK_D) tile in h2's dtype, accumulated in ACC."""
    # Wp^T as an (in, out) tile: element [i, o] = Wp[o, i].
    wpt = tl.load(wp_ptr + ch[None, :] * D + ch[:, None], mask=cmask[:, None] & cmask[None, :], other=0.0)
    h3 = tl.dot(h2, wpt.to(h2.dtype), input_precision=PRECISION, out_dtype=ACC)
    h3 = h3 + h2.to(ACC) + tl.load(bp_ptr + ch, mask=cmask, other=0.0).to(ACC)[None, :]
    return h3.to(h2.dtype)


@triton.jit(do_not_specialize=["H", "W", "M"])
def conv_up_kernel(h1_ptr, k_ptr, wp_ptr, bp_ptr, w2_ptr, b2_ptr, x_ptr, out_ptr, h2_ptr, seed_ptr, p, scale,
                   scale_lo, H, W, M, C, D, HAS_DROPOUT: tl.constexpr, BY4: tl.constexpr, FP64: tl.constexpr,
                   TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """h1 (M, D) in the compute dtype, x (M, C) -> out (M, C) in x's dtype promoted with h1's, and
    h2 (M, D) in h1's."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    CDT: tl.constexpr = h1_ptr.dtype.element_ty
    m_hw, m_w = pixel_reciprocals(H, W)
    pix, i, j, inside = tile_coords(tl.program_id(0), H, W, M, m_hw, m_w, TILE)
    ch = tl.arange(0, BLOCK_D)
    cmask = ch < D
    h2 = conv7_tile(h1_ptr, k_ptr, pix, i, j, inside, H, W, D, ch, cmask, TILE, BLOCK_D, False, ACC)
    h2 = (h2 + tl.load(k_ptr + 49 * D + ch, mask=cmask, other=0.0).to(ACC)[None, :]).to(CDT)
    tl.store(h2_ptr + pix[:, None] * D + ch[None, :], h2, mask=inside[:, None] & cmask[None, :])
    h3 = project(h2, wp_ptr, bp_ptr, D, ch, cmask, PRECISION, ACC)
    a = gelu(h3.to(ACC))
    if HAS_DROPOUT:
        a = tl.where(keep_tile(seed_ptr, pix, D, p, BY4, BLOCK_D), a * scale + a * scale_lo, 0.0)
    a = a.to(CDT)
    for n0 in range(0, C, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < C
        # W2^T as a (d, out) tile: element [k, n] = W2[n, k].
        w2t = tl.load(w2_ptr + n[None, :] * D + ch[:, None], mask=cmask[:, None] & nmask[None, :], other=0.0)
        up = tl.dot(a, w2t.to(CDT), input_precision=PRECISION, out_dtype=ACC)
        up = (up + tl.load(b2_ptr + n, mask=nmask, other=0.0).to(ACC)[None, :]).to(CDT)
        xo = pix[:, None] * C + n[None, :]
        xmask = inside[:, None] & nmask[None, :]
        x = tl.load(x_ptr + xo, mask=xmask, other=0.0).to(ACC)
        tl.store(out_ptr + xo, (x + up.to(ACC)).to(out_ptr.dtype.element_ty), mask=xmask)


_conv_up = Kernel(conv_up_kernel)


def meta(x_dtype: torch.dtype, cdt: torch.dtype, d: int) -> dict:
    """The kernel's tile and launch options for these dtypes and bottleneck width."""
    tile, options = rows_and_stages(TILE, x_dtype, cdt)
    return dict(TILE=tile, BLOCK_D=block_d(d), BY4=d % 4 == 0, BLOCK_N=BLOCK_N, PRECISION=precision(cdt),
                num_warps=WARPS, **options)


def conv_up(h1, x, K, Wp, bp, W2, b2, seed, p: float, H: int, W: int):
    """``(out, h2)``: the adapter's output (M, C) and the conv's output (M, d), from h1 (M, d), the
    merged conv kernel K (50, d) and the tokens x (M, C)."""
    M, d = h1.shape
    C = x.shape[1]
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, h1.dtype))
    h2 = torch.empty_like(h1)
    options = meta(x.dtype, h1.dtype, d)
    _conv_up[(cdiv(M, options["TILE"]),)](
        h1, K, Wp, bp, W2, b2, x, out, h2, seed, *dropout_args(p), H, W, M, C, d,
        HAS_DROPOUT=p > 0, FP64=h1.dtype == torch.float64, **options)
    return out, h2
