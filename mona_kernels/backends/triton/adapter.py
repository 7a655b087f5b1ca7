"""The whole Mona adapter on the Triton backend: two forward and four backward kernels, registered
with ``torch.library.triton_op`` so that ``torch.compile`` sees and launches the kernels itself.

    forward   F1 ln_down      x -> h1, mean, rstd
              F2 conv_up      h1, x -> out, h2
    backward  B1 tail_bwd     g, h2 -> dh2, a'           + partial rows of dWp, dbp
              B2 conv_ln_bwd  dh2, x, g, mean, rstd -> dh1, dx
              B3 param_grads  g, a', dh1, x, dh2, h1     -> partial rows of every other gradient
              B4 reduce_grads partial rows -> the sixteen parameter gradients

F1 also merges the three convs' weights into one (50, d) kernel K that F2 and B2 read.
Saved for the backward: x, h1 and h2 (compute dtype), mean and rstd (two floats a token), K and the
dropout seed; y, h3, a' and the mask are recomputed, none of them through the conv. No kernel depends
on the sizes B, H, W except through runtime arguments, so a new image size compiles nothing.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import sym_max, sym_min
from torch.library import triton_op

from .. import Params
from ...ops.utils import acc_dtype, call_op, cast, cdiv, num_workers
from . import param_grads as b3, tail_bwd as b1
from .conv_ln_bwd import conv_ln_bwd
from .conv_up import conv_up
from .ln_down import ln_down
from .param_grads import param_grads
from .reduce_grads import grads_size, reduce_grads, row_lengths
from .tail_bwd import tail_bwd


# Widest bottleneck the plan runs: at d = 128 B1's tiles need 110 KB of shared memory in bf16, over
# the 99 KB an sm_86 GPU gives a program (tests/_compile_plan.py measures it).
MAX_D = 64


def forward(x: torch.Tensor, params: list[torch.Tensor], seed: Optional[torch.Tensor], H: int, W: int,
                eps: float, p: float, compute_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, h1, h2, mean, rstd, K)`` for contiguous tokens x (M, C), M = B * H * W."""
    q = Params(*params)
    h1, mean, rstd, K = ln_down(x, q.w_ln, q.b_ln, q.gamma, q.gammax, q.W1, q.b1, q.w3, q.b3, q.w5, q.b5, q.w7,
                                q.b7, eps, compute_dtype, acc_dtype(compute_dtype))
    out, h2 = conv_up(h1, x, K, q.Wp, q.bp, q.W2, q.b2, seed if seed is not None else x, p, H, W)
    return out, h1, h2, mean, rstd, K


adapter_fwd = triton_op("mona_kernels::triton_adapter_fwd", mutates_args={})(forward)


def _min(a, b):
    # torch.sym_min under torch.compile, where M is symbolic and Python's min would guard the graph on
    # the branch taken (recompiling when a new size takes the other); min in eager calls, where
    # sym_min costs a microsecond of host time each
    return min(a, b) if a.__class__ is int and b.__class__ is int else sym_min(a, b)


def _max(a, b):
    return max(a, b) if a.__class__ is int and b.__class__ is int else sym_max(a, b)


def partial_rows(device: torch.device, M: int, C: int, d: int) -> tuple[int, int, int]:
    """Partial rows of each region: channel splits, projector programs, tap splits. Enough programs to
    fill the GPU once; more only add rows for B4 to sum."""
    sms = num_workers(device, per_sm=1)
    n_cblk = cdiv(C, b3.channel_block(d))
    channel = _max(1, _min(cdiv(sms * b3.CHANNEL_PROGRAMS_PER_SM, n_cblk), cdiv(M, b3.BLOCK_M)))
    tail = _max(1, _min(sms * b1.PROGRAMS_PER_SM, cdiv(M, b1.TILE)))
    n_dblk = cdiv(d, b3.tap_block(d))
    tap = _max(1, _min(cdiv(sms * b3.TAP_PROGRAMS_PER_SM, 7 * n_dblk), cdiv(M, b3.TAP_TILE)))
    return channel, tail, tap


def gradients(g: torch.Tensor, x: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor, mean: torch.Tensor,
              rstd: torch.Tensor, K: torch.Tensor, params: list[torch.Tensor], seed: Optional[torch.Tensor], H: int,
              W: int, p: float, grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, grads)``: the input gradient and the sixteen parameter gradients flat, in ``grad_dtype``."""
    q = Params(*params)
    M, C = x.shape
    d = h1.shape[1]
    rows_channel, rows_tail, rows_tap = partial_rows(x.device, M, C, d)
    len_channel, len_tail, len_tap = row_lengths(C, d)
    partial = torch.empty(rows_channel * len_channel + rows_tail * len_tail + rows_tap * len_tap,
                          device=x.device, dtype=mean.dtype)
    # one buffer of three regions, [channel rows | projector rows | tap rows], as B4 reads it
    tail_offset = rows_channel * len_channel
    tap_offset = tail_offset + rows_tail * len_tail
    dh2, a = tail_bwd(g, h2, q.Wp, q.bp, q.W2, seed if seed is not None else x, p, partial, tail_offset, rows_tail)
    dh1, dx = conv_ln_bwd(dh2, x, mean, rstd, g, K, q.W1, q.w_ln, q.gamma, q.gammax, H, W)
    param_grads(g, a, dh1, x, mean, rstd, q.w_ln, q.b_ln, q.gamma, q.gammax, q.W1, h1, dh2, H, W, partial,
                0, rows_channel, tap_offset, rows_tap)
    grads = torch.empty(grads_size(C, d), device=x.device, dtype=grad_dtype)
    reduce_grads(partial, grads, C, d, rows_channel, rows_tail, rows_tap)
    return dx, grads


adapter_bwd = triton_op("mona_kernels::triton_adapter_bwd", mutates_args={})(gradients)


def _grad_dtype(params) -> torch.dtype:
    """The parameters' own dtype, or the accumulation dtype where they differ."""
    dtypes = {q.dtype for q in params}
    return dtypes.pop() if len(dtypes) == 1 else acc_dtype(functools.reduce(torch.promote_types, dtypes))


def backward(g: torch.Tensor, x: torch.Tensor, saved: list[torch.Tensor], params: list[torch.Tensor],
             seed: Optional[torch.Tensor], H: int, W: int, eps: float, p: float
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(dx, parameter gradients)`` from the forward's saved (h1, h2, mean, rstd, K), each gradient in
    its parameter's dtype and shape (eps is not needed: mean and rstd are saved)."""
    h1, h2, mean, rstd, K = saved
    # the operator while traced (the compiled backward launches the kernels), the function in eager calls
    dx, grads = call_op(adapter_bwd, gradients, g, x, h1, h2, mean, rstd, K, params, seed, H, W, p, _grad_dtype(params))
    # one call makes the sixteen views (a view and a cast each cost a dispatch in eager calls)
    views = torch._C._nn.unflatten_dense_tensors(grads, params)
    return dx, [cast(t, q.dtype) for t, q in zip(views, params)]
