"""Multi-scale depthwise conv with averaging, ``h + (dw3(h) + dw5(h) + dw7(h)) / 3``, as ONE 7x7 pass.

The three convs and the identity are linear in ``h``, so they merge into one 7x7 depthwise kernel
``K = delta + (pad(K3) + pad(K5) + K7) / 3`` with bias ``(b3 + b5 + b7) / 3``; the merge is plain,
differentiable PyTorch, so the gradients of the six weights and biases follow from ``dK``/``dbias``.

This file holds the op's argument checks, its autograd and its registered operators; each backend's
conv and kernel gradient are in its plan (``dwconv7_fwd`` and ``dwconv7_wgrad`` of
:mod:`mona_kernels.backends`).

Layout contract: ``h``/``out``/``dout``/``dh`` are channels-last (B, H, W, d) in the input dtype;
``K`` is taps-major (49, d), tap ``u * 7 + v``, in the accumulation dtype like ``bias`` (d,).
"""
from __future__ import annotations

import torch

from .. import backends
from .utils import acc_dtype, cast, call_op, check_pixels, check_tensor, on_input_device, traced

KSIZE = 7
TAPS = KSIZE * KSIZE


def _dwconv7_fwd(h: torch.Tensor, K: torch.Tensor, bias: torch.Tensor, backend: str) -> torch.Tensor:
    """Channels-last (B, H, W, d) ``h`` convolved with the merged taps-major (49, d) kernel."""
    return backends.plan(backend).dwconv7_fwd(h, K, bias)


dwconv7_fwd = torch.library.custom_op("mona_kernels::dwconv7_fwd", _dwconv7_fwd, mutates_args=())


@dwconv7_fwd.register_fake
def _(h, K, bias, backend):
    return torch.empty_like(h)


def _dwconv7_bwd(dout: torch.Tensor, h: torch.Tensor, K: torch.Tensor,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh, dKb)``: dh is the conv of dout with the flipped kernel; dKb (50, d) in K's dtype holds
    dK in rows 0..48 and the bias gradient in row 49."""
    plan = backends.plan(backend)
    return plan.dwconv7_fwd(dout, K, None, flip=True), cast(plan.dwconv7_wgrad(h, dout), K.dtype)


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
    """The PyTorch plan's merge, in ``dtype`` and taps-major (49, d)."""
    K, bias = backends.pytorch.merged_kernel(*(t.to(dtype) for t in (w3, b3, w5, b5, w7, b7)))
    return K.reshape(K.shape[0], TAPS).t().contiguous(), bias


class MergeKernels(torch.autograd.Function):
    """``(w3, b3, w5, b5, w7, b7) -> (K, bias)`` as one autograd node; backward slices ``dK`` back:
    dK7 = dK/3, dK5 = centre5(dK)/3, dK3 = centre3(dK)/3, each db = dbias/3."""

    @staticmethod
    def forward(ctx, w3, b3, w5, b5, w7, b7, dtype, backend):
        ctx.dtypes = (w3.dtype, b3.dtype, w5.dtype, b5.dtype, w7.dtype, b7.dtype)
        return merge(w3, b3, w5, b5, w7, b7, dtype, backend == "triton" and not traced())

    @staticmethod
    def backward(ctx, dK, dbias):
        return split_kernel_grads(dK, dbias, ctx.dtypes) + (None, None)


def merge(w3, b3, w5, b5, w7, b7, dtype, use_triton):
    """The merge without autograd: one Triton launch when ``use_triton``, for float32 (float64 weights
    take the exact PyTorch merge)."""
    if use_triton and dtype == torch.float32:
        return backends.triton.dwconv.merge_kernels(w3, b3, w5, b5, w7, b7)
    return _merge_torch(w3, b3, w5, b5, w7, b7, dtype)


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
    check_pixels("h", h.shape[0] * h.shape[1] * h.shape[2])
    name = backends.resolve(h.device, backend)
    if name == "torch":  # autograd through PyTorch's own ops: no kernels of its own to join
        return backends.pytorch.multiscale_dwconv(h, w3, b3, w5, b5, w7, b7)
    K, bias = merge_kernels(w3, b3, w5, b5, w7, b7, dtype=acc_dtype(h.dtype), backend=name)
    return DWConv7Function.apply(h.contiguous(), K, bias, name)
