"""The CUDA plan: the csrc kernels for GPUs where Triton does not run (Turing, or no Triton). Its
operators (``torch.ops.mona_kernels.cuda_*``) are registered from C++ with TORCH_LIBRARY, so that
torch.compile sees each with no graph break; here they get their shapes for tracing and the adapter
its autograd.

The extension is the prebuilt ``mona_kernels._C`` when setup.py built it, otherwise built once on
first use with ninja (``torch.utils.cpp_extension.load``) and cached by torch.
"""
from __future__ import annotations

import os
import sys

import torch

from . import make_differentiable

# Widest row the CUDA LN-scaling kernels take (csrc: ln_max_channels).
MAX_CHANNELS = 2048

_LOADED: list = []  # the extension module, then the adapter made differentiable


def load():
    """The extension module, with its operators registered; raises ``RuntimeError`` saying why it
    cannot be had."""
    if not _LOADED:
        module = _import_or_build()
        _LOADED.extend([module, _register()])
    return _LOADED[0]


def _import_or_build():
    try:
        from .. import _C  # built by setup.py
        return _C
    except ImportError:
        pass
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA support")
    from torch.utils import cpp_extension
    from .. import _build
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME) to build the CUDA extension")
    missing = [s for s in _build.SOURCES if not (_build.CSRC / s).exists()]
    if missing:
        raise RuntimeError(f"the CUDA sources {missing} are not in {_build.CSRC}")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    print("mona_kernels: building the CUDA extension on first use (cached afterwards)...", file=sys.stderr)
    return cpp_extension.load(name="mona_kernels_cuda", sources=[str(_build.CSRC / s) for s in _build.SOURCES],
                              extra_cuda_cflags=_build.NVCC_FLAGS, verbose=False)


def _register():
    """Fake shapes of every operator, and the adapter made differentiable (returned)."""
    ops = torch.ops.mona_kernels
    fake = torch.library.register_fake

    @fake("mona_kernels::cuda_ln_scale_fwd")
    def _(x, w, b, gamma, gammax, eps):
        return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0],
                                                                                                dtype=torch.float32)

    @fake("mona_kernels::cuda_ln_scale_bwd")
    def _(dy, x, w, b, gamma, gammax, mean, rstd, residual):
        return torch.empty_like(x), x.new_empty((4 if residual is None else 5, x.shape[1]), dtype=torch.float32)

    @fake("mona_kernels::cuda_dwconv7_fwd")
    def _(h, K, bias, flip, variant):
        return torch.empty_like(h)

    @fake("mona_kernels::cuda_dwconv7_wgrad")
    def _(h, dout, variant):
        return h.new_empty((50, h.shape[-1]), dtype=torch.float32)

    @fake("mona_kernels::cuda_gelu_dropout_bwd")
    def _(da, h3, seed, p):
        return torch.empty_like(h3), h3.new_empty(h3.shape[1], dtype=torch.float32)

    @fake("mona_kernels::cuda_adapter_fwd")
    def _(x, params, seed, H, W, eps, p, compute_dtype):
        M, d = x.shape[0], params[4].shape[0]
        mean = x.new_empty(M, dtype=torch.float32)
        return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, compute_dtype)),
                x.new_empty((M, d), dtype=compute_dtype), mean, torch.empty_like(mean))

    @fake("mona_kernels::cuda_adapter_bwd")
    def _(g, x, h1, mean, rstd, params, seed, H, W, eps, p):
        return [torch.empty_like(x)] + [torch.empty_like(q) for q in params]

    return make_differentiable(ops.cuda_adapter_fwd.default, backward)


def _check_channels(x):
    if x.shape[-1] > MAX_CHANNELS:
        raise ValueError(f"x has {x.shape[-1]} channels; the CUDA backend takes at most {MAX_CHANNELS} "
                         "(use backend='triton' or 'torch')")


def adapter():
    """The plan's adapter, differentiable (loads the extension)."""
    load()
    return _LOADED[1]


def backward(g, x, saved, params, seed, H, W, eps, p):
    h1, mean, rstd = saved
    grads = torch.ops.mona_kernels.cuda_adapter_bwd(g, x, h1, mean, rstd, params, seed, H, W, eps, p)
    return grads[0], grads[1:]


def ln_scale_fwd(x, w, b, gamma, gammax, eps):
    _check_channels(x)
    load()
    return tuple(torch.ops.mona_kernels.cuda_ln_scale_fwd(x, w, b, gamma, gammax, eps))


def ln_scale_bwd(dy, x, w, b, gamma, gammax, mean, rstd, residual=None):
    """``(dx, rows)``: rows (4, C), or (5, C) with the residual's column sums when it is given."""
    _check_channels(x)
    load()
    return tuple(torch.ops.mona_kernels.cuda_ln_scale_bwd(dy.to(x.dtype).contiguous(), x, w, b, gamma, gammax,
                                                          mean, rstd, residual))


# `variant` picks a tiling of the conv / wgrad kernel (csrc: dwconv7_fwd / dwconv7_wgrad); a negative one,
# the adapter's, is chosen by the map's size, and every variant computes the same sums.
def dwconv7_fwd(h, K, bias, flip=False, variant=-1):
    load()
    return torch.ops.mona_kernels.cuda_dwconv7_fwd(h.contiguous(), K, bias, flip, variant)


def dwconv7_wgrad(h, dout, variant=-1):
    load()
    return torch.ops.mona_kernels.cuda_dwconv7_wgrad(h.contiguous(), dout.contiguous(), variant)


def dropout_scale(seed: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) the CUDA plan applies to each element of (M, d) ``like``
    for ``seed`` (one int64 on like's device), from the GELU backward: gelu'(10) is 1 to float64
    precision, so dh3 is the mask."""
    load()
    h = torch.full_like(like, 10.0)
    dh3, _ = torch.ops.mona_kernels.cuda_gelu_dropout_bwd(torch.ones_like(like), h, seed, p)
    return dh3
