"""Multi-scale depthwise conv with averaging, ``h + (dw3(h) + dw5(h) + dw7(h)) / 3``, as ONE 7x7 pass.

The three convs and the identity are linear in ``h``, so they merge into one 7x7 depthwise kernel
``K = delta + (pad(K3) + pad(K5) + K7) / 3`` with bias ``(b3 + b5 + b7) / 3``; the merge is plain,
differentiable PyTorch, so the gradients of the six weights and biases follow from ``dK``/``dbias``.

Layout contract: ``h``/``out``/``dout``/``dh`` are channels-last (B, H, W, d) in the input dtype;
``K`` is taps-major (49, d), tap ``u * 7 + v``, in the accumulation dtype like ``bias`` (d,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import backends
from ..backends import cuda
from ..backends.triton.common import conv7_tile, tile_coords
from ..backends.triton.param_grads import tap_program
from .utils import Launcher, acc_dtype, cast, call_op, check_tensor, next_pow2, num_workers, on_input_device, tl_acc

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
    pix, i, j, inside = tile_coords(tl.program_id(0), H, W, n_pix, TILE)
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = ch < D
    offs = pix[:, None] * D + ch[None, :]
    acc = conv7_tile(h_ptr, k_ptr, k_ptr, k_ptr, pix, i, j, inside, H, W, D, ch, cmask, TILE, BLOCK_D, FLIP, ACC, True)
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
def _merge_kernel(w3_ptr, b3_ptr, w5_ptr, b5_ptr, w7_ptr, b7_ptr, k_ptr, bias_ptr, D, BLOCK_D: tl.constexpr):
    """K[t, :] = delta_t + (pad(w3) + pad(w5) + w7)[:, t] / 3 for the 7 taps t of tap row program_id(1)
    (one program a row: a single program for all 49 taps took 7 us, all latency); bias = mean of the
    three, from row 0's programs."""
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    u = tl.program_id(1)
    cmask = ch < D
    uu = u + ch * 0  # the row index as a vector, for masks
    in5 = cmask & (uu >= 1) & (uu <= 5)
    in3 = cmask & (uu >= 2) & (uu <= 4)
    for v in tl.static_range(7):
        k = tl.load(w7_ptr + ch * 49 + (u * 7 + v), mask=cmask, other=0.0).to(tl.float32)
        if v >= 1 and v <= 5:
            k += tl.load(w5_ptr + ch * 25 + ((u - 1) * 5 + v - 1), mask=in5, other=0.0).to(tl.float32)
        if v >= 2 and v <= 4:
            k += tl.load(w3_ptr + ch * 9 + ((u - 2) * 3 + v - 2), mask=in3, other=0.0).to(tl.float32)
        k = k / 3.0
        if v == 3:
            k += tl.where(u == 3, 1.0, 0.0)
        tl.store(k_ptr + (u * 7 + v) * D + ch, k, mask=cmask)
    if u == 0:
        bias = (tl.load(b3_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
                + tl.load(b5_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
                + tl.load(b7_ptr + ch, mask=cmask, other=0.0).to(tl.float32)) / 3.0
        tl.store(bias_ptr + ch, bias, mask=cmask)


_dwconv7_launch = Launcher(_dwconv7_kernel)
_dwconv7_wgrad_launch = Launcher(_dwconv7_wgrad_kernel)
_merge_launch = Launcher(_merge_kernel)


def _conv_triton(h, K, bias, pixels: int | None = None, num_warps: int | None = None, flip: bool = False):
    B, H, W, D = h.shape
    out = torch.empty_like(h)
    block_d = min(next_pow2(D), MAX_BLOCK_D)
    n_pix = B * H * W
    if pixels is None:
        large = n_pix >= LARGE_MAP_PIXELS
        pixels, num_warps = (LARGE_TILE_PIXELS, LARGE_TILE_WARPS) if large else (TILE_PIXELS, TILE_WARPS)
    grid = (triton.cdiv(n_pix, pixels), triton.cdiv(D, block_d))
    _dwconv7_launch[grid](h, K, bias if bias is not None else K, out, H, W, D, n_pix,
                          HAS_BIAS=bias is not None, FLIP=flip, TILE=pixels, BLOCK_D=block_d,
                          ACC=tl_acc(K.dtype), num_warps=num_warps)
    return out


def _wgrad_triton(h, dout, pixels: int = WGRAD_TILE_PIXELS, num_warps: int = WGRAD_WARPS, reduce: bool = True):
    """``(50, d)``: the merged kernel's 49 tap rows and the bias gradient; without ``reduce``, the
    (programs, 50, d) partial sums."""
    B, H, W, D = h.shape
    block_d = min(next_pow2(D), MAX_BLOCK_D)
    n_pix = B * H * W
    n_tiles = triton.cdiv(n_pix, pixels)
    blocks = triton.cdiv(D, block_d)
    # enough programs to fill the GPU, each over many tiles: fewer partial rows to sum afterwards
    programs = max(1, min(n_tiles, num_workers(h.device) // (KSIZE * blocks)))
    acc = acc_dtype(h.dtype)
    partial = torch.empty(programs, PARTIAL_ROWS.value, D, device=h.device, dtype=acc)
    _dwconv7_wgrad_launch[(programs * KSIZE * blocks,)](
        h, dout, partial, H, W, D, n_pix, n_tiles, programs, blocks, TILE=pixels, BLOCK_D=block_d,
        ACC=tl_acc(acc), num_warps=num_warps)
    return partial.sum(dim=0) if reduce else partial


def _conv_torch(h, K, bias):
    D = h.shape[-1]
    acc = K.dtype
    weight = K.t().reshape(D, 1, KSIZE, KSIZE)
    out = F.conv2d(h.permute(0, 3, 1, 2).to(acc), weight, bias, padding=KSIZE // 2, groups=D)
    return out.permute(0, 2, 3, 1).to(h.dtype).contiguous()


def _wgrad_torch(h, dout):
    D = h.shape[-1]
    acc = acc_dtype(h.dtype)
    hc = h.permute(0, 3, 1, 2).to(acc)
    gc = dout.permute(0, 3, 1, 2).to(acc)
    dK = torch.nn.grad.conv2d_weight(hc, (D, 1, KSIZE, KSIZE), gc, padding=KSIZE // 2, groups=D)
    return torch.cat([dK.reshape(D, TAPS).t(), gc.sum(dim=(0, 2, 3))[None]])


CONV = {"triton": _conv_triton, "cuda": cuda.dwconv7_fwd, "torch": _conv_torch}


def conv_flipped(name: str, dout: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """The input gradient of the merged conv: ``dout`` convolved with K rotated by 180 degrees."""
    if name == "triton":
        return _conv_triton(dout, K, None, flip=True)
    if name == "cuda":
        return cuda.dwconv7_fwd(dout, K, None, flip=True)
    return CONV[name](dout, K.flip(0).contiguous(), None)
WGRAD = {"triton": _wgrad_triton, "cuda": cuda.dwconv7_wgrad, "torch": _wgrad_torch}


def _dwconv7_fwd(h: torch.Tensor, K: torch.Tensor, bias: torch.Tensor, backend: str) -> torch.Tensor:
    """Channels-last (B, H, W, d) ``h`` convolved with the merged taps-major (49, d) kernel."""
    return CONV[backend](h, K, bias)


dwconv7_fwd = torch.library.custom_op("mona_kernels::dwconv7_fwd", _dwconv7_fwd, mutates_args=())


@dwconv7_fwd.register_fake
def _(h, K, bias, backend):
    return torch.empty_like(h)


def _dwconv7_bwd(dout: torch.Tensor, h: torch.Tensor, K: torch.Tensor,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh, dKb)``: dh is the conv of dout with the flipped kernel; dKb (50, d) in K's dtype holds
    dK in rows 0..48 and the bias gradient in row 49."""
    return conv_flipped(backend, dout, K), cast(WGRAD[backend](h, dout), K.dtype)


dwconv7_bwd = torch.library.custom_op("mona_kernels::dwconv7_bwd", _dwconv7_bwd, mutates_args=())


@dwconv7_bwd.register_fake
def _(dout, h, K, backend):
    return torch.empty_like(h), K.new_empty((K.shape[0] + 1, K.shape[1]))


class DWConv7Function(torch.autograd.Function):
    """Autograd for the merged 7x7 depthwise conv; saves only ``h`` and the merged kernel."""

    @staticmethod
    def forward(ctx, h, K, bias, backend):
        ctx.save_for_backward(h, K)
        ctx.backend = backend
        return call_op(dwconv7_fwd, _dwconv7_fwd, h, K, bias, backend)

    @staticmethod
    def backward(ctx, dout):
        h, K = ctx.saved_tensors
        dh, dKb = call_op(dwconv7_bwd, _dwconv7_bwd, dout.contiguous(), h, K, ctx.backend)
        return dh, dKb[:TAPS], dKb[TAPS], None


def _merge_torch(w3, b3, w5, b5, w7, b7, dtype):
    d = w7.shape[0]
    K = F.pad(w3.to(dtype), (2, 2, 2, 2)) + F.pad(w5.to(dtype), (1, 1, 1, 1)) + w7.to(dtype)
    K = K.reshape(d, TAPS).t() / 3.0
    K[TAPS // 2] += 1.0
    return K.contiguous(), (b3.to(dtype) + b5.to(dtype) + b7.to(dtype)) / 3.0


def _merge_triton(w3, b3, w5, b5, w7, b7, dtype):
    d = w7.shape[0]
    K = torch.empty(TAPS, d, device=w7.device, dtype=dtype)
    bias = torch.empty(d, device=w7.device, dtype=dtype)
    block_d = min(next_pow2(d), 128)
    _merge_launch[(triton.cdiv(d, block_d), KSIZE)](w3.contiguous(), b3, w5.contiguous(), b5, w7.contiguous(), b7,
                                                     K, bias, d, BLOCK_D=block_d)
    return K, bias


class MergeKernels(torch.autograd.Function):
    """``(w3, b3, w5, b5, w7, b7) -> (K, bias)`` as one autograd node; backward slices ``dK`` back:
    dK7 = dK/3, dK5 = centre5(dK)/3, dK3 = centre3(dK)/3, each db = dbias/3."""

    @staticmethod
    def forward(ctx, w3, b3, w5, b5, w7, b7, dtype, backend):
        ctx.dtypes = (w3.dtype, b3.dtype, w5.dtype, b5.dtype, w7.dtype, b7.dtype)
        return merge(w3, b3, w5, b5, w7, b7, dtype, backend == "triton" and not torch.compiler.is_compiling())

    @staticmethod
    def backward(ctx, dK, dbias):
        return split_kernel_grads(dK, dbias, ctx.dtypes) + (None, None)


def merge(w3, b3, w5, b5, w7, b7, dtype, use_triton):
    """The merge without autograd: one Triton launch when ``use_triton``, for float32 (float64 weights
    take the exact PyTorch merge)."""
    return (_merge_triton if use_triton and dtype == torch.float32 else _merge_torch)(w3, b3, w5, b5, w7, b7, dtype)


def split_kernel_grads(dK, dbias, dtypes):
    """``(dw3, db3, dw5, db5, dw7, db7)`` from the merged kernel's (49, d) ``dK`` and ``dbias``, each in
    its weight's dtype from ``dtypes``: dK7 = dK/3, dK5 = centre5(dK)/3, dK3 = centre3(dK)/3, db = dbias/3."""
    d = dK.shape[1]
    dK = dK.t().reshape(d, 1, KSIZE, KSIZE) / 3.0
    db = dbias / 3.0
    grads = (dK[..., 2:5, 2:5], db, dK[..., 1:6, 1:6], db, dK, db)
    return tuple(cast(g, t) for g, t in zip(grads, dtypes))


def merge_kernels(w3, b3, w5, b5, w7, b7, dtype: torch.dtype = torch.float32, backend: str = "torch"):
    """The merged taps-major (49, d) kernel ``delta + (pad(K3) + pad(K5) + K7) / 3`` and its bias, by
    one Triton launch on backend ``'triton'``, else by PyTorch's ops."""
    return MergeKernels.apply(w3, b3, w5, b5, w7, b7, dtype, backend)


def check_dwconv_params(d: int, like: torch.Tensor, **params):
    for name, p in params.items():
        if name.startswith("w"):
            k = int(name[1:])
            check_tensor(name, p, size=(d, 1, k, k), like=like)
        else:
            check_tensor(name, p, size=(d,), like=like)


@on_input_device
def multiscale_dwconv(h, w3, b3, w5, b5, w7, b7, backend: str | None = None):
    """``h + (dw3(h) + dw5(h) + dw7(h)) / 3`` for channels-last ``h`` of shape (B, H, W, d), in one pass.

    Weights have the shapes of ``nn.Conv2d(d, d, k, groups=d)``: (d, 1, k, k) and (d,).
    """
    check_tensor("h", h, ndim=4)
    check_tensor("w7", w7, ndim=4, like=h)
    d = w7.shape[0]
    if h.shape[-1] != d:
        hint = " (it looks channels-first: pass h.permute(0, 2, 3, 1))" if h.shape[1] == d else ""
        raise ValueError(f"h must be channels-last (B, H, W, d) with d={d} channels, as the conv weights have; "
                         f"got shape {tuple(h.shape)}{hint}")
    check_dwconv_params(d, h, w3=w3, b3=b3, w5=w5, b5=b5, w7=w7, b7=b7)
    name = backends.resolve(h.device, backend)
    K, bias = merge_kernels(w3, b3, w5, b5, w7, b7, dtype=acc_dtype(h.dtype), backend=name)
    return DWConv7Function.apply(h.contiguous(), K, bias, name)
