"""The whole Mona adapter as one autograd Function that recomputes instead of storing.

Forward: LN-scaling kernel -> down projection (cuBLAS) -> merged multi-scale depthwise kernel ->
projector with residual -> GELU -> dropout -> up projection -> residual. Backward adds the GELU/dropout
kernel, the depthwise weight-gradient kernel and the LN-scaling backward kernel (which also adds the
residual gradient). Saved for backward: ``x``, per-token ``mean``/``rstd``, ``h1`` and the dropout seed; ``y``, ``h2``,
``h3``, ``a`` and the mask are recomputed.

Layout contract: ``x`` is (M, C) with M = B * H * W tokens in row-major (i, j) order; ``h1`` is (M, d)
in the compute dtype (the autocast dtype when autocast is on, else x's dtype); matmuls accumulate in
fp32 (float64 for float64 inputs); parameter gradients come back in each parameter's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import backend as _backend
from . import cuda_ext
from .ln_scale import BACKWARD as LN_BACKWARD, FORWARD as LN_FORWARD
from .multiscale_dwconv import CONV, TAPS, WGRAD, conv_flipped, dwconv7_tile, tile_coords
from .utils import Launcher, acc_dtype, cast as _cast, call_op, next_pow2, num_workers, tl_acc

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Elements per program of the GELU forward; rows per block of the GELU backward.
GELU_BLOCK = 2048
GELU_BWD_ROWS = 64
# The fused tail (merged conv, projector, GELU, dropout in one kernel) holds all d channels of a tile
# for the projector's tl.dot: pixels per tile, and the widest d it takes (wider d: the composite path).
TAIL_TILE = 64
TAIL_MAX_D = 64


@triton.jit
def _keep(seed, offs, p):
    """The dropout decision for flat element index ``offs``: Philox draws from ``seed``."""
    return tl.rand(seed, offs) >= p


@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit(do_not_specialize=["H", "W", "n_pix", "seed"])
def _tail_kernel(h1_ptr, k_ptr, bk_ptr, wp_ptr, bp_ptr, h2_ptr, h3_ptr, a_ptr, H, W, D, n_pix, seed, p, scale,
                 STORE_H: tl.constexpr, HAS_DROPOUT: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    """For TILE pixels and all D channels: h2 = conv7(h1, K) + bias_k, h3 = h2 + h2 Wp^T + bp,
    a' = dropout(gelu(h3)). Writes a' (and h2, h3 when STORE_H, for the backward), each rounded to
    the compute dtype (a_ptr's) where the composite path rounds; accumulates in fp32. The dropout
    mask is the GELU kernels' (the same Philox offsets: flat element index)."""
    pix, i, j, inside = tile_coords(tl.program_id(0), H, W, n_pix, TILE)
    ch = tl.arange(0, BLOCK_D)
    cmask = ch < D
    offs = pix[:, None] * D + ch[None, :]
    mask = inside[:, None] & cmask[None, :]
    cdt = a_ptr.dtype.element_ty
    h2 = dwconv7_tile(h1_ptr, k_ptr, offs, i, j, inside, H, W, D, ch, cmask, TILE, BLOCK_D, tl.float32)
    h2 = (h2 + tl.load(bk_ptr + ch, mask=cmask, other=0.0)[None, :]).to(cdt)
    # Wp^T as a (in, out) tile: element [c_in, c_out] = Wp[c_out, c_in].
    wpt = tl.load(wp_ptr + ch[None, :] * D + ch[:, None], mask=cmask[:, None] & cmask[None, :], other=0.0)
    h3 = tl.dot(h2, wpt.to(cdt), input_precision=PRECISION, out_dtype=tl.float32)
    h3 = (h3 + h2.to(tl.float32) + tl.load(bp_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]).to(cdt)
    if STORE_H:
        tl.store(h2_ptr + offs, h2, mask=mask)
        tl.store(h3_ptr + offs, h3, mask=mask)
    a = _gelu(h3.to(tl.float32))
    if HAS_DROPOUT:
        a = tl.where(_keep(seed, offs, p), a * scale, 0.0)
    tl.store(a_ptr + offs, a.to(cdt), mask=mask)


@triton.jit(do_not_specialize=["N", "seed"])
def _gelu_dropout_fwd_kernel(h3_ptr, a_ptr, N, seed, p, scale, HAS_DROPOUT: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    """a' = gelu(h3) * m over N flat elements, m the dropout multiplier (0 or 1/(1-p))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    h = tl.load(h3_ptr + offs, mask=inside, other=0.0).to(ACC)
    a = _gelu(h)
    if HAS_DROPOUT:
        a = tl.where(_keep(seed, offs, p), a * scale, 0.0)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["M", "seed"])
def _gelu_dropout_bwd_kernel(da_ptr, h3_ptr, wp_ptr, dh3_ptr, dh2_ptr, partial_ptr, M, D, seed, p, scale,
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
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        dh = da * (cdf + h * pdf)
        if HAS_DROPOUT:
            dh = tl.where(_keep(seed, offs, p), dh * scale, 0.0)
        dh_c = dh.to(dh3_ptr.dtype.element_ty)
        tl.store(dh3_ptr + offs, dh_c, mask=mask)
        if PROJECT:
            dh2 = tl.dot(dh_c, wp, input_precision=PRECISION, out_dtype=tl.float32) + dh_c.to(tl.float32)
            tl.store(dh2_ptr + offs, dh2.to(dh2_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(dh, axis=0)
    tl.store(partial_ptr + pid.to(tl.int64) * D + cols, acc, mask=cmask)


_tail_launch = Launcher(_tail_kernel)
_gelu_dropout_fwd_launch = Launcher(_gelu_dropout_fwd_kernel)
_gelu_dropout_bwd_launch = Launcher(_gelu_dropout_bwd_kernel)


def _gelu_fwd_triton(h3, seed, p):
    a = torch.empty_like(h3)
    N = h3.numel()
    _gelu_dropout_fwd_launch[(triton.cdiv(N, GELU_BLOCK),)](
        h3, a, N, int(seed.item()), p, 1.0 / (1.0 - p), HAS_DROPOUT=p > 0, BLOCK=GELU_BLOCK,
        ACC=tl_acc(h3.dtype), num_warps=4)
    return a


def _precision(dtype):
    """tl.dot input precision: exact fp32 products for fp32 (as the reference computes them)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _gelu_bwd_triton(da, h3, seed, p, Wp=None):
    """``(dh3, dbp)``, or ``(dh3, dbp, dh2)`` when the projector weight ``Wp`` (d, d) is given."""
    M, D = h3.shape
    dh3 = torch.empty_like(h3)
    dh2 = torch.empty_like(h3) if Wp is not None else dh3
    n_prog = max(1, min(num_workers(h3.device), triton.cdiv(M, GELU_BWD_ROWS)))
    partial = torch.empty(n_prog, D, device=h3.device, dtype=acc_dtype(h3.dtype))
    _gelu_dropout_bwd_launch[(n_prog,)](
        da, h3, Wp if Wp is not None else h3, dh3, dh2, partial, M, D, int(seed.item()), p, 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0, PROJECT=Wp is not None, ROWS=GELU_BWD_ROWS, BLOCK_D=max(16, next_pow2(D)),
        ACC=tl_acc(h3.dtype), PRECISION=_precision(h3.dtype), num_warps=4)
    return (dh3, partial.sum(0)) if Wp is None else (dh3, partial.sum(0), dh2)


def _fused_tail(name, h1):
    """Whether the single-kernel tail runs: Triton, d up to TAIL_MAX_D, and not float64 (tested in the
    composite path, whose matmuls are exact in float64)."""
    return name == "triton" and h1.shape[1] <= TAIL_MAX_D and h1.dtype != torch.float64


def _tail_triton(h1, bhw, K, bias_k, Wp, bp, seed, p, store):
    B, H, W = bhw
    M, d = h1.shape
    a = torch.empty_like(h1)
    h2, h3 = (torch.empty_like(h1), torch.empty_like(h1)) if store else (a, a)
    _tail_launch[(triton.cdiv(M, TAIL_TILE),)](
        h1, K, bias_k, Wp, bp, h2, h3, a, H, W, d, M, int(seed.item()), p, 1.0 / (1.0 - p),
        STORE_H=store, HAS_DROPOUT=p > 0, TILE=TAIL_TILE, BLOCK_D=max(16, next_pow2(d)),
        PRECISION=_precision(h1.dtype), num_warps=4)
    return h2, h3, a


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
    _, _, a = _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p, store=False)
    out = x + F.linear(a, _cast(W2, compute_dtype), _cast(b2, compute_dtype))
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
    h2, h3, a = _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p)
    gc = _cast(g, cdt)
    dW2 = gc.t() @ a
    da = gc @ _cast(W2, cdt)
    if _fused_tail(name, h1):
        dh3, dbp, dh2 = _gelu_bwd_triton(da, h3, seed, p, Wp)
    else:
        dh3, dbp = GELU_BWD[name](da, h3, seed, p)
        dh2 = torch.addmm(dh3, dh3, _cast(Wp, cdt))
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
