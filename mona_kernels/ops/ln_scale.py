"""LayerNorm-scaling, ``y = (xn * w_ln + b_ln) * gamma + x * gammax``, as a standalone op: its
argument checks, its autograd and its registered operators. Each backend's kernels are in its plan
(``ln_scale_fwd`` and ``ln_scale_bwd`` of :mod:`mona_kernels.backends`).

Layout contract: ``x``/``y``/``dy``/``dx`` are row-major (M, C) in the input dtype; the four
parameter vectors have C elements in any float dtype; ``mean``/``rstd`` are (M,) in the
accumulation dtype (float32, or float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from .. import backends
from .utils import acc_dtype, call_op, check_eps, check_tensor, on_input_device


def _ln_scale_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                 gammax: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, C) ``x`` -> ``(y, mean, rstd)``."""
    return backends.plan(backend).ln_scale_fwd(x, weight, bias, gamma, gammax, eps)


ln_scale_fwd = torch.library.custom_op("mona_kernels::ln_scale_fwd", _ln_scale_fwd, mutates_args=())


@ln_scale_fwd.register_fake
def _(x, weight, bias, gamma, gammax, eps, backend):
    stats = x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _ln_scale_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 gamma: torch.Tensor, gammax: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dparams)``; dparams is (4, C) in the accumulation dtype, rows
    ``(dgamma, dgammax, dw_ln, db_ln)``."""
    return backends.plan(backend).ln_scale_bwd(dy, x, weight, bias, gamma, gammax, mean, rstd)


ln_scale_bwd = torch.library.custom_op("mona_kernels::ln_scale_bwd", _ln_scale_bwd, mutates_args=())


@ln_scale_bwd.register_fake
def _(dy, x, weight, bias, gamma, gammax, mean, rstd, backend):
    return torch.empty_like(x), x.new_empty((4, x.shape[1]), dtype=mean.dtype)


class LNScaleFunction(torch.autograd.Function):
    """Autograd for :func:`ln_scale` on (M, C) rows; saves ``x`` and two floats per row."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, gammax, eps, backend):
        y, mean, rstd = call_op(ln_scale_fwd, _ln_scale_fwd, x, weight, bias, gamma, gammax, eps, backend)
        ctx.save_for_backward(x, weight, bias, gamma, gammax, mean, rstd)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, gamma, gammax, mean, rstd = ctx.saved_tensors
        dx, dparams = call_op(ln_scale_bwd, _ln_scale_bwd, dy.contiguous(), x, weight, bias, gamma, gammax,
                              mean, rstd, ctx.backend)
        dgamma, dgammax, dw, db = dparams.unbind(0)
        return (dx, dw.to(weight.dtype), db.to(bias.dtype), dgamma.to(gamma.dtype),
                dgammax.to(gammax.dtype), None, None)


def check_ln_params(C: int, x: torch.Tensor, **params):
    for name, p in params.items():
        check_tensor(name, p, ndim=1, like=x)
        if p.shape[0] != C:
            raise ValueError(f"{name} has {p.shape[0]} elements but x has {C} channels (its last dimension)")


@on_input_device
def ln_scale(x, weight, bias, gamma, gammax, eps: float = 1e-5, backend: str | None = None):
    """``LayerNorm(x) * gamma + x * gammax`` over the last dimension of ``x``, fused.

    >>> y = ln_scale(x, norm.weight, norm.bias, gamma, gammax)  # x: (..., C)
    """
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    check_ln_params(C, x, weight=weight, bias=bias, gamma=gamma, gammax=gammax)
    eps = check_eps(eps)
    name = backends.resolve(x.device, backend)
    if name == "torch":  # autograd through PyTorch's own ops: no kernels of its own to join
        return backends.pytorch.ln_scale(x, weight, bias, gamma, gammax, eps)
    x2d = x.reshape(-1, C).contiguous()
    y = LNScaleFunction.apply(x2d, weight, bias, gamma, gammax, eps, name)
    return y.view(x.shape)
