"""B1, the backward's first pass: from the upstream gradient to the conv's output gradient.

Reads h2, which F2 saved, and recomputes h3 and a' from it as F2 does; da' = g W2; dh3 = da' * m * gelu'(h3);
dh2 = dh3 + dh3 Wp. Writes dh2 and a' (M, d) in the compute dtype (a' for dW2 in B3), and per
program one partial row of dWp = dh3^T h2 and dbp = sum dh3, summed in registers over its tiles.
Budget per token (2-byte g): reads 2C + 2d, writes 4d bytes; 4d^2 + 2Cd FLOP on tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.utils import cdiv
from .common import Kernel, block_d, dropout_args, gelu, gelu_grad, keep_tile, precision, rows_and_stages
from .conv_up import project

TILE = 64
BLOCK_N = 64
WARPS = 4
PROGRAMS_PER_SM = 2  # each program writes a (d*d + d) partial row that B4 sums


@triton.jit(do_not_specialize=["M", "n_tiles", "partial_off"])
def tail_bwd_kernel(h2_ptr, wp_ptr, bp_ptr, w2_ptr, g_ptr,
                    dh2_ptr, a_ptr, partial_ptr, partial_off, seed_ptr, p, scale, scale_lo, M, C, D, n_tiles,
                    HAS_DROPOUT: tl.constexpr, BY4: tl.constexpr, FP64: tl.constexpr, TILE: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """h2 (M, D) and g (M, C) -> dh2 and a' (M, D) in h2's dtype; partial row ``program_id`` of
    (programs, D*D + D) in ACC, from element ``partial_off`` of ``partial``: dWp as [o, i] then dbp."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    CDT: tl.constexpr = h2_ptr.dtype.element_ty
    pid = tl.program_id(0)
    ch = tl.arange(0, BLOCK_D)
    cmask = ch < D
    # Wp as an (out, in) tile: element [o, i] = Wp[o, i].
    wp = tl.load(wp_ptr + ch[:, None] * D + ch[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0).to(CDT)
    dwp = tl.zeros([BLOCK_D, BLOCK_D], dtype=ACC)
    dbp = tl.zeros([BLOCK_D], dtype=ACC)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        pix = tl.cast(tile, tl.int64) * TILE + tl.arange(0, TILE)
        inside = pix < M
        offs = pix[:, None] * D + ch[None, :]
        mask = inside[:, None] & cmask[None, :]
        h2 = tl.load(h2_ptr + offs, mask=mask, other=0.0)
        h3 = project(h2, wp_ptr, bp_ptr, D, ch, cmask, PRECISION, ACC)
        h = h3.to(ACC)
        da = tl.zeros([TILE, BLOCK_D], dtype=ACC)
        for n0 in range(0, C, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < C
            g = tl.load(g_ptr + pix[:, None] * C + n[None, :], mask=inside[:, None] & nmask[None, :], other=0.0)
            w2 = tl.load(w2_ptr + n[:, None] * D + ch[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)
            da += tl.dot(g.to(CDT), w2.to(CDT), input_precision=PRECISION, out_dtype=ACC)
        # a' and the mask after the products, so that neither is held across them
        a = gelu(h)
        dh3 = da.to(CDT).to(ACC) * gelu_grad(h)
        if HAS_DROPOUT:
            kept = keep_tile(seed_ptr, pix, D, p, BY4, BLOCK_D)
            a = tl.where(kept, a * scale + a * scale_lo, 0.0)
            dh3 = tl.where(kept, dh3 * scale + dh3 * scale_lo, 0.0)
        tl.store(a_ptr + offs, a.to(CDT), mask=mask)
        dh3 = tl.where(mask, dh3, 0.0).to(CDT)
        dh2 = tl.dot(dh3, wp, input_precision=PRECISION, out_dtype=ACC) + dh3.to(ACC)
        tl.store(dh2_ptr + offs, dh2.to(CDT), mask=mask)
        dwp += tl.dot(tl.trans(dh3), h2, input_precision=PRECISION, out_dtype=ACC)
        dbp += tl.sum(dh3.to(ACC), axis=0)
    row = partial_ptr + partial_off + pid.to(tl.int64) * (D * D + D)
    tl.store(row + ch[:, None] * D + ch[None, :], dwp, mask=cmask[:, None] & cmask[None, :])
    tl.store(row + D * D + ch, dbp, mask=cmask)


_tail_bwd = Kernel(tail_bwd_kernel)


def meta(g_dtype: torch.dtype, cdt: torch.dtype, d: int) -> dict:
    """The kernel's tile and launch options for these dtypes and bottleneck width."""
    tile, options = rows_and_stages(TILE, g_dtype, cdt)
    return dict(TILE=tile, BLOCK_D=block_d(d), BY4=d % 4 == 0, BLOCK_N=BLOCK_N, PRECISION=precision(cdt),
                num_warps=WARPS, **options)


def tail_bwd(g, h2, Wp, bp, W2, seed, p: float, partial, offset: int, programs: int):
    """``(dh2, a')`` (M, d); writes ``programs`` rows of d*d + d partial sums of dWp and dbp into the
    flat ``partial`` from element ``offset`` (offsets into one buffer, not views: the compiled graph
    sees each kernel write the buffer that B4 reads)."""
    M, d = h2.shape
    C = g.shape[1]
    dh2 = torch.empty_like(h2)
    a = torch.empty_like(h2)
    options = meta(g.dtype, h2.dtype, d)
    _tail_bwd[(programs,)](
        h2, Wp, bp, W2, g, dh2, a, partial, offset, seed, *dropout_args(p), M, C, d,
        cdiv(M, options["TILE"]), HAS_DROPOUT=p > 0, FP64=h2.dtype == torch.float64, **options)
    return dh2, a
