"""The whole Mona adapter as one autograd Function that recomputes instead of storing.

Forward: LN-scaling op -> down projection -> merged multi-scale depthwise op -> projector with
residual -> GELU -> dropout -> up projection -> residual. Saved for backward: ``x``, per-token
``mean``/``rstd``, ``h1`` and the dropout seed; ``y``, ``h2``, ``h3``, ``a`` and the mask are recomputed.

Layout contract: ``x`` is (M, C) with M = B * H * W tokens in row-major (i, j) order; matmuls run in
the compute dtype (the autocast dtype when autocast is on, else x's dtype) with fp32 accumulation;
parameter gradients come back in each parameter's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import backend as _backend

from .ln_scale import _ln_scale_bwd, _ln_scale_fwd, ln_scale_bwd, ln_scale_fwd
from .multiscale_dwconv import TAPS, _dwconv7_bwd, _dwconv7_fwd, dwconv7_bwd, dwconv7_fwd
from .utils import acc_dtype, call_op, next_pow2, num_workers

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Elements per program of the elementwise forward; rows per block of the backward.
GELU_BLOCK = 2048
GELU_BWD_ROWS = 64


@triton.jit
def _keep(seed, offs, p):
    """The dropout decision for flat element index ``offs``: Philox draws from ``seed``."""
    return tl.rand(seed, offs) >= p


@triton.jit
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


@triton.jit
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


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _gelu_fwd_triton(h3, seed, p):
    a = torch.empty_like(h3)
    N = h3.numel()
    _gelu_dropout_fwd_kernel[(triton.cdiv(N, GELU_BLOCK),)](
        h3, a, N, int(seed.item()), p, 1.0 / (1.0 - p), HAS_DROPOUT=p > 0, BLOCK=GELU_BLOCK,
        ACC=_tl_acc(h3.dtype), num_warps=4)
    return a


def _gelu_bwd_triton(da, h3, seed, p):
    M, D = h3.shape
    dh3 = torch.empty_like(h3)
    n_prog = max(1, min(num_workers(h3.device), triton.cdiv(M, GELU_BWD_ROWS)))
    partial = torch.empty(n_prog, D, device=h3.device, dtype=acc_dtype(h3.dtype))
    _gelu_dropout_bwd_kernel[(n_prog,)](
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


_GELU_FWD = {"triton": _gelu_fwd_triton, "torch": _gelu_fwd_torch}
_GELU_BWD = {"triton": _gelu_bwd_triton, "torch": _gelu_bwd_torch}


def _gelu_dropout_fwd(h3: torch.Tensor, seed: torch.Tensor, p: float, backend: str) -> torch.Tensor:
    """``a' = dropout(gelu(h3))`` for (M, d) ``h3``; the mask is a function of ``seed`` alone."""
    return _GELU_FWD[_backend.resolve(h3.device, backend)](h3, seed, p)


gelu_dropout_fwd = torch.library.custom_op("mona_kernels::gelu_dropout_fwd", _gelu_dropout_fwd, mutates_args=())


@gelu_dropout_fwd.register_fake
def _(h3, seed, p, backend):
    return torch.empty_like(h3)


def _gelu_dropout_bwd(da: torch.Tensor, h3: torch.Tensor, seed: torch.Tensor, p: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh3, dbp)``: the gradient through dropout and GELU, and its column sums."""
    return _GELU_BWD[_backend.resolve(h3.device, backend)](da, h3, seed, p)


gelu_dropout_bwd = torch.library.custom_op("mona_kernels::gelu_dropout_bwd", _gelu_dropout_bwd, mutates_args=())


@gelu_dropout_bwd.register_fake
def _(da, h3, seed, p, backend):
    return torch.empty_like(h3), h3.new_empty(h3.shape[1], dtype=acc_dtype(h3.dtype))


def dropout_scale(seed: torch.Tensor, like: torch.Tensor, p: float, backend: str | None = None) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) the adapter applies to each element of (M, d) ``like``
    for ``seed`` on the chosen backend; backward regenerates exactly this mask without storing it."""
    h = torch.full_like(like, 10.0)  # gelu'(10) == 1 to float64 precision, so dh3 == the mask
    dh3, _ = _gelu_dropout_bwd(torch.ones_like(like), h, seed, p, backend or "auto")
    return dh3


class MonaFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, hw, w_ln, b_ln, gamma, gammax, W1, b1, K, bias_k, Wp, bp, W2, b2,
                eps, p, seed, compute_dtype, backend):
        B, H, W = hw
        cdt = compute_dtype
        with torch.autocast(x.device.type, enabled=False):
            y, mean, rstd = call_op(ln_scale_fwd, _ln_scale_fwd, x, w_ln, b_ln, gamma, gammax, eps, backend)
            h1 = F.linear(y.to(cdt), W1.to(cdt), b1.to(cdt))
            a, _, _ = _head(h1, (B, H, W), K, bias_k, Wp, bp, p, seed, cdt, backend)
            out = x + F.linear(a, W2.to(cdt), b2.to(cdt))
        ctx.save_for_backward(x, mean, rstd, h1, seed, w_ln, b_ln, gamma, gammax, W1, b1, K, bias_k, Wp, bp, W2)
        ctx.hw, ctx.eps, ctx.p, ctx.cdt, ctx.backend = (B, H, W), eps, p, cdt, backend
        ctx.b2_dtype = b2.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, h1, seed, w_ln, b_ln, gamma, gammax, W1, b1, K, bias_k, Wp, bp, W2 = ctx.saved_tensors
        cdt, backend = ctx.cdt, ctx.backend
        with torch.autocast(x.device.type, enabled=False):
            a, h2, h3 = _head(h1, ctx.hw, K, bias_k, Wp, bp, ctx.p, seed, cdt, backend, keep=True)
            gc = g.to(cdt)
            acc = acc_dtype(cdt)
            db2 = _column_sums(gc, acc)
            dW2 = gc.t() @ a
            da = gc @ W2.to(cdt)
            dh3, dbp = call_op(gelu_dropout_bwd, _gelu_dropout_bwd, da, h3, seed, ctx.p, backend)
            dWp = dh3.t() @ h2
            dh2 = dh3 + dh3 @ Wp.to(cdt)
            B, H, W = ctx.hw
            d = h1.shape[1]
            dh1, dKb = call_op(dwconv7_bwd, _dwconv7_bwd, dh2.view(B, H, W, d), h1.view(B, H, W, d), K, backend)
            dh1 = dh1.view(-1, d)
            db1 = _column_sums(dh1, acc)
            dW1 = dh1.t() @ _recompute_y(x, w_ln, b_ln, gamma, gammax, ctx.eps, backend).to(cdt)
            dy = dh1 @ W1.to(cdt)
            dx, dparams = call_op(ln_scale_bwd, _ln_scale_bwd, dy, x, w_ln, b_ln, gamma, gammax, mean, rstd, backend)
            dgamma, dgammax, dw_ln, db_ln = dparams.unbind(0)
            dx = dx + g
        return (dx, None, dw_ln.to(w_ln.dtype), db_ln.to(b_ln.dtype), dgamma.to(gamma.dtype),
                dgammax.to(gammax.dtype), dW1.to(W1.dtype), db1.to(b1.dtype), dKb[:TAPS], dKb[TAPS],
                dWp.to(Wp.dtype), dbp.to(bp.dtype), dW2.to(W2.dtype), db2.to(ctx.b2_dtype),
                None, None, None, None, None)


def _column_sums(t, acc):
    """Sum over rows of a tall (M, n) matrix as a matrix-vector product: PyTorch's column reduction
    is several times slower than cuBLAS here. Low-precision inputs accumulate in fp32 in cuBLAS."""
    if t.dtype == acc:
        return t.sum(0)
    return (t.t() @ t.new_ones(t.shape[0])).to(acc)


def _recompute_y(x, w_ln, b_ln, gamma, gammax, eps, backend):
    y, _, _ = call_op(ln_scale_fwd, _ln_scale_fwd, x, w_ln, b_ln, gamma, gammax, eps, backend)
    return y


def _head(h1, hw, K, bias_k, Wp, bp, p, seed, cdt, backend, keep=False):
    """From h1 to the dropped-out activation ``a'``; with ``keep`` also returns h2 and h3."""
    B, H, W = hw
    d = h1.shape[1]
    h2 = call_op(dwconv7_fwd, _dwconv7_fwd, h1.view(B, H, W, d), K, bias_k, backend).view(-1, d)
    h3 = h2 + F.linear(h2, Wp.to(cdt), bp.to(cdt))
    a = call_op(gelu_dropout_fwd, _gelu_dropout_fwd, h3, seed, p, backend)
    return a, (h2 if keep else None), (h3 if keep else None)
