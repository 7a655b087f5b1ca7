"""The whole Mona adapter as one autograd Function that recomputes instead of storing.

Forward: LN-scaling kernel -> down projection (cuBLAS) -> merged multi-scale depthwise kernel ->
projector with residual -> GELU -> dropout -> up projection -> residual. On the Triton backend (d up
to 64, not float64, maps of at least a tile an SM) everything after the down projection is one
kernel. Backward adds the GELU/dropout kernel, the depthwise weight-gradient kernel and the
LN-scaling backward kernel (which also adds the residual gradient); on the Triton backend's small
maps (fewer than four tiles an SM) the recompute, da' = g W2 and the GELU/dropout and projector
backward are one kernel. Saved for backward: ``x``,
per-token ``mean``/``rstd``, ``h1`` and the dropout seed; ``y``, ``h2``, ``h3``, ``a`` and the mask
are recomputed.

Layout contract: ``x`` is (M, C) with M = B * H * W tokens in row-major (i, j) order; ``h1`` is (M, d)
in the compute dtype (the autocast dtype when autocast is on, else x's dtype); matmuls accumulate in
fp32 (float64 for float64 inputs); parameter gradients come back in each parameter's dtype.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from .. import backend as _backend
from . import cuda_ext
from .graphs import CACHE as _GRAPHS, CopyOut, Staging, capture
from .ln_scale import BACKWARD as LN_BACKWARD, FORWARD as LN_FORWARD
from .multiscale_dwconv import CONV, TAPS, WGRAD, conv_flipped, dwconv7_tile, merge, tile_coords
from .utils import Launcher, acc_dtype, cast as _cast, call_op, next_pow2, num_workers, tl_acc

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Elements per program of the GELU forward. The GELU backward's rows per loop step, programs per
# SM and warps. Run 59's graph-replayed sweep put 32 rows at 8 programs an SM 18-28% ahead (and run
# 60's, with L2 flushed, 16%); inside the adapter that setting took 135 us at COCO stage 1 against
# about 70 for this one (run 59's profile, cause unknown), so this one stays.
GELU_BLOCK = 2048
GELU_BWD_ROWS = 64
GELU_BWD_PER_SM = 4
GELU_BWD_WARPS = 4
# The fused tail (merged conv, projector, GELU, dropout in one kernel) holds all d channels of a tile
# for the projector's tl.dot: pixels per tile and warps (run 49's sweep: 32 px / 4 warps was the
# fastest at every shape, 10-39% under 64 px), and the widest d it takes (wider d: the composite path).
TAIL_TILE = 32
TAIL_WARPS = 4
TAIL_MAX_D = 64
# The forward's fused up projection (tail kernel with UP): output channels a step, 64, or 128 from
# TAIL_WIDE_C channels. Run 88's graph-replayed sweep at Swin-B's stages (d = 64, fp32 / bf16 x):
# 133.7 / 123.4 us against 169.8 / 140.5 for the tail, matmul and add at 32x56x56x128, 43.4 / 37.3
# against 58.0 / 42.0 at 32x28x28x256, and with 128 channels 18.3 / 18.3 against 26.3 / 19.1 at
# 32x14x14x512. At 32x7x7x1024 its 49 programs leave most SMs idle and it lost (16.8 / 16.5 at best
# against 19.3 / 15.0), so maps with fewer tiles than the GPU has SMs keep the composite path.
TAIL_BLOCK_N = 64
TAIL_WIDE_C = 512
# The backward's fused tail (recompute, da' = g W2, GELU and projector backward in one kernel):
# persistent programs per SM, each summing its tiles' projector-bias gradient into one partial row
# (2, 4 and 8 timed the same in run 93), and the most tiles per SM it runs on (_fused_tail_bwd).
TAIL_BWD_PER_SM = 4
TAIL_BWD_MAX_TILES_PER_SM = 4


@triton.jit
def _keep(seed_ptr, offs, p):
    """The dropout decision for flat element index ``offs``: Philox draws from the seed at ``seed_ptr``
    (device memory, so that a replayed CUDA graph reads each call's own seed)."""
    return tl.rand(tl.load(seed_ptr), offs) >= p


@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h):
    """d gelu(h) / dh = Phi(h) + h phi(h), in h's (fp32) precision."""
    return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@triton.jit
