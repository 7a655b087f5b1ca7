"""Helpers shared by every op: input checks, contiguity, block sizes and dtype maps."""
from __future__ import annotations

import functools
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """True when Triton runs its kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a, b):
    """``ceil(a / b)`` for non-negative integers, symbolic ones included: plain arithmetic, because
    ``triton.cdiv`` goes through Triton's JIT call path (about 5 us a call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_tensor(name: str, t, ndim: int | None = None, size: tuple | None = None, like=None):
    """Raise a clear ``TypeError``/``ValueError`` naming ``name`` when ``t`` is unusable."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(t.shape)}")
    if size is not None and tuple(t.shape) != tuple(size):
        raise ValueError(f"{name} must have shape {tuple(size)}, got {tuple(t.shape)}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")


def _as_float(value):
    """``value`` as a float where it is a number (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_eps(eps) -> float:
    """``eps`` as a float, or a clear ``ValueError``: a negative one makes rsqrt(var + eps) NaN for
    every token whose variance is under |eps|."""
    value = _as_float(eps)
    if value is None or not value >= 0.0:  # not >=: NaN too
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return value


def check_dropout(p) -> float:
    """The dropout probability ``p`` as a float, or a clear ``ValueError``: the kernels scale kept
    activations by 1 / (1 - p), so p must be under 1."""
    value = _as_float(p)
    if value is None or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p!r}")
    return value


# Pixels (B * H * W) the fused kernels take: they find a pixel's row and column in 32-bit integers.
MAX_PIXELS = 2**31 - 4096


def check_pixels(name: str, n: int):
    """Raise a clear ``ValueError`` naming ``name`` when its ``n`` pixels are more than the kernels index."""
    if n > MAX_PIXELS:
        raise ValueError(f"{name} has B*H*W = {n} pixels; the fused kernels take at most {MAX_PIXELS}")


def tl_acc(dtype: torch.dtype):
    """:func:`acc_dtype` as a Triton dtype, for the kernels' ``ACC`` constexpr."""
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without a dispatcher call when it already is ``dtype`` (host time counts)."""
    return t if t.dtype == dtype else t.to(dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 stays float64, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_workers(device: torch.device, per_sm: int = 4) -> int:
    """How many persistent programs to launch for a grid-stride reduction."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    return 4


def on_input_device(fn):
    """Runs ``fn`` with its first argument's GPU as the current device: Triton launches on the current
    device, and the caller's may be another GPU. (The autograd engine runs each backward on its
    gradients' device already.)"""
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        if (not torch.compiler.is_compiling() and isinstance(x, torch.Tensor) and x.is_cuda
                and x.get_device() != torch.cuda.current_device()):
            with torch.cuda.device(x.device):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)
    return wrapper


def traced() -> bool:
    """Whether this call is being traced (torch.compile, or a dispatch mode such as fake tensors or
    export) rather than run eagerly: traced calls go through the registered operators, eager ones
    straight to the kernels."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def call_op(op, impl, *args):
    """Run ``impl`` directly in eager mode (no dispatcher overhead per call); while traced, call the
    registered custom ``op`` so that the graph holds it as one opaque node."""
    return (op if traced() else impl)(*args)
