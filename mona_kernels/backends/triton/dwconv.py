"""The Triton plan's standalone merged depthwise conv (``multiscale_dwconv``): the 7x7 conv over
channels-last maps, its kernel gradient and the merge of the three convs' weights into one kernel.
The conv and the gradient are the adapter's own pieces (``conv7_tile``, the tap programs).

Layout contract: ``h``/``out``/``dout`` are channels-last (B, H, W, d) in the input dtype; ``K`` is
taps-major (49, d), tap ``u * 7 + v``, in the accumulation dtype like ``bias`` (d,).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.utils import acc_dtype, cdiv, next_pow2, num_workers, tl_acc
from .common import conv7_tile, merge_taps, pixel_reciprocals, tile_coords
from .launcher import Launcher
from .param_grads import tap_program

KSIZE = 7
TAPS = KSIZE * KSIZE

# The conv's tile (pixels, warps; consecutive pixels of the row-major grid) for small maps, and for
# maps of at least LARGE_MAP_PIXELS pixels: the fastest in a graph-timed sweep on an H200 at 14x14 and
# 28x28 (8.1 / 21.7 us against 12.7 / 25.6 for 64 px and 4 warps), and at 56x56 and COCO stage 1
# (67.0 / 89.3 us against 72.5 / 100.4).
TILE_PIXELS, TILE_WARPS = 64, 8
LARGE_TILE_PIXELS, LARGE_TILE_WARPS = 16, 2
LARGE_MAP_PIXELS = 65536
# The weight gradient's pixel tile and warps: in a sweep on an H200 the
# fastest at 14x14 maps and at COCO stage 1, within 6% of the best at 56x56.
WGRAD_TILE_PIXELS = 8
WGRAD_WARPS = 4
MAX_BLOCK_D = 64
# Rows of a wgrad partial per program: one per tap, then the bias gradient.
PARTIAL_ROWS = tl.constexpr(TAPS + 1)


@triton.jit(do_not_specialize=["H", "W", "n_pix"])
def _dwconv7_kernel(h_ptr, k_ptr, bias_ptr, out_ptr, H, W, D, n_pix,
                    HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC: tl.constexpr):
    """out[b,i,j,:] = sum_{u,v} K[u*7+v,:] * h[b, i+u-3, j+v-3, :] (+ bias), zero outside the image;
    FLIP convolves with K[48 - t] instead (the input gradient)."""
    m_hw, m_w = pixel_reciprocals(H, W)
    pix, i, j, inside = tile_coords(tl.program_id(0), H, W, n_pix, m_hw, m_w, TILE)
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = ch < D
    offs = pix[:, None] * D + ch[None, :]
    acc = conv7_tile(h_ptr, k_ptr, pix, i, j, inside, H, W, D, ch, cmask, TILE, BLOCK_D, FLIP, ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ch, mask=cmask, other=0.0)[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["H", "W", "n_pix", "n_tiles"])
def _dwconv7_wgrad_kernel(h_ptr, dout_ptr, partial_ptr, H, W, D, n_pix, n_tiles, n_splits, n_dblk,
                          TILE: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """The merged kernel's weight and bias gradient as the Triton plan's tap programs compute it:
    program (p, u, c) sums dout * h shifted by the seven taps of tap row u over pixel tiles
    p, p + P, ... into partial[p, u * 7 + v, c-block]; row 0's programs also write partial[p, 49],
    the sum of dout. The host sums the partials over p in fixed order."""
    tap_program(tl.program_id(0), h_ptr, dout_ptr, partial_ptr, H, W, n_pix, D, n_tiles, n_splits, n_dblk, ACC,
                 TILE, BLOCK_D)


@triton.jit
def _merge_kernel(w3_ptr, b3_ptr, w5_ptr, b5_ptr, w7_ptr, b7_ptr, k_ptr, D, BLOCK_D: tl.constexpr):
    """Tap row program_id(1) of the merged (50, d) kernel, and its bias row from row 0's programs (one
    program a row: a single program for all 49 taps took 7 us, all latency)."""
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    merge_taps(tl.program_id(1), w3_ptr, b3_ptr, w5_ptr, b5_ptr, w7_ptr, b7_ptr, k_ptr, D, ch, ch < D, tl.float32)


_dwconv7_launch = Launcher(_dwconv7_kernel)
_dwconv7_wgrad_launch = Launcher(_dwconv7_wgrad_kernel)
_merge_launch = Launcher(_merge_kernel)


def dwconv7_fwd(h, K, bias, flip: bool = False, pixels: int | None = None, num_warps: int | None = None):
    """Channels-last (B, H, W, d) h convolved with the merged taps-major (49, d) kernel K (+ bias);
    ``flip`` rotates K by 180 degrees (the input gradient). ``pixels`` and ``num_warps`` override the
    tile the map's size picks."""
    B, H, W, D = h.shape
    out = torch.empty_like(h)
    block_d = min(next_pow2(D), MAX_BLOCK_D)
    n_pix = B * H * W
    if pixels is None:
        large = n_pix >= LARGE_MAP_PIXELS
        pixels, num_warps = (LARGE_TILE_PIXELS, LARGE_TILE_WARPS) if large else (TILE_PIXELS, TILE_WARPS)
    grid = (cdiv(n_pix, pixels), cdiv(D, block_d))
    _dwconv7_launch[grid](h, K, bias if bias is not None else K, out, H, W, D, n_pix,
                          HAS_BIAS=bias is not None, FLIP=flip, TILE=pixels, BLOCK_D=block_d,
                          ACC=tl_acc(K.dtype), num_warps=num_warps)
    return out


def dwconv7_wgrad(h, dout, pixels: int = WGRAD_TILE_PIXELS, num_warps: int = WGRAD_WARPS):
    """``(50, d)``: the merged kernel's 49 tap rows and the bias gradient, in the accumulation dtype."""
    B, H, W, D = h.shape
    block_d = min(next_pow2(D), MAX_BLOCK_D)
    n_pix = B * H * W
    n_tiles = cdiv(n_pix, pixels)
    blocks = cdiv(D, block_d)
    # enough programs to fill the GPU, each over many tiles: fewer partial rows to sum afterwards
    programs = max(1, min(n_tiles, num_workers(h.device) // (KSIZE * blocks)))
    acc = acc_dtype(h.dtype)
    partial = torch.empty(programs, PARTIAL_ROWS.value, D, device=h.device, dtype=acc)
    _dwconv7_wgrad_launch[(programs * KSIZE * blocks,)](
        h, dout, partial, H, W, D, n_pix, n_tiles, programs, blocks, TILE=pixels, BLOCK_D=block_d,
        ACC=tl_acc(acc), num_warps=num_warps)
    return partial.sum(dim=0)


def merge_kernels(w3, b3, w5, b5, w7, b7):
    """``(K, bias)`` in fp32: the merged taps-major (49, d) kernel and its bias, one launch."""
    d = w7.shape[0]
    K = torch.empty(TAPS + 1, d, device=w7.device, dtype=torch.float32)
    block_d = min(next_pow2(d), 128)
    _merge_launch[(cdiv(d, block_d), KSIZE)](w3.contiguous(), b3, w5.contiguous(), b5, w7.contiguous(), b7,
                                                     K, d, BLOCK_D=block_d)
    return K[:TAPS], K[TAPS]
