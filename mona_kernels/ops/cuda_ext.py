"""The compiled CUDA fallback: the prebuilt ``mona_kernels._C`` when setup.py built it, otherwise built
once on first use with ninja (``torch.utils.cpp_extension.load``) and cached by torch."""
from __future__ import annotations

import functools
import os
import sys

import torch


@functools.lru_cache(maxsize=None)
def load():
    """The extension module, or raises ``RuntimeError`` saying why it cannot be had."""
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


# Widest row the CUDA LN-scaling kernels take (csrc: ln_max_channels).
MAX_CHANNELS = 2048


def _check_channels(x):
    if x.shape[-1] > MAX_CHANNELS:
        raise ValueError(f"x has {x.shape[-1]} channels; the CUDA backend takes at most {MAX_CHANNELS} "
                         "(use backend='triton' or 'torch')")


def ln_scale_fwd(x, w, b, gamma, gammax, eps):
    _check_channels(x)
    return tuple(load().ln_scale_fwd(x, w, b, gamma, gammax, eps))


def ln_scale_bwd(dy, x, w, b, gamma, gammax, mean, rstd, residual=None):
    """``(dx, rows)``: rows (4, C), or (5, C) with the residual's column sums when it is given."""
    _check_channels(x)
    dx, rows = load().ln_scale_bwd(dy.to(x.dtype).contiguous(), x, w, b, gamma, gammax, mean, rstd, residual)
    return dx, (rows if residual is not None else rows[:4])


# `variant` picks a tiling of the conv / wgrad kernel (csrc: dwconv7_fwd / dwconv7_wgrad); -1 is the
# adapter's (`dwconv7_defaults`; unless set, chosen by the map's size: shared-memory tiles from
# 1024 pixels for the wgrad and 2048 for the conv, the faster side of each on an H200), and every variant computes
# the same sums.
def dwconv7_fwd(h, K, bias, flip=False, variant=-1):
    return load().dwconv7_fwd(h.contiguous(), K, bias, flip, variant)


def dwconv7_wgrad(h, dout, variant=-1):
    return load().dwconv7_wgrad(h.contiguous(), dout.contiguous(), variant)


def dwconv7_defaults(conv=-1, wgrad=-1):
    """The conv and wgrad variants the adapter uses (benchmarks/ tune them; graphs already captured keep
    theirs): sets those given (-2: chosen by the map's size, the default; -1: unchanged) and returns the
    previous ``(conv, wgrad)``."""
    return tuple(load().dwconv7_defaults(conv, wgrad))


def gelu_dropout_fwd(h3, seed, p):
    """gelu(h3) with dropout drawn from ``seed`` (a CPU int64 tensor) by the extension's own hash."""
    return load().gelu_dropout_fwd(h3.contiguous(), int(seed.item()), float(p))


def gelu_dropout_bwd(da, h3, seed, p):
    """``(dh3, dbp)`` for :func:`gelu_dropout_fwd`'s mask; dbp in fp32."""
    return tuple(load().gelu_dropout_bwd(da.to(h3.dtype).contiguous(), h3.contiguous(), int(seed.item()), float(p)))


def mona_adapter(x, bhw, w_ln, b_ln, gamma, gammax, W1, b1, w3, b3, w5, b5, w7, b7, Wp, bp, W2, b2, eps, p, seed,
                 compute_dtype):
    """The whole adapter on contiguous tokens ``x`` (..., C), B*H*W of them, with its forward and backward
    in C++ (one autograd node); returns x's shape. Weights as the reference names and shapes them,
    matmuls in ``compute_dtype``. ``seed`` is an int, or a one-element int64 tensor on x's device (drawn
    inside a CUDA-graph capture: the kernels read it at run time, so every replay draws a new mask)."""
    _check_channels(x)
    B, H, W = bhw
    seed_dev = seed if isinstance(seed, torch.Tensor) else None
    return load().mona_adapter(x, B, H, W, w_ln, b_ln, gamma, gammax, W1, b1, w3, b3, w5, b5, w7, b7, Wp, bp, W2, b2,
                               eps, p, 0 if seed_dev is not None else seed, seed_dev, compute_dtype)


def graph_cache(capacity=None):
    """The capacity of the CUDA backend's graph cache (entries, each one problem shape; 0: off); sets it
    when ``capacity`` is given (fewer entries drops the least recently used) and returns the previous one.
    The default, 8, comes from ``MONA_KERNELS_CUDA_GRAPHS`` when that is set."""
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
    return load().graph_cache(-1 if capacity is None else capacity)
