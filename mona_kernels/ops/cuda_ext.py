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


def ln_scale_fwd(x, w, b, gamma, gammax, eps):
    return tuple(load().ln_scale_fwd(x, w, b, gamma, gammax, eps))


def ln_scale_bwd(dy, x, w, b, gamma, gammax, mean, rstd, residual=None):
    dx, dparams = load().ln_scale_bwd(dy.to(x.dtype).contiguous(), x, w, b, gamma, gammax, mean, rstd, residual)
    if residual is not None:  # the same contract as the other backends: a fifth row, sum of residual
        dparams = torch.cat([dparams, residual.sum(0, dtype=dparams.dtype)[None]])
    return dx, dparams


def dwconv7_fwd(h, K, bias):
    return load().dwconv7_fwd(h.contiguous(), K, bias)


def dwconv7_wgrad(h, dout):
    return load().dwconv7_wgrad(h.contiguous(), dout.contiguous())
