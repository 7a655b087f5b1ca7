"""The backends: the one place where a call's backend is chosen, the parameters every plan takes, and
the fused adapter's one autograd registration.

``auto`` takes Triton on GPUs that run it (compute capability 8.0 and newer) and on the CPU when
``TRITON_INTERPRET=1``; the compiled CUDA extension (``cuda``) on other GPUs (Turing, or no Triton),
building it on first use if setup.py did not; and PyTorch everywhere else (the CPU, or a GPU where
the extension cannot be had). ``MONA_KERNELS_BACKEND=triton|cuda|torch`` or a ``backend=`` argument
forces one, with a clear error if it is unavailable.

A backend is a plan of the whole adapter (its forward and backward), one module or package each:

    triton   backends/triton/    six Triton kernels, registered with torch.library.triton_op
    cuda     backends/cuda.py    the csrc kernels, registered from C++ with TORCH_LIBRARY
    torch    backends/pytorch.py autograd through PyTorch's own ops (the CPU path)

The Triton and CUDA plans expose the same two operators, a forward
``(x, params, seed, H, W, eps, p, compute_dtype) -> (out, *saved)`` and a backward, and
:func:`make_differentiable` joins them, the same way for both.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..ops.utils import interpreting, traced

BACKENDS = ("auto", "triton", "cuda", "torch")


class Params(NamedTuple):
    """The adapter's sixteen parameters, in the order of the authors' state_dict."""
    w_ln: Tensor     # norm.weight (C)
    b_ln: Tensor     # norm.bias (C)
    gamma: Tensor    # (C)
    gammax: Tensor   # (C)
    W1: Tensor       # project1.weight (d, C)
    b1: Tensor       # project1.bias (d)
    w3: Tensor       # adapter_conv.conv1.weight (d, 1, 3, 3)
    b3: Tensor
    w5: Tensor       # adapter_conv.conv2.weight (d, 1, 5, 5)
    b5: Tensor
    w7: Tensor       # adapter_conv.conv3.weight (d, 1, 7, 7)
    b7: Tensor
    Wp: Tensor       # adapter_conv.projector.weight (d, d, 1, 1)
    bp: Tensor
    W2: Tensor       # project2.weight (C, d)
    b2: Tensor       # project2.bias (C)


# ---------------------------------------------------------------------------------------------
# Choosing the backend. Answers that do not change within a process are kept in a plain dict, not
# functools.lru_cache, which torch.compile traces only with a warning.
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


def _cuda_extension_error() -> Optional[str]:
    def probe():
        from . import cuda
        try:
            cuda.load()
        except Exception as err:  # any build or import failure means the backend is unavailable
            return f"the CUDA extension cannot be loaded or built: {err}"
        return None
    return _once("cuda_extension", probe)


def unavailable(backend: str, device: torch.device) -> Optional[str]:
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


def check_name(backend: Optional[str]) -> None:
    """A clear ``ValueError`` for a backend name that is none of :data:`BACKENDS` (None is ``'auto'``)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(device: torch.device, backend: Optional[str] = None) -> str:
    """The backend that runs a call on ``device``: ``'triton'``, ``'cuda'`` or ``'torch'``."""
    choice = backend if backend not in (None, "auto") else os.environ.get("MONA_KERNELS_BACKEND", "auto")
    check_name(choice)
    if choice != "auto":
        reason = unavailable(choice, device)
        if reason is not None:
            raise RuntimeError(f"backend {choice!r} is unavailable: {reason}")
        return choice
    for candidate in ("triton", "cuda"):
        if unavailable(candidate, device) is None:
            return candidate
    return "torch"


# ---------------------------------------------------------------------------------------------
# The fused adapter: each fused backend's forward operator, made differentiable here, once.
class Differentiable(NamedTuple):
    """A fused plan's adapter, differentiable: ``op`` its forward operator, ``forward`` the same forward
    as a plain function, ``backward`` its backward."""
    op: Callable
    forward: Callable
    backward: Callable


def make_differentiable(op, backward: Callable, forward: Optional[Callable] = None) -> Differentiable:
    """Joins a backend's adapter operator ``op(x, params, seed, H, W, eps, p, compute_dtype) ->
    (out, *saved)`` to its ``backward(g, x, saved, params, seed, H, W, eps, p) -> (dx, parameter
    gradients)``, which autograd calls with x, the dropout seed and what the plan chose to save for
    its backward (``saved``: the forward's other outputs, e.g. h1 and the row statistics).
    ``forward`` is the operator's function itself, where the plan has one in Python."""
    torch.library.register_autograd(op, functools.partial(_backward, backward), setup_context=_setup_context)
    return Differentiable(op, forward or op, backward)


def _save(ctx, x, seed, params, saved, problem):
    ctx.save_for_backward(x, seed, *params, *saved)
    ctx.n_params = len(params)
    ctx.problem = problem


def _run_backward(backward, ctx, g):
    x, seed, *rest = ctx.saved_tensors
    n = ctx.n_params
    return backward(g.contiguous(), x, rest[n:], rest[:n], seed, *ctx.problem)