def _conv_project(h1_ptr, k_ptr, bk_ptr, wp_ptr, bp_ptr, offs, i, j, inside, H, W, D, ch, cmask,
                  TILE: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """``(h2, h3)`` of one tile in the compute dtype (h1's): h2 = conv7(h1, K) + bias_k and
    h3 = h2 + h2 Wp^T + bp, each accumulated in fp32 and rounded where the composite path rounds."""
    cdt = h1_ptr.dtype.element_ty
    h2 = dwconv7_tile(h1_ptr, k_ptr, offs, i, j, inside, H, W, D, ch, cmask, TILE, BLOCK_D, tl.float32)
    h2 = (h2 + tl.load(bk_ptr + ch, mask=cmask, other=0.0)[None, :]).to(cdt)
    # Wp^T as a (in, out) tile: element [c_in, c_out] = Wp[c_out, c_in].
    wpt = tl.load(wp_ptr + ch[None, :] * D + ch[:, None], mask=cmask[:, None] & cmask[None, :], other=0.0)
    h3 = tl.dot(h2, wpt.to(cdt), input_precision=PRECISION, out_dtype=tl.float32)
    h3 = (h3 + h2.to(tl.float32) + tl.load(bp_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]).to(cdt)
    return h2, h3


@triton.jit(do_not_specialize=["H", "W", "n_pix", "C"])
def _tail_kernel(h1_ptr, k_ptr, bk_ptr, wp_ptr, bp_ptr, h2_ptr, h3_ptr, a_ptr, x_ptr, w2_ptr, b2_ptr, out_ptr,
                 H, W, D, C, n_pix, seed_ptr, p, scale, STORE_H: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 UP: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """For TILE pixels and all D channels: h2 = conv7(h1, K) + bias_k, h3 = h2 + h2 Wp^T + bp,
    a' = dropout(gelu(h3)). Writes a' (and h2, h3 when STORE_H, for the backward), each rounded to
    the compute dtype (h1's) where the composite path rounds; accumulates in fp32. The dropout
    mask is the GELU kernels' (the same Philox offsets: flat element index).

    With UP (the forward), a' stays in registers and the kernel writes the adapter's output instead:
    out = x + (a' W2^T + b2) over the C channels, BLOCK_N at a time, the projection rounded to the
    compute dtype before the residual add as the composite path rounds it."""
    pix, i, j, inside = tile_coords(tl.program_id(0), H, W, n_pix, TILE)
    ch = tl.arange(0, BLOCK_D)
    cmask = ch < D
    offs = pix[:, None] * D + ch[None, :]
    mask = inside[:, None] & cmask[None, :]
    cdt = h1_ptr.dtype.element_ty
    h2, h3 = _conv_project(h1_ptr, k_ptr, bk_ptr, wp_ptr, bp_ptr, offs, i, j, inside, H, W, D, ch, cmask,
                           TILE, BLOCK_D, PRECISION)
    if STORE_H:
        tl.store(h2_ptr + offs, h2, mask=mask)
        tl.store(h3_ptr + offs, h3, mask=mask)
    a = _gelu(h3.to(tl.float32))
    if HAS_DROPOUT:
        a = tl.where(_keep(seed_ptr, offs, p), a * scale, 0.0)
    a = a.to(cdt)
    if UP:
        for n0 in range(0, C, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < C
            # W2^T as a (D, BLOCK_N) tile: element [c_in, c_out] = W2[c_out, c_in].
            w2t = tl.load(w2_ptr + n[None, :] * D + ch[:, None], mask=cmask[:, None] & nmask[None, :], other=0.0)
            up = tl.dot(a, w2t.to(cdt), input_precision=PRECISION, out_dtype=tl.float32)
            up = (up + tl.load(b2_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]).to(cdt)
            xo = pix[:, None] * C + n[None, :]
            xmask = inside[:, None] & nmask[None, :]
            x = tl.load(x_ptr + xo, mask=xmask, other=0.0).to(tl.float32)
            tl.store(out_ptr + xo, (x + up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=xmask)
    else:
        tl.store(a_ptr + offs, a, mask=mask)


@triton.jit(do_not_specialize=["N"])
def _gelu_dropout_fwd_kernel(h3_ptr, a_ptr, N, seed_ptr, p, scale, HAS_DROPOUT: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    """a' = gelu(h3) * m over N flat elements, m the dropout multiplier (0 or 1/(1-p))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    h = tl.load(h3_ptr + offs, mask=inside, other=0.0).to(ACC)
    a = _gelu(h)
    if HAS_DROPOUT:
        a = tl.where(_keep(seed_ptr, offs, p), a * scale, 0.0)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["M"])
def _gelu_dropout_bwd_kernel(da_ptr, h3_ptr, wp_ptr, dh3_ptr, dh2_ptr, partial_ptr, M, D, seed_ptr, p, scale,
                             HAS_DROPOUT: tl.constexpr, PROJECT: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """dh3 = da' * m * (Phi(h3) + h3 phi(h3)) for (M, D) rows, and per-program column sums of dh3
    (the projector bias gradient) into ``partial`` (programs, D). With PROJECT, also the projector's
    input gradient dh2 = dh3 + dh3 Wp (tl.dot, fp32 accumulation) for dh3 rounded to its dtype."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    if PROJECT:  # Wp as an (out, in) tile, loaded once
        wp = tl.load(wp_ptr + cols[:, None] * D + cols[None, :], mask=cmask[:, None] & cmask[None, :],
                     other=0.0).to(dh3_ptr.dtype.element_ty)
    for blk in range(pid, tl.cdiv(M, ROWS), tl.num_programs(0)):
        rows = blk * ROWS + tl.arange(0, ROWS)
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(ACC)
        h = tl.load(h3_ptr + offs, mask=mask, other=0.0).to(ACC)
        dh = da * _gelu_grad(h)
        if HAS_DROPOUT:
            dh = tl.where(_keep(seed_ptr, offs, p), dh * scale, 0.0)
        dh_c = dh.to(dh3_ptr.dtype.element_ty)
        tl.store(dh3_ptr + offs, dh_c, mask=mask)
        if PROJECT:
            dh2 = tl.dot(dh_c, wp, input_precision=PRECISION, out_dtype=tl.float32) + dh_c.to(tl.float32)
            tl.store(dh2_ptr + offs, dh2.to(dh2_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(dh, axis=0)
    tl.store(partial_ptr + pid.to(tl.int64) * D + cols, acc, mask=cmask)


@triton.jit(do_not_specialize=["H", "W", "n_pix", "C", "n_tiles"])
def _tail_bwd_kernel(h1_ptr, k_ptr, bk_ptr, wp_ptr, bp_ptr, g_ptr, w2_ptr, h2_ptr, a_ptr, dh3_ptr, dh2_ptr,
                     partial_ptr, H, W, D, C, n_pix, n_tiles, seed_ptr, p, scale, HAS_DROPOUT: tl.constexpr,
                     TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The backward from the upstream gradient g (M, C) to the projector's input, for the pixel tiles
    p, p + P, ... of program p (P programs): recomputes h2 and h3 from h1 as the forward's tail does,
    and a' = dropout(gelu(h3)); da' = g W2 over the C channels, BLOCK_N at a time (g and W2 in the
    compute dtype, h1's); dh3 = da' * m * gelu'(h3) and dh2 = dh3 + dh3 Wp, as the GELU backward
    computes them. Writes h2 and a' (for dWp and dW2), dh3 and dh2, each rounded to the compute dtype
    where the composite path rounds, and per program the column sums of dh3 (the projector bias
    gradient) into ``partial`` (P, D). So da' and h3 never reach memory.

    g and W2 come cast (run 94: reading fp32 g and W2 and writing the cast g from here took this
    kernel from 20.8 to 38.0 us at 32x14x14x512, where the separate cast takes 2-3 us)."""
    pid = tl.program_id(0)
    ch = tl.arange(0, BLOCK_D)
    cmask = ch < D
    cdt = h1_ptr.dtype.element_ty
    # Wp as an (out, in) tile: element [c_out, c_in] = Wp[c_out, c_in].
    wp = tl.load(wp_ptr + ch[:, None] * D + ch[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0).to(cdt)
    dbp = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        pix, i, j, inside = tile_coords(tile, H, W, n_pix, TILE)
        offs = pix[:, None] * D + ch[None, :]
        mask = inside[:, None] & cmask[None, :]
        h2, h3 = _conv_project(h1_ptr, k_ptr, bk_ptr, wp_ptr, bp_ptr, offs, i, j, inside, H, W, D, ch, cmask,
                               TILE, BLOCK_D, PRECISION)
        h = h3.to(tl.float32)
        a = _gelu(h)
        if HAS_DROPOUT:
            keep = _keep(seed_ptr, offs, p)
            a = tl.where(keep, a * scale, 0.0)
        tl.store(h2_ptr + offs, h2, mask=mask)
        tl.store(a_ptr + offs, a.to(cdt), mask=mask)
        da = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, C, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < C
            gt = tl.load(g_ptr + pix[:, None] * C + n[None, :], mask=inside[:, None] & nmask[None, :], other=0.0)
            w2 = tl.load(w2_ptr + n[:, None] * D + ch[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)
            da += tl.dot(gt, w2, input_precision=PRECISION, out_dtype=tl.float32)
        dh = da.to(cdt).to(tl.float32) * _gelu_grad(h)
        if HAS_DROPOUT:
            dh = tl.where(keep, dh * scale, 0.0)
        dh = tl.where(mask, dh, 0.0)
        dh_c = dh.to(cdt)
        tl.store(dh3_ptr + offs, dh_c, mask=mask)
        dh2 = tl.dot(dh_c, wp, input_precision=PRECISION, out_dtype=tl.float32) + dh_c.to(tl.float32)
        tl.store(dh2_ptr + offs, dh2.to(cdt), mask=mask)
        dbp += tl.sum(dh, axis=0)
    tl.store(partial_ptr + pid.to(tl.int64) * D + ch, dbp, mask=cmask)


_tail_launch = Launcher(_tail_kernel)
_tail_bwd_launch = Launcher(_tail_bwd_kernel)
_gelu_dropout_fwd_launch = Launcher(_gelu_dropout_fwd_kernel)
_gelu_dropout_bwd_launch = Launcher(_gelu_dropout_bwd_kernel)


# Jobs of the gradient epilogue, axis 0 of its grid: the LN-scaling backward's five partial rows, the
# weight gradient's 49 tap rows and its bias row, the projector bias, the down-projection bias.
EPI_JOBS = 5 + TAPS + 1 + 2
EPI_ROWS = 64    # partial rows one loop step of the epilogue sums
EPI_COLS = 64    # columns one epilogue program owns


@triton.jit
def _sum_partials(src, n_rows, stride, cols, cmask, ROWS: tl.constexpr, COLS: tl.constexpr, ACC: tl.constexpr):
    """Column sums over ``n_rows`` partial rows ``stride`` apart, in fixed order (deterministic)."""
    acc = tl.zeros([ROWS, COLS], dtype=ACC)
    for r0 in range(0, n_rows, ROWS):
        r = r0 + tl.arange(0, ROWS)
        acc += tl.load(src + r.to(tl.int64)[:, None] * stride + cols[None, :],
                       mask=(r < n_rows)[:, None] & cmask[None, :], other=0.0).to(ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def _grad_epilogue_kernel(ln_ptr, n_ln, wg_ptr, n_wg, bp_ptr, n_bp, b1_ptr, out_ptr, C, D,
                          ROWS: tl.constexpr, COLS: tl.constexpr, ACC: tl.constexpr):
    """Sums the backward kernels' per-program partials and writes the sixteen parameter gradients
    into ``out``, flat in the order of ``modules.Mona._params`` and in its dtype: one launch instead
    of three reductions, the depthwise split and a cast per gradient. The dense (GEMM) gradients are
    written there by the matmuls themselves."""
    job = tl.program_id(0)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    o_w1 = 4 * C
    o_b1 = o_w1 + D * C
    o_w3 = o_b1 + D
    o_w5 = o_w3 + 10 * D
    o_w7 = o_w5 + 26 * D
    o_bp = o_w7 + 50 * D + D * D
    o_b2 = o_bp + D + C * D
    dt = out_ptr.dtype.element_ty
    # a column block past its job's width (the LN rows are C wide, the rest D) has nothing to do
    if tl.program_id(1) * COLS < tl.where(job < 5, C, D):
        if job < 5:  # (dgamma, dgammax, dw_ln, db_ln, db2): partial (5, n_ln, C)
            cmask = cols < C
            s = _sum_partials(ln_ptr + job.to(tl.int64) * n_ln * C, n_ln, C, cols, cmask, ROWS, COLS, ACC)
            base = tl.where(job == 0, 2 * C, tl.where(job == 1, 3 * C,
                                                      tl.where(job == 2, 0, tl.where(job == 3, C, o_b2))))
            tl.store(out_ptr + base + cols, s.to(dt), mask=cmask)
        elif job < 5 + 50:  # merged-kernel tap rows and bias: partial (n_wg, 50, D), each conv's share 1/3
            cmask = cols < D
            t = job - 5
            s = (_sum_partials(wg_ptr + t * D, n_wg, 50 * D, cols, cmask, ROWS, COLS, ACC) / 3.0).to(dt)
            if t == 49:  # the bias row: db3 = db5 = db7
                tl.store(out_ptr + o_w3 + 9 * D + cols, s, mask=cmask)
                tl.store(out_ptr + o_w5 + 25 * D + cols, s, mask=cmask)
                tl.store(out_ptr + o_w7 + 49 * D + cols, s, mask=cmask)
            else:
                u = t // 7
                v = t % 7
                tl.store(out_ptr + o_w7 + cols * 49 + t, s, mask=cmask)
                if (u >= 1) & (u <= 5) & (v >= 1) & (v <= 5):
                    tl.store(out_ptr + o_w5 + cols * 25 + (u - 1) * 5 + (v - 1), s, mask=cmask)
                if (u >= 2) & (u <= 4) & (v >= 2) & (v <= 4):
                    tl.store(out_ptr + o_w3 + cols * 9 + (u - 2) * 3 + (v - 2), s, mask=cmask)
        elif job == 5 + 50:  # the projector bias: partial (n_bp, D)
            cmask = cols < D
            s = _sum_partials(bp_ptr, n_bp, D, cols, cmask, ROWS, COLS, ACC)
            tl.store(out_ptr + o_bp + cols, s.to(dt), mask=cmask)
        else:  # the down-projection bias, already summed
            cmask = cols < D
            tl.store(out_ptr + o_b1 + cols, tl.load(b1_ptr + cols, mask=cmask, other=0.0).to(dt), mask=cmask)


_grad_epilogue_launch = Launcher(_grad_epilogue_kernel)


def _seed_arg(seed, like, p):
    """The seed as the Triton kernels read it: one int64 on ``like``'s device. Without dropout they
    read none, so ``like`` stands in and nothing is copied."""
    if p == 0:
        return like
    return seed if seed.device == like.device else seed.to(like.device, non_blocking=True)


def _gelu_fwd_triton(h3, seed, p):
    a = torch.empty_like(h3)
    N = h3.numel()
    _gelu_dropout_fwd_launch[(triton.cdiv(N, GELU_BLOCK),)](
        h3, a, N, _seed_arg(seed, h3, p), p, 1.0 / (1.0 - p), HAS_DROPOUT=p > 0, BLOCK=GELU_BLOCK,
        ACC=tl_acc(h3.dtype), num_warps=4)
    return a


def _precision(dtype):
    """tl.dot input precision: exact fp32 products for fp32 (as the reference computes them)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _gelu_bwd_triton(da, h3, seed, p, Wp=None, reduce=True, per_sm=GELU_BWD_PER_SM, rows=GELU_BWD_ROWS,
                     num_warps=GELU_BWD_WARPS):
    """``(dh3, dbp)``, or ``(dh3, dbp, dh2)`` when the projector weight ``Wp`` (d, d) is given; without
    ``reduce``, the (programs, d) partial sums stand in for dbp."""
    M, D = h3.shape
    dh3 = torch.empty_like(h3)
    dh2 = torch.empty_like(h3) if Wp is not None else dh3
    n_prog = max(1, min(num_workers(h3.device, per_sm), triton.cdiv(M, rows)))
    partial = torch.empty(n_prog, D, device=h3.device, dtype=acc_dtype(h3.dtype))
    _gelu_dropout_bwd_launch[(n_prog,)](
        da, h3, Wp if Wp is not None else h3, dh3, dh2, partial, M, D, _seed_arg(seed, h3, p), p, 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0, PROJECT=Wp is not None, ROWS=rows, BLOCK_D=max(16, next_pow2(D)),
        ACC=tl_acc(h3.dtype), PRECISION=_precision(h3.dtype), num_warps=num_warps)
    dbp = partial.sum(0) if reduce else partial
    return (dh3, dbp) if Wp is None else (dh3, dbp, dh2)


def _fused_tail(name, h1):
    """Whether the single-kernel tail runs: Triton, d up to TAIL_MAX_D, and not float64 (tested in the
    composite path, whose matmuls are exact in float64)."""
    return name == "triton" and h1.shape[1] <= TAIL_MAX_D and h1.dtype != torch.float64


def _tail_triton(h1, bhw, K, bias_k, Wp, bp, seed, p, store, tile=TAIL_TILE, num_warps=TAIL_WARPS, up=None,
                 block_n=TAIL_BLOCK_N, **options):
    """``(h2, h3, a')``; with ``up = (x, W2, b2)`` (W2 and b2 in h1's dtype), the adapter's output
    ``x + a' W2^T + b2`` instead, in x's dtype promoted with h1's."""
    B, H, W = bhw
    M, d = h1.shape
    if up is None:
        a = torch.empty_like(h1)
        h2, h3 = (torch.empty_like(h1), torch.empty_like(h1)) if store else (a, a)
        x = w2 = b2 = out = a
        C = d
    else:
        x, w2, b2 = up
        C = x.shape[1]
        out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, h1.dtype))
        h2 = h3 = a = out
    _tail_launch[(triton.cdiv(M, tile),)](
        h1, K, bias_k, Wp, bp, h2, h3, a, x, w2, b2, out, H, W, d, C, M, _seed_arg(seed, h1, p), p,
        1.0 / (1.0 - p), STORE_H=store and up is None, HAS_DROPOUT=p > 0, UP=up is not None, TILE=tile,
        BLOCK_D=max(16, next_pow2(d)), BLOCK_N=block_n, PRECISION=_precision(h1.dtype), num_warps=num_warps,
        **options)
    return out if up is not None else (h2, h3, a)


def _tail_bwd_triton(h1, bhw, K, bias_k, Wp, bp, seed, p, g, W2, reduce=True, tile=TAIL_TILE,
                     num_warps=TAIL_WARPS, block_n=TAIL_BLOCK_N, per_sm=TAIL_BWD_PER_SM, **options):
    """``(h2, a', dh3, dh2, dbp)`` from h1 and the upstream gradient ``g`` (M, C) with W2 (C, d),
    both in h1's dtype; without ``reduce``, the (programs, d) partial sums stand in for dbp."""
    B, H, W = bhw
    M, d = h1.shape
    C = g.shape[1]
    h2, a, dh3, dh2 = (torch.empty_like(h1) for _ in range(4))
    n_tiles = triton.cdiv(M, tile)
    n_prog = max(1, min(n_tiles, num_workers(h1.device, per_sm)))
    partial = torch.empty(n_prog, d, device=h1.device, dtype=torch.float32)
    _tail_bwd_launch[(n_prog,)](
        h1, K, bias_k, Wp, bp, g, W2, h2, a, dh3, dh2, partial, H, W, d, C, M, n_tiles, _seed_arg(seed, h1, p), p,
        1.0 / (1.0 - p), HAS_DROPOUT=p > 0, TILE=tile, BLOCK_D=max(16, next_pow2(d)), BLOCK_N=block_n,
        PRECISION=_precision(h1.dtype), num_warps=num_warps, **options)
    return h2, a, dh3, dh2, (partial.sum(0) if reduce else partial)


def _torch_scale(seed, like, p):
    gen = torch.Generator(device=like.device)
    gen.manual_seed(int(seed.item()))
    keep = torch.rand(like.shape, generator=gen, device=like.device) >= p
    return keep.to(like.dtype) * (1.0 / (1.0 - p))


def _gelu_fwd_torch(h3, seed, p):
    a = F.gelu(h3)
    return a * _torch_scale(seed, a, p) if p > 0 else a


def _gelu_bwd_torch(da, h3, seed, p):
    acc = acc_dtype(h3.dtype)
    h = h3.to(acc)
    dh = da.to(acc) * (0.5 * (1.0 + torch.erf(h * _SQRT_HALF)) + h * torch.exp(-0.5 * h * h) * _INV_SQRT_2PI)
    if p > 0:
        dh = dh * _torch_scale(seed, dh, p)
    return dh.to(h3.dtype), dh.sum(0)


# The backends draw different (equally distributed) masks; each pairs its forward with its backward.
GELU_FWD = {"triton": _gelu_fwd_triton, "cuda": cuda_ext.gelu_dropout_fwd, "torch": _gelu_fwd_torch}
GELU_BWD = {"triton": _gelu_bwd_triton, "cuda": cuda_ext.gelu_dropout_bwd, "torch": _gelu_bwd_torch}


def dropout_scale(seed: torch.Tensor, like: torch.Tensor, p: float, backend: str | None = None) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) the adapter applies to each element of (M, d) ``like``
    for ``seed`` on the chosen backend; backward regenerates exactly this mask without storing it."""
    h = torch.full_like(like, 10.0)  # gelu'(10) == 1 to float64 precision, so dh3 == the mask
    dh3, _ = GELU_BWD[_backend.resolve(like.device, backend)](torch.ones_like(like), h, seed, p)
    return dh3


def _head(name, x, w_ln, b_ln, gamma, gammax, W1, b1, eps, cdt):
    """``(h1, mean, rstd)``: the LN-scaling op, then the down projection."""
    y, mean, rstd = LN_FORWARD[name](x, w_ln, b_ln, gamma, gammax, eps)
    return F.linear(_cast(y, cdt), _cast(W1, cdt), _cast(b1, cdt)), mean, rstd


def _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p, store=True):
    """``(h2, h3, a')`` from ``h1``: the merged depthwise op, the projector, GELU and dropout. Without
    ``store`` only a' is wanted (the fused tail then writes nothing else)."""
    if _fused_tail(name, h1):
        return _tail_triton(h1, bhw, K, bias_k, Wp, bp, seed, p, store)
    B, H, W = bhw
    d = h1.shape[1]
    cdt = h1.dtype
    h2 = CONV[name](h1.view(B, H, W, d), K, bias_k).view(-1, d)
    h3 = h2 + F.linear(h2, _cast(Wp, cdt), _cast(bp, cdt))
    return h2, h3, GELU_FWD[name](h3, seed, p)


def _tiles_per_sm(h1):
    """Pixel tiles of the fused tails per SM (on the CPU, 1.0: the rules below then take the fused
    kernels, so that the CPU tests cover them)."""
    if not h1.is_cuda:
        return 1.0
    return triton.cdiv(h1.shape[0], TAIL_TILE) / num_workers(h1.device, 1)


def _wide_tail(name, h1):
    """Whether the forward's fused tail also takes the up projection and the residual: where it fuses
    at all, and the map has at least one tile an SM (run 88: with fewer, the longer programs leave
    SMs idle and the composite path wins)."""
    return _fused_tail(name, h1) and _tiles_per_sm(h1) >= 1


def _fused_tail_bwd(name, h1):
    """Whether the backward runs its fused tail (:func:`_tail_bwd_kernel`): where the tail fuses, on
    maps of fewer than TAIL_BWD_MAX_TILES_PER_SM tiles an SM. Run 93's sweep: 19.9 against 22.7 us
    for the composite at 32x14x14 (1.5 tiles an SM), a tie at 32x28x28 (5.9), 187 against 158 at
    32x56x56 (24): on large maps the separate kernels run faster than one long one."""
    return _fused_tail(name, h1) and _tiles_per_sm(h1) < TAIL_BWD_MAX_TILES_PER_SM


def _tail_grads(name, h1, bhw, K, bias_k, Wp, bp, seed, p, g, W2, reduce=True):
    """``(gc, h2, a', dh3, dh2, dbp)``: the backward from the upstream gradient ``g`` to the
    projector's input, with gc the gradient in h1's dtype. One kernel where
    :func:`_fused_tail_bwd` says so, else the recompute, a matmul and the GELU backward.
    ``reduce=False`` (Triton only) leaves dbp as per-program partial rows."""
    cdt = h1.dtype
    gc, W2 = _cast(g, cdt), _cast(W2, cdt)
    if _fused_tail_bwd(name, h1):
        return (gc, *_tail_bwd_triton(h1, bhw, K, bias_k, Wp, bp, seed, p, gc, W2.contiguous(), reduce=reduce))
    h2, h3, a = _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p)
    da = gc @ W2
    if _fused_tail(name, h1):
        dh3, dbp, dh2 = _gelu_bwd_triton(da, h3, seed, p, Wp, reduce=reduce)
        return gc, h2, a, dh3, dh2, dbp
    dh3, dbp = GELU_BWD[name](da, h3, seed, p) if reduce else _gelu_bwd_triton(da, h3, seed, p, reduce=False)
    return gc, h2, a, dh3, torch.addmm(dh3, dh3, _cast(Wp, cdt)), dbp


def up_block_n(C):
    """Output channels a step of the fused up projection for C channels (TAIL_BLOCK_N, TAIL_WIDE_C)."""
    return 2 * TAIL_BLOCK_N if C >= TAIL_WIDE_C else TAIL_BLOCK_N


def _up_residual(name, h1, bhw, K, bias_k, Wp, bp, seed, p, x, W2, b2):
    """The forward's output ``x + a' W2^T + b2`` from ``h1`` (W2 and b2 in h1's dtype): one kernel
    where the tail fuses and the map has at least a tile an SM, else the tail (or its parts), a
    matmul and an add."""
    if _wide_tail(name, h1):
        up = (x, W2.contiguous(), b2)
        return _tail_triton(h1, bhw, K, bias_k, Wp, bp, seed, p, False, up=up, block_n=up_block_n(x.shape[1]))
    _, _, a = _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p, store=False)
    return x + F.linear(a, W2, b2)


def _column_sums(t, acc):
    """Sum over rows of a tall (M, n) matrix as a matrix-vector product: PyTorch's column reduction
    is several times slower than cuBLAS here. Low-precision inputs accumulate in fp32 in cuBLAS."""
    if t.dtype == acc:
        return t.sum(0)
    return (t.t() @ t.new_ones(t.shape[0])).to(acc)


def _mona_fwd(x: torch.Tensor, w_ln: torch.Tensor, b_ln: torch.Tensor, gamma: torch.Tensor, gammax: torch.Tensor,
              W1: torch.Tensor, b1: torch.Tensor, K: torch.Tensor, bias_k: torch.Tensor, Wp: torch.Tensor,
              bp: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor, bhw: list[int], eps: float, p: float,
              seed: torch.Tensor, compute_dtype: torch.dtype,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, h1, mean, rstd)`` for (M, C) tokens ``x``."""
    name = _backend.resolve(x.device, backend)
    h1, mean, rstd = _head(name, x, w_ln, b_ln, gamma, gammax, W1, b1, eps, compute_dtype)
    out = _up_residual(name, h1, bhw, K, bias_k, Wp, bp, seed, p, x, _cast(W2, compute_dtype),
                       _cast(b2, compute_dtype))
    return out, h1, mean, rstd


mona_fwd = torch.library.custom_op("mona_kernels::mona_fwd", _mona_fwd, mutates_args=())


@mona_fwd.register_fake
def _(x, w_ln, b_ln, gamma, gammax, W1, b1, K, bias_k, Wp, bp, W2, b2, bhw, eps, p, seed, compute_dtype, backend):
    M = x.shape[0]
    acc = acc_dtype(compute_dtype)
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, compute_dtype)),
            x.new_empty((M, W1.shape[0]), dtype=compute_dtype), x.new_empty(M, dtype=acc), x.new_empty(M, dtype=acc))


def _mona_bwd(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, h1: torch.Tensor,
              seed: torch.Tensor, w_ln: torch.Tensor, b_ln: torch.Tensor, gamma: torch.Tensor, gammax: torch.Tensor,
              W1: torch.Tensor, K: torch.Tensor, bias_k: torch.Tensor, Wp: torch.Tensor, bp: torch.Tensor,
              W2: torch.Tensor, bhw: list[int], eps: float, p: float,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dln, dW1, db1, dKb, dWp, dbp, dW2)`` with the SPEC §1 formulas; dln is (5, C) rows
    (dgamma, dgammax, dw_ln, db_ln, db2), dKb (50, d) the merged-kernel and bias gradients."""
    name = _backend.resolve(x.device, backend)
    B, H, W = bhw
    cdt = h1.dtype
    acc = acc_dtype(cdt)
    d = h1.shape[1]
    gc, h2, a, dh3, dh2, dbp = _tail_grads(name, h1, bhw, K, bias_k, Wp, bp, seed, p, g, W2)
    dW2 = gc.t() @ a
    dWp = dh3.t() @ h2
    dh1 = conv_flipped(name, dh2.view(B, H, W, d), K).view(-1, d)
    dKb = _cast(WGRAD[name](h1.view(B, H, W, d), dh2.view(B, H, W, d)), K.dtype)
    db1 = _column_sums(dh1, acc)
    y, _, _ = LN_FORWARD[name](x, w_ln, b_ln, gamma, gammax, eps)
    dW1 = dh1.t() @ _cast(y, cdt)
    dy = dh1 @ _cast(W1, cdt)
    # The LN backward adds the residual gradient g to dx; its fifth row is sum(g), the output bias's.
    dx, dln = LN_BACKWARD[name](dy, x, w_ln, b_ln, gamma, gammax, mean, rstd, g)
    return dx, dln, dW1, db1, dKb, dWp, dbp, dW2


mona_bwd = torch.library.custom_op("mona_kernels::mona_bwd", _mona_bwd, mutates_args=())


@mona_bwd.register_fake
def _(g, x, mean, rstd, h1, seed, w_ln, b_ln, gamma, gammax, W1, K, bias_k, Wp, bp, W2, bhw, eps, p, backend):
    acc = acc_dtype(h1.dtype)
    d, C = h1.shape[1], x.shape[1]
    return (torch.empty_like(x), x.new_empty((5, C), dtype=mean.dtype), x.new_empty((d, C), dtype=h1.dtype),
            x.new_empty(d, dtype=acc), K.new_empty((TAPS + 1, d)), x.new_empty((d, d), dtype=h1.dtype),
            x.new_empty(d, dtype=acc), x.new_empty((C, d), dtype=h1.dtype))


class MonaFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, bhw, w_ln, b_ln, gamma, gammax, W1, b1, K, bias_k, Wp, bp, W2, b2,
                eps, p, seed, compute_dtype, backend):
        with torch.autocast(x.device.type, enabled=False):
            out, h1, mean, rstd = call_op(mona_fwd, _mona_fwd, x, w_ln, b_ln, gamma, gammax, W1, b1, K, bias_k,
                                          Wp, bp, W2, b2, list(bhw), eps, p, seed, compute_dtype, backend)
        ctx.save_for_backward(x, mean, rstd, h1, seed, w_ln, b_ln, gamma, gammax, W1, b1, K, bias_k, Wp, bp, W2, b2)
        ctx.bhw, ctx.eps, ctx.p, ctx.backend = list(bhw), eps, p, backend
        return out

    @staticmethod
    @once_differentiable  # the kernels have no derivatives of their own: a double backward raises
    def backward(ctx, g):
        x, mean, rstd, h1, seed, w_ln, b_ln, gamma, gammax, W1, b1, K, bias_k, Wp, bp, W2, b2 = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            dx, dln, dW1, db1, dKb, dWp, dbp, dW2 = call_op(
                mona_bwd, _mona_bwd, g.contiguous(), x, mean, rstd, h1, seed, w_ln, b_ln, gamma, gammax, W1, K,
                bias_k, Wp, bp, W2, ctx.bhw, ctx.eps, ctx.p, ctx.backend)
        dgamma, dgammax, dw_ln, db_ln, db2 = dln.unbind(0)
        return (dx, None, _cast(dw_ln, w_ln.dtype), _cast(db_ln, b_ln.dtype), _cast(dgamma, gamma.dtype),
                _cast(dgammax, gammax.dtype), _cast(dW1, W1.dtype), _cast(db1, b1.dtype), dKb[:TAPS], dKb[TAPS],
                _cast(dWp, Wp.dtype), _cast(dbp, bp.dtype), _cast(dW2, W2.dtype), _cast(db2, b2.dtype),
                None, None, None, None, None)


def _merged(x, params):
    """The module's sixteen parameters (the order of ``modules.Mona._params``) as :func:`_mona_fwd`
    takes them: the three depthwise convs merged into one taps-major kernel and its bias, and the
    projector weight as (d, d)."""
    w_ln, b_ln, gamma, gammax, W1, b1, w3, b3, w5, b5, w7, b7, Wp, bp, W2, b2 = params
    d = W1.shape[0]
    K, bias_k = merge(w3, b3, w5, b5, w7, b7, acc_dtype(x.dtype), use_triton=True)
    return w_ln, b_ln, gamma, gammax, W1, b1, K, bias_k, Wp.view(d, d), bp, W2, b2


def _cast_together(tensors, dtype):
    """``tensors`` in ``dtype``: where any needs a cast, all of them as views of one buffer that one
    concatenation and one cast fill (two launches, not one a tensor)."""
    if all(t.dtype == dtype for t in tensors):
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _adapter_fwd(x, params, bhw, eps, p, seed, cdt):
    """``(out, h1, mean, rstd)`` on the Triton backend from the module's sixteen parameters: what
    :func:`_mona_fwd` computes, with y written in the compute dtype by the LN kernel and the
    projection weights cast together (under autocast, fp32 tokens and parameters)."""
    w_ln, b_ln, gamma, gammax, W1, b1, K, bias_k, Wp, bp, W2, b2 = _merged(x, params)
    y, mean, rstd = LN_FORWARD["triton"](x, w_ln, b_ln, gamma, gammax, eps, cdt)
    W1, b1, W2, b2 = _cast_together([W1, b1, W2, b2], cdt)
    h1 = F.linear(y, W1, b1)
    return _up_residual("triton", h1, bhw, K, bias_k, Wp, bp, seed, p, x, W2, b2), h1, mean, rstd


def _grad_dtype(params):
    """The flat gradient buffer's dtype: the parameters' own, or the accumulation dtype where they differ."""
    pdt = params[0].dtype
    if all(q.dtype == pdt for q in params):
        return pdt
    return acc_dtype(functools.reduce(torch.promote_types, [q.dtype for q in params]))


def _adapter_bwd(g, x, h1, mean, rstd, seed, params, bhw, eps, p):
    """``(dx, flat)``: the input gradient, and the sixteen parameter gradients flat in the parameters'
    order (:func:`_grad_dtype`). The SPEC §1 formulas as :func:`_mona_bwd` computes them on the Triton
    backend, except that the matmuls write the dense gradients into ``flat`` and one epilogue kernel
    sums the partials and writes the rest."""
    w_ln, b_ln, gamma, gammax, W1, _, K, bias_k, Wp, bp, W2, _ = _merged(x, params)
    B, H, W = bhw
    C = x.shape[1]
    d = h1.shape[1]
    cdt = h1.dtype
    acc = acc_dtype(cdt)
    sizes = [q.numel() for q in params]
    flat = torch.empty(sum(sizes), device=x.device, dtype=_grad_dtype(params))
    # The three matmuls write their gradients in the compute dtype into a buffer laid out like flat;
    # one copy then moves the span from dW1 to dW2 into flat, and the epilogue overwrites the other
    # gradients inside it (one copy, not one a matmul, where the dtypes differ).
    dense = flat if flat.dtype == cdt else torch.empty(flat.shape, device=x.device, dtype=cdt)
    grads = dense.split(sizes)  # views in the parameters' order
    gc, h2, a, dh3, dh2, bp_partial = _tail_grads("triton", h1, bhw, K, bias_k, Wp, bp, seed, p, g, W2,
                                                  reduce=False)
    torch.mm(gc.t(), a, out=grads[14].view(C, d))  # dW2
    torch.mm(dh3.t(), h2, out=grads[12].view(d, d))  # dWp
    dh1 = conv_flipped("triton", dh2.view(B, H, W, d), K).view(-1, d)
    wg_partial = WGRAD["triton"](h1.view(B, H, W, d), dh2.view(B, H, W, d), reduce=False)
    db1 = _column_sums(dh1, acc)
    y, _, _ = LN_FORWARD["triton"](x, w_ln, b_ln, gamma, gammax, eps, cdt)
    torch.mm(dh1.t(), y, out=grads[4].view(d, C))  # dW1
    dy = dh1 @ _cast(W1, cdt)
    # The LN backward adds the residual gradient g to dx; its fifth partial row sums g (db2).
    dx, ln_partial = LN_BACKWARD["triton"](dy, x, w_ln, b_ln, gamma, gammax, mean, rstd, g, reduce=False)
    if dense is not flat:
        start, end = sum(sizes[:4]), sum(sizes[:15])
        flat[start:end].copy_(dense[start:end])
    _grad_epilogue(ln_partial, wg_partial, bp_partial, db1, flat, d)
    return dx, flat


def _grad_epilogue(ln_partial, wg_partial, bp_partial, db1, flat, d):
    """Launches :func:`_grad_epilogue_kernel`: the LN backward's (5, programs, C), the weight
    gradient's (programs, 50, d) and the GELU backward's (programs, d) partials, and the summed
    down-projection bias ``db1``, into the flat gradient buffer ``flat``."""
    C = ln_partial.shape[2]
    acc = torch.promote_types(ln_partial.dtype, wg_partial.dtype)
    _grad_epilogue_launch[(EPI_JOBS, triton.cdiv(max(C, d), EPI_COLS))](
        ln_partial, ln_partial.shape[1], wg_partial, wg_partial.shape[0], bp_partial, bp_partial.shape[0], db1,
        flat, C, d, ROWS=EPI_ROWS, COLS=EPI_COLS, ACC=tl_acc(acc), num_warps=4)


def _unflatten(flat, params):
    """The parameter gradients as views of ``flat``, each in its parameter's shape and dtype."""
    grads = flat.split([q.numel() for q in params])
    return [_cast(t.view(q.shape), q.dtype) for t, q in zip(grads, params)]


class AdapterGraphs:
    """One problem's static buffers and its captured forward and backward (``graphs``). Each call
    copies its own tokens, parameters and seed in and its results out, so adapters of one shape share
    an entry and forwards and backwards may interleave. The backward's upstream gradient, h1 and
    stats are staged into the forward's output buffers, which are free once a forward has copied
    them out."""

    def __init__(self, x, params, bhw, eps, p, cdt):
        self.problem = (list(bhw), eps, p)
        self.cdt = cdt
        self.x = torch.empty_like(x)
        self.params = [torch.empty_like(q) for q in params]
        self.seed = torch.zeros(1, dtype=torch.int64, device=x.device)
        self.stage_fwd = Staging([self.x, *self.params])
        self.fwd = self.bwd = None

    def _stage_seed(self, seed):
        if self.problem[2] > 0:
            self.seed.fill_(int(seed))

    def forward(self, x, params, seed, keep):
        """``(out, h1, mean, rstd)``; without ``keep`` (no backward to come) only ``out``."""
        self.stage_fwd([x, *params])
        self._stage_seed(seed)
        if self.fwd is None:
            bhw, eps, p = self.problem
            self.fwd, outputs = capture(lambda: _adapter_fwd(self.x, self.params, bhw, eps, p, self.seed, self.cdt))
            self.out, self.h1, self.mean, self.rstd = outputs
            self.copy_fwd, self.copy_out = CopyOut(outputs), CopyOut([self.out])
            self.stage_bwd = Staging([self.out, self.x, self.h1, self.mean, self.rstd, *self.params])
        self.fwd.replay()
        return self.copy_fwd() if keep else self.copy_out() + [None, None, None]

    def backward(self, g, x, h1, mean, rstd, params, seed):
        """``(dx, flat)``: the input gradient and the flat parameter gradients."""
        self.stage_bwd([g, x, h1, mean, rstd, *params])
        self._stage_seed(seed)
        if self.bwd is None:
            bhw, eps, p = self.problem

            def body():
                return list(_adapter_bwd(self.out, self.x, self.h1, self.mean, self.rstd, self.seed, self.params,
                                         bhw, eps, p))

            self.bwd, outputs = capture(body, pool=self.fwd.pool())
            self.copy_bwd = CopyOut(outputs)
        self.bwd.replay()
        return tuple(self.copy_bwd())


def _graph_key(x, bhw, eps, p, cdt, params):
    """The graph cache's key for a call, or None where it must run directly: not CUDA, no tokens,
    the cache off, inside a capture of the caller's, or parameters of mixed dtypes (their gradients
    come back from one flat buffer)."""
    if not x.is_cuda or x.numel() == 0 or _GRAPHS.capacity == 0 or torch.cuda.is_current_stream_capturing():
        return None
    pdt = params[0].dtype
    if any(q.dtype != pdt for q in params):
        return None
    device = x.device.index
    return (device, torch._C._cuda_getCurrentRawStream(device), tuple(bhw), x.shape[1], params[4].shape[0],
            x.dtype, pdt, cdt, eps, p)


def _run_cached(key, run, create=None):
    """``run(entry)`` on the cache's entry for ``key``, made by ``create()`` when the key has been seen
    before; None where there is no entry, or its capture failed (that problem then runs directly)."""
    if key is None:
        return None
    with _GRAPHS.lock:
        entry = _GRAPHS.get(key)
        if entry is None and create is not None and _GRAPHS.seen_before(key):
            entry = create()
            _GRAPHS.add(key, entry)
        if entry is None:
            return None
        try:
            return run(entry)
        except RuntimeError as err:
            if entry.fwd is not None and entry.bwd is not None:
                raise  # a replay's own failure is no capture problem
            _GRAPHS.give_up(key, err)
            return None


def _adapter_forward(x: torch.Tensor, params: list[torch.Tensor], bhw: list[int], eps: float, p: float,
                     seed: torch.Tensor, compute_dtype: torch.dtype,
                     keep: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, h1, mean, rstd)`` for (M, C) tokens on the Triton backend: a replay of the cached graph
    where the problem has one, else the direct path. Without ``keep`` a replay copies out only
    ``out`` (the rest is None)."""
    key = _graph_key(x, bhw, eps, p, compute_dtype, params)
    with torch.autocast(x.device.type, enabled=False):
        result = _run_cached(key, lambda entry: entry.forward(x, params, seed, keep),
                             lambda: AdapterGraphs(x, params, bhw, eps, p, compute_dtype))
        if result is None:
            result = _adapter_fwd(x, params, list(bhw), eps, p, _seed_arg(seed, x, p), compute_dtype)
    return tuple(result)


def _adapter_backward(g: torch.Tensor, x: torch.Tensor, h1: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                      seed: torch.Tensor, params: list[torch.Tensor], bhw: list[int], eps: float,
                      p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, flat)`` for the upstream gradient ``g`` (M, C): a replay of the cached graph where the
    problem has one, else the direct path (:func:`_adapter_bwd`)."""
    key = _graph_key(x, bhw, eps, p, h1.dtype, params)
    with torch.autocast(x.device.type, enabled=False):
        result = _run_cached(key, lambda entry: entry.backward(g, x, h1, mean, rstd, params, seed))
        if result is None:
            result = _adapter_bwd(g.contiguous(), x, h1, mean, rstd, _seed_arg(seed, x, p), params, bhw, eps, p)
    return tuple(result)


# Under torch.compile the two halves are opaque custom ops, so that a compiled model replays the
# same cached graphs as an eager one (a traced direct path would launch every kernel from the host
# at every call: run 102's compiled Swin-B step took 3.7x the zero-cost step's time).
adapter_fwd = torch.library.custom_op("mona_kernels::adapter_fwd", _adapter_forward, mutates_args=())
adapter_bwd = torch.library.custom_op("mona_kernels::adapter_bwd", _adapter_backward, mutates_args=())


@adapter_fwd.register_fake
def _(x, params, bhw, eps, p, seed, compute_dtype, keep=True):
    M = x.shape[0]
    acc = acc_dtype(compute_dtype)
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, compute_dtype)),
            x.new_empty((M, params[4].shape[0]), dtype=compute_dtype), x.new_empty(M, dtype=acc),
            x.new_empty(M, dtype=acc))


@adapter_bwd.register_fake
def _(g, x, h1, mean, rstd, seed, params, bhw, eps, p):
    return torch.empty_like(x), x.new_empty(sum(q.numel() for q in params), dtype=_grad_dtype(params))


class MonaAdapterFunction(torch.autograd.Function):
    """The whole adapter on the Triton backend, from the module's sixteen parameters (the depthwise
    merge runs inside, in the order of ``modules.Mona._params``), on contiguous tokens ``x`` of any
    shape (..., C) with B*H*W of them. Calls on CUDA replay captured graphs for a problem seen
    before (``graphs``), eager or compiled; the results equal the direct path's bit for bit.
    ``keep`` says whether a backward may follow (else an eager replay copies out only ``out``)."""

    @staticmethod
    def forward(ctx, x, bhw, eps, p, seed, compute_dtype, keep, *params):
        xm = x.view(-1, x.shape[-1])  # the tokens as (M, C), without an autograd node of its own
        if torch.compiler.is_compiling():
            out, h1, mean, rstd = adapter_fwd(xm, list(params), list(bhw), eps, p, seed, compute_dtype)
        else:
            out, h1, mean, rstd = _adapter_forward(xm, params, bhw, eps, p, seed, compute_dtype, keep)
        if keep:
            ctx.save_for_backward(xm, h1, mean, rstd, seed, *params)
        ctx.problem = (list(bhw), eps, p)
        return out.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, h1, mean, rstd, seed, *params = ctx.saved_tensors
        bhw, eps, p = ctx.problem
        shape = g.shape
        g = g.reshape(x.shape)
        dx, flat = call_op(adapter_bwd, _adapter_backward, g, x, h1, mean, rstd, seed, list(params), bhw, eps, p)
        return (dx.view(shape), None, None, None, None, None, None, *_unflatten(flat, params))
