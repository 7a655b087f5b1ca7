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
from .ln_scale import BACKWARD as LN_BACKWARD, FORWARD as LN_FORWARD
from .multiscale_dwconv import CONV, TAPS, WGRAD
from .utils import Launcher, acc_dtype, call_op, next_pow2, num_workers

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Elements per program of the GELU forward; rows per block of the GELU backward.
GELU_BLOCK = 2048
GELU_BWD_ROWS = 64


@triton.jit
def _keep(seed, offs, p):
    """The dropout decision for flat element index ``offs``: Philox draws from ``seed``."""
    return tl.rand(seed, offs) >= p


@triton.jit(do_not_specialize=["N", "seed"])
def _gelu_dropout_fwd_kernel(h3_ptr, a_ptr, N, seed, p, scale, HAS_DROPOUT: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    """a' = gelu(h3) * m over N flat elements, m the dropout multiplier (0 or 1/(1-p))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    h = tl.load(h3_ptr + offs, mask=inside, other=0.0).to(ACC)
    a = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    if HAS_DROPOUT:
        a = tl.where(_keep(seed, offs, p), a * scale, 0.0)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["M", "seed"])
def _gelu_dropout_bwd_kernel(da_ptr, h3_ptr, dh3_ptr, partial_ptr, M, D, seed, p, scale,
                             HAS_DROPOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                             ACC: tl.constexpr):
    """dh3 = da' * m * (Phi(h3) + h3 phi(h3)) for (M, D) rows, and per-program column sums of dh3
    (the projector bias gradient) into ``partial`` (programs, D)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
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
        tl.store(dh3_ptr + offs, dh.to(dh3_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(dh, axis=0)
    tl.store(partial_ptr + pid.to(tl.int64) * D + cols, acc, mask=cmask)


_gelu_dropout_fwd_launch = Launcher(_gelu_dropout_fwd_kernel)
_gelu_dropout_bwd_launch = Launcher(_gelu_dropout_bwd_kernel)


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _gelu_fwd_triton(h3, seed, p):
    a = torch.empty_like(h3)
    N = h3.numel()
    _gelu_dropout_fwd_launch[(triton.cdiv(N, GELU_BLOCK),)](
        h3, a, N, int(seed.item()), p, 1.0 / (1.0 - p), HAS_DROPOUT=p > 0, BLOCK=GELU_BLOCK,
        ACC=_tl_acc(h3.dtype), num_warps=4)
    return a


def _gelu_bwd_triton(da, h3, seed, p):
    M, D = h3.shape
    dh3 = torch.empty_like(h3)
    n_prog = max(1, min(num_workers(h3.device), triton.cdiv(M, GELU_BWD_ROWS)))
    partial = torch.empty(n_prog, D, device=h3.device, dtype=acc_dtype(h3.dtype))
    _gelu_dropout_bwd_launch[(n_prog,)](
        da, h3, dh3, partial, M, D, int(seed.item()), p, 1.0 / (1.0 - p), HAS_DROPOUT=p > 0,
        ROWS=GELU_BWD_ROWS, BLOCK_D=next_pow2(D), ACC=_tl_acc(h3.dtype), num_warps=4)
    return dh3, partial.sum(0)


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


# The two backends draw different (equally distributed) masks; each pairs its forward with its backward.
GELU_FWD = {"triton": _gelu_fwd_triton, "cuda": _gelu_fwd_torch, "torch": _gelu_fwd_torch}
GELU_BWD = {"triton": _gelu_bwd_triton, "cuda": _gelu_bwd_torch, "torch": _gelu_bwd_torch}


def dropout_scale(seed: torch.Tensor, like: torch.Tensor, p: float, backend: str | None = None) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) the adapter applies to each element of (M, d) ``like``
    for ``seed`` on the chosen backend; backward regenerates exactly this mask without storing it."""
    h = torch.full_like(like, 10.0)  # gelu'(10) == 1 to float64 precision, so dh3 == the mask
    dh3, _ = GELU_BWD[_backend.resolve(like.device, backend)](torch.ones_like(like), h, seed, p)
    return dh3


def _head(name, x, w_ln, b_ln, gamma, gammax, W1, b1, eps, cdt):
    """``(h1, mean, rstd)``: the LN-scaling op, then the down projection."""
    y, mean, rstd = LN_FORWARD[name](x, w_ln, b_ln, gamma, gammax, eps)
    return F.linear(y.to(cdt), W1.to(cdt), b1.to(cdt)), mean, rstd


def _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p):
    """``(h2, h3, a')`` from ``h1``: the merged depthwise op, the projector, GELU and dropout."""
    B, H, W = bhw
    d = h1.shape[1]
    cdt = h1.dtype
    h2 = CONV[name](h1.view(B, H, W, d), K, bias_k).view(-1, d)
    h3 = h2 + F.linear(h2, Wp.to(cdt), bp.to(cdt))
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
    _, _, a = _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p)
    out = x + F.linear(a, W2.to(compute_dtype), b2.to(compute_dtype))
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
                                     torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dln, dW1, db1, dKb, dWp, dbp, dW2, db2)`` with the SPEC §1 formulas; dln is (4, C) rows
    (dgamma, dgammax, dw_ln, db_ln), dKb (50, d) the merged-kernel and bias gradients."""
    name = _backend.resolve(x.device, backend)
    B, H, W = bhw
    cdt = h1.dtype
    acc = acc_dtype(cdt)
    d = h1.shape[1]
    h2, h3, a = _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p)
    gc = g.to(cdt)
    db2 = _column_sums(gc, acc)
    dW2 = gc.t() @ a
    da = gc @ W2.to(cdt)
    dh3, dbp = GELU_BWD[name](da, h3, seed, p)
    dWp = dh3.t() @ h2
    dh2 = torch.addmm(dh3, dh3, Wp.to(cdt))
    dh1 = CONV[name](dh2.view(B, H, W, d), K.flip(0).contiguous(), None).view(-1, d)
    dKb = WGRAD[name](h1.view(B, H, W, d), dh2.view(B, H, W, d)).to(K.dtype)
    db1 = _column_sums(dh1, acc)
    y, _, _ = LN_FORWARD[name](x, w_ln, b_ln, gamma, gammax, eps)
    dW1 = dh1.t() @ y.to(cdt)
    dy = dh1 @ W1.to(cdt)
    dx, dln = LN_BACKWARD[name](dy, x, w_ln, b_ln, gamma, gammax, mean, rstd, g)
    return dx, dln, dW1, db1, dKb, dWp, dbp, dW2, db2


mona_bwd = torch.library.custom_op("mona_kernels::mona_bwd", _mona_bwd, mutates_args=())


@mona_bwd.register_fake
def _(g, x, mean, rstd, h1, seed, w_ln, b_ln, gamma, gammax, W1, K, bias_k, Wp, bp, W2, bhw, eps, p, backend):
    acc = acc_dtype(h1.dtype)
    d, C = h1.shape[1], x.shape[1]
    return (torch.empty_like(x), x.new_empty((4, C), dtype=mean.dtype), x.new_empty((d, C), dtype=h1.dtype),
            x.new_empty(d, dtype=acc), K.new_empty((TAPS + 1, d)), x.new_empty((d, d), dtype=h1.dtype),
            x.new_empty(d, dtype=acc), x.new_empty((C, d), dtype=h1.dtype), x.new_empty(C, dtype=acc))


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
            dx, dln, dW1, db1, dKb, dWp, dbp, dW2, db2 = call_op(
                mona_bwd, _mona_bwd, g.contiguous(), x, mean, rstd, h1, seed, w_ln, b_ln, gamma, gammax, W1, K,
                bias_k, Wp, bp, W2, ctx.bhw, ctx.eps, ctx.p, ctx.backend)
        dgamma, dgammax, dw_ln, db_ln = dln.unbind(0)
        return (dx, None, dw_ln.to(w_ln.dtype), db_ln.to(b_ln.dtype), dgamma.to(gamma.dtype),
                dgammax.to(gammax.dtype), dW1.to(W1.dtype), db1.to(b1.dtype), dKb[:TAPS], dKb[TAPS],
                dWp.to(Wp.dtype), dbp.to(bp.dtype), dW2.to(W2.dtype), db2.to(b2.dtype),
                None, None, None, None, None)
