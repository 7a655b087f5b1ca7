"""Pieces every stage of the Triton plan shares: pixel tiles, the merged 7x7 tap, GELU, dropout, and
the launch helper that serves eager calls and ``torch.compile`` alike.

Layout contract of every stage: tokens are (M, C) rows, M = B * H * W in row-major (b, i, j) order;
bottleneck activations are (M, d) rows in the compute dtype; parameters come in their own dtype and
are converted inside the kernels; accumulation is fp32 (fp64 for float64 inputs).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ...ops.utils import cdiv, next_pow2, traced
from .launcher import Launcher


@triton.jit
def merge_taps(u, w3_ptr, b3_ptr, w5_ptr, b5_ptr, w7_ptr, b7_ptr, k_ptr, D, ch, cmask, ACC: tl.constexpr):
    """Row u of the merged kernel ``delta + (pad(w3) + pad(w5) + w7) / 3`` from the three (d, 1, k, k)
    weights: taps u * 7 .. u * 7 + 6 of the taps-major (50, D) ``k_ptr`` in ACC, and with row 0 its
    last row, the bias ``(b3 + b5 + b7) / 3``. Merged once a step, so that each of the conv's taps
    loads one weight vector instead of building it from three."""
    uu = u + ch * 0  # the row index as a vector, for masks
    in5 = cmask & (uu >= 1) & (uu <= 5)
    in3 = cmask & (uu >= 2) & (uu <= 4)
    for v in tl.static_range(7):
        k = tl.load(w7_ptr + ch * 49 + (u * 7 + v), mask=cmask, other=0.0).to(ACC)
        if v >= 1 and v <= 5:
            k += tl.load(w5_ptr + ch * 25 + ((u - 1) * 5 + v - 1), mask=in5, other=0.0).to(ACC)
        if v >= 2 and v <= 4:
            k += tl.load(w3_ptr + ch * 9 + ((u - 2) * 3 + v - 2), mask=in3, other=0.0).to(ACC)
        k = k / 3.0
        if v == 3:
            k += tl.where(u == 3, 1.0, 0.0)
        tl.store(k_ptr + (u * 7 + v) * D + ch, k, mask=cmask)
    if u == 0:
        bias = (tl.load(b3_ptr + ch, mask=cmask, other=0.0).to(ACC)
                + tl.load(b5_ptr + ch, mask=cmask, other=0.0).to(ACC)
                + tl.load(b7_ptr + ch, mask=cmask, other=0.0).to(ACC)) / 3.0
        tl.store(k_ptr + 49 * D + ch, bias, mask=cmask)


@triton.jit
def strip_coords(pid, H, W, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Program ``pid`` owns a strip of COLS columns and up to ROWS rows of one image:
    ``(first token of its image, first row, rows, columns)``, the columns as a vector (some past W)."""
    n_cols = tl.cdiv(W, COLS)
    n_rows = tl.cdiv(H, ROWS)
    b = pid // (n_cols * n_rows)
    i0 = (pid // n_cols) % n_rows * ROWS
    j = (pid % n_cols) * COLS + tl.arange(0, COLS)
    return b.to(tl.int64) * H * W, i0, tl.minimum(ROWS, H - i0), j


def strip_grid(B: int, H: int, W: int, rows: int, cols: int) -> int:
    """Programs of a kernel that walks its image in strips of ``rows`` x ``cols`` pixels."""
    return B * cdiv(H, rows) * cdiv(W, cols)


@triton.jit
def conv7_row(src_ptr, k_ptr, img, r, H, W, j, D, ch, cmask, s0, s1, s2, s3, s4, s5, FLIP: tl.constexpr,
              ACC: tl.constexpr):
    """One input row of a column strip through the merged 7x7 conv, sliding down the image.

    ``s0 .. s5`` are the strip's partial sums of output rows r - 3 .. r + 2 before input row r (of
    the image starting at token ``img``) arrives; returns ``(done, s0 .. s5)``: output row r - 3,
    now complete, and the partial sums of rows r - 2 .. r + 3. Each input element is loaded once per
    column tap and serves the seven output rows it reaches, where a tile of pixels loaded it 49
    times; K is the taps-major (49 or 50, D) merged kernel, rotated by 180 degrees with FLIP (the
    input gradient)."""
    done = s0
    s0 = s1
    s1 = s2
    s2 = s3
    s3 = s4
    s4 = s5
    s5 = tl.zeros_like(s5)
    # A row outside the image adds nothing. Behind this branch K's loads also stay in the loop: hoisted
    # out of it, its 49 taps would hold 392 registers a thread, and ptxas then compiles the kernel
    # to 32 registers and a 5-7 KB stack.
    if (r >= 0) & (r < H):
        row = src_ptr + (img + r.to(tl.int64) * W) * D
        for v in tl.static_range(7):
            x = shifted(row, j, v, W, D, ch, cmask, ACC)
            # output row r - 3 + k takes this row as its tap row u = 6 - k
            done += x * _tap(k_ptr, 6, v, D, ch, cmask, FLIP, ACC)
            s0 += x * _tap(k_ptr, 5, v, D, ch, cmask, FLIP, ACC)
            s1 += x * _tap(k_ptr, 4, v, D, ch, cmask, FLIP, ACC)
            s2 += x * _tap(k_ptr, 3, v, D, ch, cmask, FLIP, ACC)
            s3 += x * _tap(k_ptr, 2, v, D, ch, cmask, FLIP, ACC)
            s4 += x * _tap(k_ptr, 1, v, D, ch, cmask, FLIP, ACC)
            s5 += x * _tap(k_ptr, 0, v, D, ch, cmask, FLIP, ACC)
    return done, s0, s1, s2, s3, s4, s5


@triton.jit
def shifted(row, j, v: tl.constexpr, W, D, ch, cmask, ACC: tl.constexpr):
    """Columns j + v - 3 of the image row at ``row`` (a (W, D) block), zero outside the image, in ACC."""
    jj = j + (v - 3)
    ok = (jj >= 0) & (jj < W)
    return tl.load(row + jj[:, None] * D + ch[None, :], mask=ok[:, None] & cmask[None, :], other=0.0).to(ACC)


@triton.jit
def _tap(k_ptr, u: tl.constexpr, v: tl.constexpr, D, ch, cmask, FLIP: tl.constexpr, ACC: tl.constexpr):
    """Tap (u, v) of the merged kernel as a (1, BLOCK_D) row, or of the kernel rotated by 180 degrees."""
    tap: tl.constexpr = (48 - (u * 7 + v)) if FLIP else (u * 7 + v)
    return tl.load(k_ptr + tap * D + ch, mask=cmask, other=0.0).to(ACC)[None, :]


@triton.jit
def gelu(h):
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def gelu_grad(h):
    """d gelu(h) / dh = Phi(h) + h phi(h)."""
    return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@triton.jit
def keep(seed_ptr, offs, p):
    """The dropout decision for flat element index ``offs`` of the (M, d) activations: Philox draws
    from the seed in device memory, so a graph replay or a compiled step reads each call's own seed."""
    return tl.rand(tl.load(seed_ptr), offs) >= p


def dropout_args(p: float) -> tuple[float, float, float]:
    """``(p, scale, scale_lo)`` as the kernels take them: Triton passes floats as fp32, so the
    multiplier 1/(1-p) travels as an fp32 pair whose sum is exact to float64 precision."""
    scale = 1.0 / (1.0 - p)
    hi = float(np.float32(scale))
    return p, hi, scale - hi


def rows_and_stages(rows: int, *dtypes: torch.dtype) -> tuple[int, dict]:
    """``(rows, options)`` for a kernel whose 2-byte tiles have ``rows`` rows: 4-byte tensors halve
    them and pipeline two stages deep, 8-byte tensors quarter them and do not pipeline, so every
    kernel's shared memory stays within the 99 KB an sm_86 GPU gives a program
    (tests/test_triton_plan.py compiles each one for sm_80, sm_86 and sm_90 and checks)."""
    size = max(t.itemsize for t in dtypes)
    if size <= 2:
        return rows, {}
    # tl.dot takes no fewer than 16 rows
    return (max(16, rows // 2), {"num_stages": 2}) if size == 4 else (max(16, rows // 4), {"num_stages": 1})


def block_d(d: int) -> int:
    """Register width of the bottleneck: a power of two, at least tl.dot's 16."""
    return max(16, next_pow2(d))


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: exact fp32 products for fp32, as the reference computes them."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"



class Kernel:
    """``Kernel(fn)[grid](*args, **meta)``: a launch through ``torch.library.wrap_triton`` while
    torch.compile or a fake-tensor trace sees it (so the compiled graph launches the kernel itself),
    and through the cached fast launcher in eager calls, where Triton's own per-call binding costs
    tens of microseconds of host time."""

    def __init__(self, fn):
        self.fn = fn
        self.fast = Launcher(fn)

    def __getitem__(self, grid):
        if traced():
            return torch.library.wrap_triton(self.fn)[grid]
        return self.fast[grid]


@triton.jit
def _dropout_scale_kernel(seed_ptr, out_ptr, n, p, scale, scale_lo, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    one = tl.full([BLOCK], 1.0, dtype=out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, tl.where(keep(seed_ptr, offs, p), one * scale + one * scale_lo, 0.0), mask=offs < n)


def dropout_scale(seed: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) the plan applies to each element of the (M, d)
    activations ``like`` for ``seed`` (one int64 on like's device): what F2 and B1 draw."""
    out = torch.empty_like(like)
    _dropout_scale_kernel[(cdiv(like.numel(), 1024),)](seed, out, like.numel(), *dropout_args(p),
                                                              BLOCK=1024)
    return out
