"""Helpers shared by every op: input checks, contiguity, block sizes and dtype maps."""
from __future__ import annotations

import functools
import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """True when Triton runs its kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def tl_acc(dtype: torch.dtype):
    """:func:`acc_dtype` as a Triton dtype, for the kernels' ``ACC`` constexpr."""
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without a dispatcher call when it already is ``dtype`` (host time counts)."""
    return t if t.dtype == dtype else t.to(dtype)


def _current_raw_stream():
    """The current CUDA stream's handle, as Triton's own launcher obtains it."""
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())


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


def call_op(op, impl, *args):
    """Run ``impl`` directly in eager mode (no dispatcher overhead per call); while torch.compile
    traces, call the registered custom ``op`` so that the graph holds it as one opaque node."""
    return (op if torch.compiler.is_compiling() else impl)(*args)


def _launch_hooks():
    """Triton's launch enter/exit hooks (profilers set them), passed on to every launch."""
    from triton import knobs
    return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook


class _NotCacheable(Exception):
    pass


# Set MONA_KERNELS_FAST_LAUNCH=0 to send every launch through Triton's own dispatcher.
_FAST_LAUNCH = os.environ.get("MONA_KERNELS_FAST_LAUNCH", "1") != "0"


class Launcher:
    """``Launcher(kernel)[grid](*args, **constexprs)`` launches a ``@triton.jit`` kernel like
    ``kernel[grid](...)``; after the first call for a specialisation it calls the compiled kernel
    directly, skipping Triton's per-call binding and cache lookup (tens of microseconds of host time
    per launch, which the adapter pays about twenty times per step).

    The cache key is at least as fine as Triton's own: the device, every constexpr and option, each
    tensor's dtype and 16-byte alignment, the exact value of every specialised integer, and the
    32/64-bit width of the others. So the kernel it calls is the one Triton would have chosen.
    Anything it cannot key (an unknown argument type, the interpreter) takes Triton's path, and a
    Triton whose compiled kernels launch differently turns the fast path off for the process.
    """

    _disabled = not _FAST_LAUNCH
    stats = {"fast": 0, "triton": 0, "uncacheable": 0}  # launch counts, for diagnosis

    def __init__(self, fn):
        self.fn = fn
        params = getattr(fn, "params", None) or []  # the interpreter's functions have none
        self.params = [(p.name, p.is_constexpr, p.do_not_specialize) for p in params]
        self.names = {p.name for p in params}
        self.cache = {}

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _key(self, args, kwargs):
        full = list(args)
        for name, _, _ in self.params[len(args):]:
            if name not in kwargs:
                raise _NotCacheable
            full.append(kwargs[name])
        key = []
        for (_, constexpr, nospec), a in zip(self.params, full):
            if constexpr:  # Triton dtypes need not be hashable: key them by name
                key.append(a if isinstance(a, (bool, int, float, str, type(None))) else (type(a).__name__, str(a)))
            elif isinstance(a, torch.Tensor):
                key.append((a.dtype, a.data_ptr() % 16 == 0))
            elif isinstance(a, bool) or a is None:
                key.append(a)
            elif isinstance(a, int):
                key.append((-2**31 <= a < 2**31, a >= 2**63) if nospec else ("int", a))
            elif isinstance(a, float):
                key.append(float)
            else:
                raise _NotCacheable
        key.append(torch.cuda.current_device())  # Triton compiles and launches for the current device
        key.extend(sorted((k, v) for k, v in kwargs.items() if k not in self.names))
        return tuple(key), full

    def _launch(self, grid, *args, **kwargs):
        if Launcher._disabled or interpreting() or not self.params:
            return self.fn[grid](*args, **kwargs)
        try:
            key, full = self._key(args, kwargs)
            kernel = self.cache.get(key)
        except (_NotCacheable, TypeError):  # TypeError: an unhashable argument
            Launcher.stats["uncacheable"] += 1
            return self.fn[grid](*args, **kwargs)
        if kernel is None:
            Launcher.stats["triton"] += 1
            kernel = self.fn[grid](*args, **kwargs)
            if len(self.cache) >= 256:
                self.cache.clear()
            self.cache[key] = kernel
            return kernel
        g = tuple(grid) + (1, 1)
        stream = _current_raw_stream()
        try:  # exactly what Triton's own launch does once it has found the kernel
            enter, leave = _launch_hooks()
            meta = kernel.launch_metadata(g, stream, *full) if enter is not None else None
            kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *full)
        except (TypeError, AttributeError, ImportError) as err:  # a Triton whose kernels launch differently
            Launcher._disabled = True
            Launcher.stats["disabled_by"] = repr(err)
            return self.fn[grid](*args, **kwargs)
        Launcher.stats["fast"] += 1
        return kernel
