"""The Triton plan's standalone LN-scaling op, ``y = (xn * w_ln + b_ln) * gamma + x * gammax``, one
pass over each row (the adapter's own kernels fuse it with the down projection instead).

Layout contract: ``x``/``y``/``dy``/``dx`` are row-major (M, C) in the input dtype; the four
parameter vectors have C elements in any float dtype; ``mean``/``rstd`` are (M,) in the
accumulation dtype (float32, or float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.utils import acc_dtype, cdiv, next_pow2, num_workers, tl_acc
from .launcher import Launcher

# Elements one program holds per row block: enough rows to keep every lane busy at small C.
ROW_BLOCK_ELEMS = 4096
# Smaller blocks in backward: it keeps three (rows, C) accumulators live across its loop.
BWD_ROW_BLOCK_ELEMS = 2048
# Backward programs per SM: each writes a (5, C) row of partial sums for the host or epilogue to add.
# Two was the fastest backward + epilogue at every benchmark shape on an H200 (11-30% under four).
BWD_PROGRAMS_PER_SM = 2


@triton.jit(do_not_specialize=["M"])
def _ln_scale_fwd_kernel(x_ptr, w_ptr, b_ptr, gamma_ptr, gammax_ptr, y_ptr, mean_ptr, rstd_ptr,
                         M, C, eps, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    xn = xc * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(ACC)
    gammax = tl.load(gammax_ptr + cols, mask=cmask, other=0.0).to(ACC)
    y = (xn * w[None, :] + b[None, :]) * gamma[None, :] + x * gammax[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit(do_not_specialize=["M"])
def _ln_scale_bwd_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, gamma_ptr, gammax_ptr, mean_ptr, rstd_ptr,
                         dx_ptr, partial_ptr, M, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Writes dx and, per program, partial sums of (dgamma, dgammax, dw_ln, db_ln) into ``partial``
    (4, programs, C); the host sums them in order."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(ACC)
    gammax = tl.load(gammax_ptr + cols, mask=cmask, other=0.0).to(ACC)
    # Column sums stay per-row in registers and are reduced across rows once, after the loop.
    acc_dgammax = tl.zeros([ROWS, BLOCK_C], dtype=ACC)
    acc_dy_xn = tl.zeros([ROWS, BLOCK_C], dtype=ACC)
    acc_dy = tl.zeros([ROWS, BLOCK_C], dtype=ACC)
    for blk in range(pid, tl.cdiv(M, ROWS), n_prog):
        rows = blk * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xn = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        t = dy * (gamma * w)[None, :]
        mean_t = tl.sum(t, axis=1) / C
        mean_txn = tl.sum(t * xn, axis=1) / C
        dx = dy * gammax[None, :] + rstd[:, None] * (t - mean_t[:, None] - xn * mean_txn[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_dy_xn += dy * xn
        acc_dy += dy
        acc_dgammax += dy * x
    acc_dy_xn = tl.sum(acc_dy_xn, axis=0)
    acc_dy = tl.sum(acc_dy, axis=0)
    acc_dgammax = tl.sum(acc_dgammax, axis=0)
    acc_dgamma = acc_dy_xn * w + acc_dy * b
    base = pid.to(tl.int64) * C + cols
    stride = n_prog.to(tl.int64) * C
    tl.store(partial_ptr + base, acc_dgamma, mask=cmask)
    tl.store(partial_ptr + stride + base, acc_dgammax, mask=cmask)
    tl.store(partial_ptr + 2 * stride + base, acc_dy_xn * gamma, mask=cmask)
    tl.store(partial_ptr + 3 * stride + base, acc_dy * gamma, mask=cmask)


_ln_scale_fwd_launch = Launcher(_ln_scale_fwd_kernel)
_ln_scale_bwd_launch = Launcher(_ln_scale_bwd_kernel)


def _row_block(C: int, elems: int = ROW_BLOCK_ELEMS):
    block_c = next_pow2(C)
    rows = max(1, min(64, elems // block_c))
    warps = 4 if rows * block_c <= 4096 else 8
    return rows, block_c, warps


def ln_scale_fwd(x, w, b, gamma, gammax, eps):
    """``(y, mean, rstd)`` for (M, C) rows x; y in x's dtype, rounded once from the accumulation dtype."""
    M, C = x.shape
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty(M, device=x.device, dtype=acc)
    rstd = torch.empty(M, device=x.device, dtype=acc)
    rows, block_c, warps = _row_block(C)
    _ln_scale_fwd_launch[(cdiv(M, rows),)](
        x, w, b, gamma, gammax, y, mean, rstd, M, C, eps,
        ROWS=rows, BLOCK_C=block_c, ACC=tl_acc(x.dtype), num_warps=warps)
    return y, mean, rstd


def ln_scale_bwd(dy, x, w, b, gamma, gammax, mean, rstd):
    """``(dx, (4, C) parameter-gradient rows (dgamma, dgammax, dw_ln, db_ln))``."""
    M, C = x.shape
    rows, block_c, warps = _row_block(C, BWD_ROW_BLOCK_ELEMS)
    n_prog = max(1, min(num_workers(x.device, BWD_PROGRAMS_PER_SM), cdiv(M, rows)))
    dx = torch.empty_like(x)
    partial = torch.empty(4, n_prog, C, device=x.device, dtype=mean.dtype)
    _ln_scale_bwd_launch[(n_prog,)](
        x, dy, w, b, gamma, gammax, mean, rstd, dx, partial, M, C,
        ROWS=rows, BLOCK_C=block_c, ACC=tl_acc(x.dtype), num_warps=warps)
    return dx, partial.sum(dim=1)
