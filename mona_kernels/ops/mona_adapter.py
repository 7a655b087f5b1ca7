"""The Mona adapter as a composite of ops, for the CUDA backend (the Triton and PyTorch backends have
plans of their own in :mod:`mona_kernels.backends`).

Forward: LN-scaling -> down projection -> merged multi-scale depthwise conv -> projector with
residual -> GELU -> dropout -> up projection -> residual. Saved for backward: ``x``, per-token
``mean``/``rstd``, ``h1`` and the dropout seed; ``y``, ``h2``, ``h3``, ``a`` and the mask are
recomputed.

Layout contract: ``x`` is (M, C) with M = B * H * W tokens in row-major (i, j) order; ``h1`` is (M, d)
in the compute dtype (the autocast dtype when autocast is on, else x's dtype); matmuls accumulate in
fp32 (float64 for float64 inputs); parameter gradients come back in each parameter's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import backend as _backend
from . import cuda_ext
from .ln_scale import BACKWARD as LN_BACKWARD, FORWARD as LN_FORWARD
from .multiscale_dwconv import CONV, TAPS, WGRAD, conv_flipped
from .utils import acc_dtype, cast as _cast, call_op

# The CUDA backend's GELU and dropout kernels; its backward regenerates the forward's mask.
GELU_FWD = {"cuda": cuda_ext.gelu_dropout_fwd}
GELU_BWD = {"cuda": cuda_ext.gelu_dropout_bwd}


def dropout_scale(seed: torch.Tensor, like: torch.Tensor, p: float, backend: str | None = None) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) the adapter applies to each element of (M, d) ``like``
    for ``seed`` on the chosen backend. The Triton and CUDA backends draw ``seed`` from torch's
    generator and regenerate this mask in the backward without storing it; the PyTorch plan draws the
    mask itself, as ``nn.Dropout`` does, and this is its mask after ``torch.manual_seed(seed)``."""
    name = _backend.resolve(like.device, backend)
    if name == "torch":
        with torch.random.fork_rng(devices=[like.device] if like.is_cuda else []):
            torch.manual_seed(int(seed))
            return F.dropout(torch.ones_like(like), p)
    if name == "triton":
        from ..backends.triton.common import dropout_scale as triton_scale
        return triton_scale(seed.to(like.device), like, p)
    h = torch.full_like(like, 10.0)  # gelu'(10) == 1 to float64 precision, so dh3 == the mask
    dh3, _ = GELU_BWD[name](torch.ones_like(like), h, seed, p)
    return dh3


def _head(name, x, w_ln, b_ln, gamma, gammax, W1, b1, eps, cdt):
    """``(h1, mean, rstd)``: the LN-scaling op, then the down projection."""
    y, mean, rstd = LN_FORWARD[name](x, w_ln, b_ln, gamma, gammax, eps)
    return F.linear(_cast(y, cdt), _cast(W1, cdt), _cast(b1, cdt)), mean, rstd


def _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p):
    """``(h2, h3, a')`` from ``h1``: the merged depthwise op, the projector, GELU and dropout."""
    B, H, W = bhw
    d = h1.shape[1]
    cdt = h1.dtype
    h2 = CONV[name](h1.view(B, H, W, d), K, bias_k).view(-1, d)
    h3 = h2 + F.linear(h2, _cast(Wp, cdt), _cast(bp, cdt))
    return h2, h3, GELU_FWD[name](h3, seed, p)


def _tail_grads(name, h1, bhw, K, bias_k, Wp, bp, seed, p, g, W2):
    """``(gc, h2, a', dh3, dh2, dbp)``: the backward from the upstream gradient ``g`` to the
    projector's input, with gc the gradient in h1's dtype: the recompute, a matmul and the GELU
    backward."""
    cdt = h1.dtype
    gc, W2 = _cast(g, cdt), _cast(W2, cdt)
    h2, h3, a = _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p)
    dh3, dbp = GELU_BWD[name](gc @ W2, h3, seed, p)
    return gc, h2, a, dh3, torch.addmm(dh3, dh3, _cast(Wp, cdt)), dbp


def _up_residual(name, h1, bhw, K, bias_k, Wp, bp, seed, p, x, W2, b2):
    """The forward's output ``x + a' W2^T + b2`` from ``h1`` (W2 and b2 in h1's dtype)."""
    _, _, a = _recompute(name, h1, bhw, K, bias_k, Wp, bp, seed, p)
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
    """``(dx, dln, dW1, db1, dKb, dWp, dbp, dW2)`` with the formulas of docs/design.md; dln is (5, C) rows
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
