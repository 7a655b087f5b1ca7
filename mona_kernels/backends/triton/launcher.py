"""The fast launcher every Triton plan kernel goes through in eager calls (torch.compile launches
them itself, through ``torch.library.wrap_triton``)."""
from __future__ import annotations

import functools
import os

import torch

from ...ops.utils import interpreting


def _current_raw_stream(device: int):
    """The current CUDA stream's handle on ``device``, as Triton's own launcher obtains it."""
    return torch._C._cuda_getCurrentRawStream(device)


_knobs = None


def _launch_hooks():
    """Triton's launch enter/exit hooks (profilers set them), passed on to every launch."""
    global _knobs
    if _knobs is None:
        from triton import knobs
        _knobs = knobs
    return _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook


class _NotCacheable(Exception):
    pass


_PLAIN = (bool, int, float, str, type(None))  # constexpr values keyed as they are


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
        # Every kernel launched here has its runtime parameters first and its constexprs after them;
        # a call is keyed in that order (others take Triton's path).
        runtime = [(name, nospec) for name, constexpr, nospec in self.params if not constexpr]
        leading = all(not c for _, c, _ in self.params[:len(runtime)])
        self.runtime = tuple(name for name, _ in runtime)
        self.nospec = tuple(nospec for _, nospec in runtime) if leading else None
        self.constexprs = tuple(name for name, constexpr, _ in self.params if constexpr)
        # Whether Triton interprets this function: triton.jit decided that when it was applied.
        self.interpreted = not self.params or interpreting()
        self.cache = {}

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _key(self, args, kwargs):
        """``(key, arguments in signature order)``; raises _NotCacheable for what it cannot key. The
        keywords are keyed in the order given: a call site that orders them differently only adds a
        cache entry."""
        if self.nospec is None:  # a constexpr among the runtime parameters
            raise _NotCacheable
        n = len(self.nospec)
        if len(args) != n:  # put runtime arguments given by keyword, or constexprs by position, in place
            kwargs = {**dict(zip(self.constexprs, args[n:])), **kwargs}
            try:
                args = (*args[:n], *[kwargs.pop(name) for name in self.runtime[len(args):]])
            except KeyError:
                raise _NotCacheable from None
        # Triton dtypes need not be hashable: key them by name
        key = [tuple((k, v if v.__class__ in _PLAIN else (type(v).__name__, str(v))) for k, v in kwargs.items())]
        append = key.append
        for a, nospec in zip(args, self.nospec):
            cls = a.__class__
            if cls is int:
                append((-2**31 <= a < 2**31, a >= 2**63) if nospec else ("int", a))
            elif cls is float:
                append(float)
            elif a is None or cls is bool:
                append(a)
            elif isinstance(a, torch.Tensor):
                append(a.dtype)
                append(a.data_ptr() % 16 == 0)
            else:
                raise _NotCacheable
        try:
            full = (*args, *[kwargs[name] for name in self.constexprs])
        except KeyError:  # a constexpr left to its default: Triton binds it
            raise _NotCacheable from None
        return tuple(key), full

    def _launch(self, grid, *args, **kwargs):
        if Launcher._disabled or self.interpreted:
            return self.fn[grid](*args, **kwargs)
        try:
            device = torch.cuda.current_device()  # Triton compiles and launches for the current device
            key, full = self._key(args, kwargs)
            key = (key, device)
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
        stream = _current_raw_stream(device)
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
