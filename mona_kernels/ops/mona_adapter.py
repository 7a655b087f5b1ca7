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

from .ln_scale import _ln_scale_bwd, _ln_scale_fwd, ln_scale_bwd, ln_scale_fwd
from .multiscale_dwconv import TAPS, _dwconv7_bwd, _dwconv7_fwd, dwconv7_bwd, dwconv7_fwd
from .utils import acc_dtype, call_op

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _dropout_scale(seed: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) for every element of ``like``, drawn from ``seed``.

    The same seed gives the same mask, so backward regenerates the forward's mask without storing it.
    """
    gen = torch.Generator(device=like.device)
    gen.manual_seed(int(seed.item()))
    keep = torch.rand(like.shape, generator=gen, device=like.device) >= p
    return keep.to(like.dtype) * (1.0 / (1.0 - p))


dropout_scale = torch.library.custom_op("mona_kernels::dropout_scale", _dropout_scale, mutates_args=())


@dropout_scale.register_fake
def _(seed, like, p):
    return torch.empty_like(like)


def _gelu_grad(h3):
    h = h3.to(acc_dtype(h3.dtype))
    return (0.5 * (1.0 + torch.erf(h * _SQRT_HALF)) + h * torch.exp(-0.5 * h * h) * _INV_SQRT_2PI)


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
            db2 = g.to(acc).sum(0)
            dW2 = gc.t() @ a
            da = gc @ W2.to(cdt)
            scale = call_op(dropout_scale, _dropout_scale, seed, da, ctx.p) if ctx.p > 0 else None
            dh3 = da.to(acc) * _gelu_grad(h3)
            if scale is not None:
                dh3 = dh3 * scale.to(acc)
            dbp = dh3.sum(0)
            dh3 = dh3.to(cdt)
            dWp = dh3.t() @ h2
            dh2 = dh3 + dh3 @ Wp.to(cdt)
            B, H, W = ctx.hw
            d = h1.shape[1]
            dh1, dKb = call_op(dwconv7_bwd, _dwconv7_bwd, dh2.view(B, H, W, d), h1.view(B, H, W, d), K, backend)
            dh1 = dh1.view(-1, d)
            db1 = dh1.to(acc).sum(0)
            dW1 = dh1.t() @ _recompute_y(x, w_ln, b_ln, gamma, gammax, ctx.eps, backend).to(cdt)
            dy = dh1 @ W1.to(cdt)
            dx, dparams = call_op(ln_scale_bwd, _ln_scale_bwd, dy, x, w_ln, b_ln, gamma, gammax, mean, rstd, backend)
            dgamma, dgammax, dw_ln, db_ln = dparams.unbind(0)
            dx = dx + g
        return (dx, None, dw_ln.to(w_ln.dtype), db_ln.to(b_ln.dtype), dgamma.to(gamma.dtype),
                dgammax.to(gammax.dtype), dW1.to(W1.dtype), db1.to(b1.dtype), dKb[:TAPS], dKb[TAPS],
                dWp.to(Wp.dtype), dbp.to(bp.dtype), dW2.to(W2.dtype), db2.to(ctx.b2_dtype),
                None, None, None, None, None)


def _recompute_y(x, w_ln, b_ln, gamma, gammax, eps, backend):
    y, _, _ = call_op(ln_scale_fwd, _ln_scale_fwd, x, w_ln, b_ln, gamma, gammax, eps, backend)
    return y


def _head(h1, hw, K, bias_k, Wp, bp, p, seed, cdt, backend, keep=False):
    """From h1 to the dropped-out activation ``a'``; with ``keep`` also returns h2 and h3."""
    B, H, W = hw
    d = h1.shape[1]
    h2 = call_op(dwconv7_fwd, _dwconv7_fwd, h1.view(B, H, W, d), K, bias_k, backend).view(-1, d)
    h3 = h2 + F.linear(h2, Wp.to(cdt), bp.to(cdt))
    a = F.gelu(h3)
    if p > 0:
        a = a * call_op(dropout_scale, _dropout_scale, seed, a, p)
    return a, (h2 if keep else None), (h3 if keep else None)
