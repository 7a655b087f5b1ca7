"""The one place where a backend is chosen for a call.

``auto`` takes Triton on GPUs that run it (compute capability 8.0 and newer) and on the CPU when
``TRITON_INTERPRET=1``; the compiled CUDA extension (``cuda``) on other GPUs (Turing, or no Triton),
building it on first use if setup.py did not; and PyTorch everywhere else (the CPU, or a GPU where
the extension cannot be had). ``MONA_KERNELS_BACKEND=triton|cuda|torch`` or a ``backend=`` argument
forces one, with a clear error if it is unavailable. The CUDA kernels passed the same GPU parity
tests as Triton's and a compute-sanitizer memcheck.
"""
from __future__ import annotations

import os

import torch

from .ops.utils import interpreting

BACKENDS = ("auto", "triton", "cuda", "torch")


# Answers that do not change within a process. A plain dict, not functools.lru_cache, which
# torch.compile traces only with a warning.
_KNOWN: dict = {}


def _once(key, compute):
    if key not in _KNOWN:
        _KNOWN[key] = compute()
    return _KNOWN[key]


def triton_available() -> bool:
    def probe():
        try:
            import triton.language  # noqa: F401
        except Exception:
            return False
        return True
    return _once("triton", probe)


def _triton_runs_on(index: int) -> bool:
    return _once(("capability", index), lambda: torch.cuda.get_device_capability(index) >= (8, 0))


def _cuda_extension_error() -> str | None:
    def probe():
        from .ops import cuda_ext
        try:
            cuda_ext.load()
        except Exception as err:  # any build or import failure means the backend is unavailable
            return f"the CUDA extension cannot be loaded or built: {err}"
        return None
    return _once("cuda_extension", probe)


def _can_run(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_available():
            return "Triton is not installed"
        if device.type == "cuda":
            return None if _triton_runs_on(device.index or 0) else "this GPU is older than compute capability 8.0"
        if device.type == "cpu":
            if not interpreting():
                return "CPU tensors need TRITON_INTERPRET=1 for Triton"
            return "torch.compile cannot trace the Triton interpreter" if torch.compiler.is_compiling() else None
        return f"Triton does not run on {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors, got {device.type}"
        return _cuda_extension_error()
    return f"unknown backend {backend!r}"


def resolve(device: torch.device, backend: str | None = None) -> str:
    """The backend that runs a call on ``device``: ``'triton'``, ``'cuda'`` or ``'torch'``."""
    choice = backend if backend not in (None, "auto") else os.environ.get("MONA_KERNELS_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice != "auto":
        reason = _can_run(choice, device)
        if reason is not None:
            raise RuntimeError(f"backend {choice!r} is unavailable: {reason}")
        return choice
    for candidate in ("triton", "cuda"):
        if _can_run(candidate, device) is None:
            return candidate
    return "torch"