def _setup_context(ctx, inputs, output):
    x, params, seed, H, W, eps, p, compute_dtype = inputs
    _, *saved = output
    _save(ctx, x, seed, params, saved, (H, W, eps, p))
    ctx.mark_non_differentiable(*saved)


def _backward(backward, ctx, g, *_):
    dx, grads = _run_backward(backward, ctx, g)
    return dx, list(grads), None, None, None, None, None, None


class _NotTwice(torch.autograd.Function):
    """Passes the gradients through, joined to the graph of ``g``: differentiating them again raises,
    as the registered operator does, instead of leaving their part out of a second derivative."""

    @staticmethod
    def forward(ctx, g, *values):
        return tuple(v.view_as(v) for v in values)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("the fused adapter's backward has no autograd formula, so it cannot be differentiated "
                           "again; use backend='torch' for a double backward")


class _EagerAdapter(torch.autograd.Function):
    """The registered operator's autograd, for eager calls: the same forward and backward, saving the
    same tensors, without the operator's dispatch, schema checks and argument flattening, which cost
    240 of 570 us of host time a forward+backward (a 1x8x8x128 adapter, kernels not launched, on a
    CPU of the CI's kind); eager steps are bound by that host time."""

    # Takes and returns (B, N, C): the (M, C) rows are made inside, where a reshape of x and a view of
    # out add no autograd nodes (each node costs the engine microseconds of host time).
    @staticmethod
    def forward(ctx, plan, x, seed, H, W, eps, p, compute_dtype, *params):
        B, N, C = x.shape
        tokens = x.reshape(B * N, C).contiguous()
        out, *saved = plan.forward(tokens, list(params), seed, H, W, eps, p, compute_dtype)
        _save(ctx, tokens, seed, params, saved, (H, W, eps, p))
        ctx.plan = plan
        return out.view(B, N, C)

    @staticmethod
    def backward(ctx, g):
        B, N, C = g.shape
        dx, grads = _run_backward(ctx.plan.backward, ctx, g.reshape(B * N, C))
        dx = dx.view(B, N, C)
        if torch.is_grad_enabled() and g.requires_grad:  # create_graph=True: tie them to g, and raise there
            dx, *grads = _NotTwice.apply(g, dx, *grads)
        return (None, dx, None, None, None, None, None, None, *grads)


def draw_seed(x: Tensor) -> Tensor:
    """The fused plans' dropout seed: one int64 drawn from torch's generator on x's device, where the
    kernels read it, so that every replay of a CUDA graph or a compiled step draws a new mask."""
    return torch.randint(0, 2**62, (1,), device=x.device)


def fused_adapter(plan: Differentiable, x: Tensor, params: Params, H: int, W: int, eps: float, p: float,
                  compute_dtype: torch.dtype) -> Tensor:
    """The adapter's output for tokens x (B, N, C) through a fused backend's plan: its registered
    operator while traced (torch.compile sees the kernels), the same functions directly in eager
    calls."""
    seed = draw_seed(x) if p > 0 else None
    params = [q.contiguous() for q in params]
    if not traced():
        return _EagerAdapter.apply(plan, x, seed, H, W, eps, p, compute_dtype, *params)
    B, N, C = x.shape
    return plan.op(x.reshape(B * N, C).contiguous(), params, seed, H, W, eps, p, compute_dtype)[0].view(B, N, C)


def adapter(name: str, x: Tensor, params: Params, H: int, W: int, eps: float, p: float,
            compute_dtype: torch.dtype) -> Tensor:
    """The adapter's output for tokens x (B, N, C), N = H * W, on backend ``name``."""
    if name == "triton" and params.W1.shape[0] > triton.MAX_D:
        name = "torch"  # the Triton plan holds d x d tiles on chip; wider bottlenecks take PyTorch's ops
    if name == "torch":
        return pytorch.adapter(x, params, H, W, eps, p)
    return fused_adapter(triton.ADAPTER if name == "triton" else cuda.adapter(), x, params, H, W, eps, p,
                         compute_dtype)


def plan(name: str):
    """Backend ``name``'s plan, its module. The fused plans (triton, cuda) have the standalone ops'
    kernels: ``ln_scale_fwd``, ``ln_scale_bwd``, ``dwconv7_fwd`` (``flip`` for the input gradient) and
    ``dwconv7_wgrad``; the PyTorch plan has the ops whole (``ln_scale``, ``multiscale_dwconv``)."""
    return {"triton": triton, "cuda": cuda, "torch": pytorch}[name]


def dropout_scale(name: str, seed: Tensor, like: Tensor, p: float) -> Tensor:
    """The dropout multiplier (0 or 1/(1-p)) backend ``name`` applies to each element of the (M, d)
    activations ``like`` for ``seed``. The Triton and CUDA plans draw the seed from torch's generator
    and regenerate the mask in the backward without storing it; the PyTorch plan draws the mask
    itself, as ``nn.Dropout`` does, and this is its mask after ``torch.manual_seed(seed)``."""
    return plan(name).dropout_scale(seed.to(like.device), like, p)


# The plans last: the fused ones register their operators with make_differentiable as they load.
from . import cuda, pytorch, triton  # noqa: E402
