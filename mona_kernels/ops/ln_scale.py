"""LayerNorm-scaling, ``y = (xn * w_ln + b_ln) * gamma + x * gammax``, in one pass over ``x``.

Layout contract: ``x``/``y``/``dy``/``dx`` are row-major (M, C) in the input dtype; the four
parameter vectors have C elements in any float dtype; ``mean``/``rstd`` are (M,) in the
accumulation dtype (float32, or float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends
from ..backends import cuda
from .utils import Launcher, acc_dtype, call_op, check_tensor, next_pow2, num_workers, on_input_device, tl_acc

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
                         res_ptr, dx_ptr, partial_ptr, M, C, HAS_RESIDUAL: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Writes dx (plus the residual gradient ``res`` when given) and, per program, partial sums of
    (dgamma, dgammax, dw_ln, db_ln) into ``partial`` (4, programs, C), with a fifth row of column sums
    of ``res`` when given (the adapter's output-bias gradient); the host sums them in order."""
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
    acc_res = tl.zeros([ROWS, BLOCK_C], dtype=ACC)
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
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
            dx += res
            acc_res += res
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
    if HAS_RESIDUAL:
        tl.store(partial_ptr + 4 * stride + base, tl.sum(acc_res, axis=0), mask=cmask)


_ln_scale_fwd_launch = Launcher(_ln_scale_fwd_kernel)
_ln_scale_bwd_launch = Launcher(_ln_scale_bwd_kernel)


def _row_block(C: int, elems: int = ROW_BLOCK_ELEMS):
    block_c = next_pow2(C)
    rows = max(1, min(64, elems // block_c))
    warps = 4 if rows * block_c <= 4096 else 8
    return rows, block_c, warps


def _fwd_triton(x, w, b, gamma, gammax, eps, y_dtype=None):
    """``(y, mean, rstd)``; y in ``y_dtype`` (default x's), rounded once from the accumulation dtype."""
    M, C = x.shape
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x, dtype=y_dtype)
    mean = torch.empty(M, device=x.device, dtype=acc)
    rstd = torch.empty(M, device=x.device, dtype=acc)
    rows, block_c, warps = _row_block(C)
    _ln_scale_fwd_launch[(triton.cdiv(M, rows),)](
        x, w, b, gamma, gammax, y, mean, rstd, M, C, eps,
        ROWS=rows, BLOCK_C=block_c, ACC=tl_acc(x.dtype), num_warps=warps)
    return y, mean, rstd


def _bwd_triton(dy, x, w, b, gamma, gammax, mean, rstd, residual=None, reduce=True, per_sm=BWD_PROGRAMS_PER_SM):
    """``(dx, (4 or 5, C) parameter-gradient rows)``; without ``reduce``, their (rows, programs, C)
    partial sums."""
    M, C = x.shape
    rows, block_c, warps = _row_block(C, BWD_ROW_BLOCK_ELEMS)
    n_prog = max(1, min(num_workers(x.device, per_sm), triton.cdiv(M, rows)))
    dx = torch.empty_like(x)
    partial = torch.empty(4 + (residual is not None), n_prog, C, device=x.device, dtype=mean.dtype)
    _ln_scale_bwd_launch[(n_prog,)](
        x, dy, w, b, gamma, gammax, mean, rstd, residual if residual is not None else dy, dx, partial, M, C,
        HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK_C=block_c, ACC=tl_acc(x.dtype), num_warps=warps)
    return dx, partial.sum(dim=1) if reduce else partial


def _fwd_torch(x, w, b, gamma, gammax, eps):
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    mean = xf.mean(dim=1)
    xc = xf - mean[:, None]
    rstd = torch.rsqrt((xc * xc).mean(dim=1) + eps)
    xn = xc * rstd[:, None]
    y = (xn * w.to(acc) + b.to(acc)) * gamma.to(acc) + xf * gammax.to(acc)
    return y.to(x.dtype), mean, rstd


def _bwd_torch(dy, x, w, b, gamma, gammax, mean, rstd, residual=None):
    acc = mean.dtype
    xf, dyf = x.to(acc), dy.to(acc)
    w, b, gamma, gammax = (p.to(acc) for p in (w, b, gamma, gammax))
    xn = (xf - mean[:, None]) * rstd[:, None]
    t = dyf * (gamma * w)
    dx = dyf * gammax + rstd[:, None] * (t - t.mean(1, keepdim=True) - xn * (t * xn).mean(1, keepdim=True))
    if residual is not None:
        dx = dx + residual.to(acc)
    dy_xn = (dyf * xn).sum(0)
    dy_sum = dyf.sum(0)
    rows = [dy_xn * w + dy_sum * b, (dyf * xf).sum(0), dy_xn * gamma, dy_sum * gamma]
    if residual is not None:
        rows.append(residual.to(acc).sum(0))
    return dx.to(x.dtype), torch.stack(rows)


# Each backend's LN-scaling forward and backward.
FORWARD = {"triton": _fwd_triton, "cuda": cuda.ln_scale_fwd, "torch": _fwd_torch}
BACKWARD = {"triton": _bwd_triton, "cuda": cuda.ln_scale_bwd, "torch": _bwd_torch}


def _ln_scale_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                 gammax: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, C) ``x`` -> ``(y, mean, rstd)``."""
    return FORWARD[backend](x, weight, bias, gamma, gammax, eps)


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
    return BACKWARD[backend](dy, x, weight, bias, gamma, gammax, mean, rstd)


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
    x2d = x.reshape(-1, C).contiguous()
    y = LNScaleFunction.apply(x2d, weight, bias, gamma, gammax, float(eps), backends.resolve(x.device, backend))
    return y.view(x.shape)
