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
def reciprocal(d):
    """``floor((2**32 - 1) / d)`` as uint32, for :func:`div_mod` by d (1 <= d < 2**31)."""
    return tl.full((), 0xFFFFFFFF, tl.uint32) // d.to(tl.uint32)


@triton.jit
def div_mod(n, d, m):
    """``(n // d, n % d)`` for uint32 n < 2**31, with ``m = reciprocal(d)``: the high half of n * m is
    n // d or one less (n * m / 2**32 > n / d - 2n / 2**32 > n / d - 1), which one remainder test
    settles. Four instructions and a select where a 32-bit division compiles to about twenty on sm_90,
    with its divisor's reciprocal rebuilt at every step of a loop."""
    q = tl.umulhi(n, m)
    r = n - q * d
    over = r >= d
    return tl.where(over, q + 1, q), tl.where(over, r - d, r)


@triton.jit
def pixel_reciprocals(H, W):
    """The reciprocals :func:`tile_coords` divides by: of H * W and of W. A program walking tiles in a
    loop makes them once, before it."""
    return reciprocal(H * W), reciprocal(W)


@triton.jit
def within(k, n):
    """``0 <= k < n`` for int32 k and n >= 0, as one unsigned comparison (a negative k wraps above n)."""
    return k.to(tl.uint32, bitcast=True) < n.to(tl.uint32)


@triton.jit
def tile_coords(tile, H, W, n_pix, m_hw, m_w, TILE: tl.constexpr):
    """Tile ``tile`` is TILE consecutive pixels of the row-major (B, H, W) grid: their flat index,
    row, column, and whether each exists. Flat tiles keep one compiled kernel for every image width.
    ``m_hw, m_w = pixel_reciprocals(H, W)``."""
    # Divided in 32 bits (ops.utils.check_pixels keeps B * H * W under MAX_PIXELS, 2**31 - 4096): a
    # 64-bit division is a call of about 70 instructions on sm_90.
    pix = tile * TILE + tl.arange(0, TILE)
    _, r = div_mod(pix.to(tl.uint32), (H * W).to(tl.uint32), m_hw)
    i, j = div_mod(r, W.to(tl.uint32), m_w)
    return pix.to(tl.int64), i.to(tl.int32), j.to(tl.int32), pix < n_pix


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
def conv7_tile(src_ptr, k_ptr, pix, i, j, inside, H, W, D, ch, cmask, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
               FLIP: tl.constexpr, ACC: tl.constexpr):
    """sum_{u,v} K[u * 7 + v] * src[i+u-3, j+v-3] for one (TILE, BLOCK_D) tile in ACC, zero outside
    the image, K the merged kernel, taps-major (49 or 50, D) at ``k_ptr``; FLIP takes K rotated by 180
    degrees (the input gradient)."""
    center = src_ptr + pix[:, None] * D + ch[None, :]
    acc = tl.zeros([TILE, BLOCK_D], dtype=ACC)
    # Tap rows in a real loop, columns unrolled: unrolling all 49 lets the scheduler hoist every load
    # and spill (255 registers and 178 spilled words at 64 px x 64 channels).
    for u in range(7):
        ii = i + (u - 3)
        row_ok = inside & within(ii, H)
        for v in tl.static_range(7):
            jj = j + (v - 3)
            ok = row_ok & within(jj, W)
            hv = tl.load(center + ((u - 3) * W + (v - 3)) * D, mask=ok[:, None] & cmask[None, :], other=0.0)
            tap = (48 - (u * 7 + v)) if FLIP else (u * 7 + v)
            k = tl.load(k_ptr + tap * D + ch, mask=cmask, other=0.0).to(ACC)
            acc += hv.to(ACC) * k[None, :]
    return acc


@triton.jit
def gelu(h):
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def gelu_grad(h):
    """d gelu(h) / dh = Phi(h) + h phi(h)."""
    return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@triton.jit
def keep(seed_ptr, offs, p):
    """The dropout decision for flat element index ``offs`` of the (M, d) activations: element e takes
    lane e % 4 of the Philox draw for counter e // 4, from the seed in device memory, so a graph replay
    or a compiled step reads each call's own seed."""
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), offs // 4)
    lane = offs % 4
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return tl.random.uint_to_uniform_float(r) >= p


@triton.jit
def keep_tile(seed_ptr, pix, D, p, BY4: tl.constexpr, BLOCK_D: tl.constexpr):
    """:func:`keep` for the (pixels, BLOCK_D) tile of rows ``pix``. With BY4 (D a multiple of 4) each
    pixel's channels 4k..4k+3 are one Philox draw's four lanes, so the tile runs a quarter of the
    draws: each is ten rounds, about 70 instructions, and drawing one per element made dropout about a
    fifth of F2's instructions on sm_90."""
    if BY4:
        groups = pix[:, None] * (D // 4) + tl.arange(0, BLOCK_D // 4)[None, :]
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), groups)
        # join adds a minor axis: [..., i, j] of the outer join is lane 2i + j once flattened
        k0 = tl.random.uint_to_uniform_float(r0) >= p
        k1 = tl.random.uint_to_uniform_float(r1) >= p
        k2 = tl.random.uint_to_uniform_float(r2) >= p
        k3 = tl.random.uint_to_uniform_float(r3) >= p
        return tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), [pix.shape[0], BLOCK_D])
    else:
        return keep(seed_ptr, pix[:, None] * D + tl.arange(0, BLOCK_D)[None, :], p)


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


# Channels over which F1 and B2 take fewer tokens a program (ln_down.WIDE_BLOCK_M,
# conv_ln_bwd.WIDE_TILE): their work a token grows with C, and wide-C maps are small, so full-size
# tiles leave SMs idle. Besides d, the only size a compile depends on, with two values.
WIDE_C = 256


def block_d(d: int) -> int:
    """Register width of the bottleneck: a power of two, at least tl.dot's 16."""
    return max(16, next_pow2(d))


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision. fp32 takes three TF32 tensor-core products a product (each operand as
    a TF32 high part plus a TF32 remainder; the remainders' product dropped, about 2**-22 relative):
    fp32's accuracy, where exact fp32 products ("ieee") run on CUDA cores, spilled B3 to an 8.7 KB
    stack on sm_90 and took the fp32 forward+backward 10.8 ms at 32x56x56x128 on an H100 (tf32x3:
    1.30). fp64 has only exact products; 2-byte operands are exact in any mode."""
    return "ieee" if dtype == torch.float64 else "tf32x3" if dtype == torch.float32 else "tf32"



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
