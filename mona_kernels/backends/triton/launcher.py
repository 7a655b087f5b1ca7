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
        # The plan's kernels take their runtime arguments by position, all before the constexprs,
        # which come by keyword: such a call is keyed by _key_positional, any other by _key.
        runtime = [nospec for _, constexpr, nospec in self.params if not constexpr]
        leading = all(not c for _, c, _ in self.params[:len(runtime)])
        self.nospec = tuple(runtime) if leading else None
        self.constexprs = tuple(name for name, constexpr, _ in self.params if constexpr)
        # Whether Triton interprets this function: triton.jit decided that when it was applied.
        self.interpreted = not self.params or interpreting()
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
        key.extend(sorted((k, v) for k, v in kwargs.items() if k not in self.names))
        return tuple(key), full

    def _key_positional(self, args, kwargs):
        """_key for a call with every runtime argument by position and only constexprs and options
        by keyword (every launch of the plan), in 70% of its host time: the keywords are keyed in the
        order given, so a call site that orders them differently only adds a cache entry."""
        key = [tuple(kwargs.items())]
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
            if self.nospec is not None and len(args) == len(self.nospec):
                key, full = self._key_positional(args, kwargs)
            else:
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
