"""The Triton plan's standalone merged depthwise conv (``multiscale_dwconv``): the 7x7 conv over
channels-last maps, its kernel gradient and the merge of the three convs' weights into one kernel.
The conv and the gradient are the adapter's own pieces (``conv7_row``, the tap programs).

Layout contract: ``h``/``out``/``dout`` are channels-last (B, H, W, d) in the input dtype; ``K`` is
taps-major (49, d), tap ``u * 7 + v``, in the accumulation dtype like ``bias`` (d,).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.utils import acc_dtype, cdiv, next_pow2, num_workers, tl_acc
from .common import conv7_row, merge_taps, strip_coords, strip_grid
from . import conv_up
from .launcher import Launcher
from . import param_grads
from .param_grads import tap_program

KSIZE = 7
TAPS = KSIZE * KSIZE

# The conv's strip (rows, columns) and warps: the adapter's own (conv_up).
ROWS, COLS, WARPS = conv_up.ROWS, conv_up.COLS, conv_up.WARPS
# The weight gradient's strips and warps: the adapter's tap programs' (param_grads).
WGRAD_WARPS = 4
MAX_BLOCK_D = 64
# Rows of a wgrad partial per program: one per tap, then the bias gradient.
PARTIAL_ROWS = tl.constexpr(TAPS + 1)


@triton.jit(do_not_specialize=["H", "W"])
def _dwconv7_kernel(h_ptr, k_ptr, bias_ptr, out_ptr, H, W, D,
                    HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out[b,i,j,:] = sum_{u,v} K[u*7+v,:] * h[b, i+u-3, j+v-3, :] (+ bias), zero outside the image;
    FLIP convolves with K[48 - t] instead (the input gradient)."""
    img, i0, rows, j = strip_coords(tl.program_id(0), H, W, ROWS, COLS)
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = ch < D
    mask = (j < W)[:, None] & cmask[None, :]
    bias = tl.zeros([BLOCK_D], dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=cmask, other=0.0).to(ACC)
    z = tl.zeros([COLS, BLOCK_D], dtype=ACC)
    s0, s1, s2, s3, s4, s5 = z, z, z, z, z, z
    for t in range(6):  # the rows above the strip's first output row
        _, s0, s1, s2, s3, s4, s5 = conv7_row(h_ptr, k_ptr, img, i0 - 3 + t, H, W, j, D, ch, cmask, s0, s1, s2,
                                              s3, s4, s5, FLIP, ACC)
    for t in range(rows):
        out, s0, s1, s2, s3, s4, s5 = conv7_row(h_ptr, k_ptr, img, i0 + 3 + t, H, W, j, D, ch, cmask, s0, s1, s2,
                                                s3, s4, s5, FLIP, ACC)
        offs = (img + (i0 + t) * W + j)[:, None] * D + ch[None, :]
        tl.store(out_ptr + offs, (out + bias[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["H", "W", "n_strips"])
def _dwconv7_wgrad_kernel(h_ptr, dout_ptr, partial_ptr, H, W, D, n_strips, n_splits, n_dblk,
                          ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """The merged kernel's weight and bias gradient as the Triton plan's tap programs compute it:
    program (p, u, c) sums dout * h shifted by the seven taps of tap row u over column strips
    p, p + P, ... into partial[p, u * 7 + v, c-block]; row 0's programs also write partial[p, 49],
    the sum of dout. The host sums the partials over p in fixed order."""
    tap_program(tl.program_id(0), h_ptr, dout_ptr, partial_ptr, H, W, D, n_strips, n_splits, n_dblk, ACC, ROWS,
                COLS, BLOCK_D)


@triton.jit
def _merge_kernel(w3_ptr, b3_ptr, w5_ptr, b5_ptr, w7_ptr, b7_ptr, k_ptr, D, BLOCK_D: tl.constexpr):
    """Tap row program_id(1) of the merged (50, d) kernel, and its bias row from row 0's programs (one
    program a row: a single program for all 49 taps took 7 us, all latency)."""
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    merge_taps(tl.program_id(1), w3_ptr, b3_ptr, w5_ptr, b5_ptr, w7_ptr, b7_ptr, k_ptr, D, ch, ch < D, tl.float32)


_dwconv7_launch = Launcher(_dwconv7_kernel)
_dwconv7_wgrad_launch = Launcher(_dwconv7_wgrad_kernel)
_merge_launch = Launcher(_merge_kernel)


def dwconv7_fwd(h, K, bias, flip: bool = False):
    """Channels-last (B, H, W, d) h convolved with the merged taps-major (49, d) kernel K (+ bias);
    ``flip`` rotates K by 180 degrees (the input gradient)."""
    B, H, W, D = h.shape
    out = torch.empty_like(h)
    block_d = min(next_pow2(D), MAX_BLOCK_D)
    cols = conv_up.strip_cols(h.dtype)
    grid = (strip_grid(B, H, W, ROWS, cols), cdiv(D, block_d))
    _dwconv7_launch[grid](h, K, bias if bias is not None else K, out, H, W, D,
                          HAS_BIAS=bias is not None, FLIP=flip, ROWS=ROWS, COLS=cols, BLOCK_D=block_d,
                          ACC=tl_acc(K.dtype), num_warps=WARPS)
    return out


def dwconv7_wgrad(h, dout):
    """``(50, d)``: the merged kernel's 49 tap rows and the bias gradient, in the accumulation dtype."""
    B, H, W, D = h.shape
    block_d = min(next_pow2(D), MAX_BLOCK_D)
    cols = param_grads.tap_cols(h.dtype)
    n_strips = strip_grid(B, H, W, param_grads.TAP_ROWS, cols)
    blocks = cdiv(D, block_d)
    # enough programs to fill the GPU, each over many strips: fewer partial rows to sum afterwards
    programs = max(1, min(n_strips, num_workers(h.device) // (KSIZE * blocks)))
    acc = acc_dtype(h.dtype)
    partial = torch.empty(programs, PARTIAL_ROWS.value, D, device=h.device, dtype=acc)
    _dwconv7_wgrad_launch[(programs * KSIZE * blocks,)](
        h, dout, partial, H, W, D, n_strips, programs, blocks, ROWS=param_grads.TAP_ROWS, COLS=cols,
        BLOCK_D=block_d, ACC=tl_acc(acc), num_warps=WGRAD_WARPS)
    return partial.sum(dim=0)


def merge_kernels(w3, b3, w5, b5, w7, b7):
    """``(K, bias)`` in fp32: the merged taps-major (49, d) kernel and its bias, one launch."""
    d = w7.shape[0]
    K = torch.empty(TAPS + 1, d, device=w7.device, dtype=torch.float32)
    block_d = min(next_pow2(d), 128)
    _merge_launch[(cdiv(d, block_d), KSIZE)](w3.contiguous(), b3, w5.contiguous(), b5, w7.contiguous(), b7,
                                                     K, d, BLOCK_D=block_d)
    return K[:TAPS], K[TAPS]
