"""CUDA graphs for eager calls of the Triton path: captured problems, least recently used out.

An eager adapter call launches about twenty kernels with Python between them, which costs more host
time than the GPU spends at most SPEC shapes. For a problem seen before, the adapter instead copies
its inputs into static buffers, replays a graph captured over them, and copies the results out
(see ``mona_adapter.AdapterGraphs``). The CUDA extension keeps its own cache in C++ with the same
rules; ``MONA_KERNELS_CUDA_GRAPHS`` sizes both.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict

import torch

DEFAULT_CAPACITY = 8


def _capacity_from_env() -> int:
    raw = os.environ.get("MONA_KERNELS_CUDA_GRAPHS", str(DEFAULT_CAPACITY))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"MONA_KERNELS_CUDA_GRAPHS must be an int >= 0, got {raw!r}")
    return value


class GraphCache:
    """Entries keyed by problem. A key is captured the second time it is seen, so that shapes met
    once (a detector's odd last batch) cost no capture; ``lock`` serialises use of the static buffers."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()
        self.seen: OrderedDict = OrderedDict()
        self.failed: set = set()
        self.lock = threading.Lock()

    def get(self, key):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def seen_before(self, key) -> bool:
        """Records a sighting of ``key``; True from the second on (while the cache has room to keep it)."""
        if self.capacity == 0 or key in self.failed:
            return False
        if key in self.seen:
            self.seen.move_to_end(key)
            return True
        self.seen[key] = None
        if len(self.seen) > 4 * self.capacity:
            self.seen.popitem(last=False)
        return False

    def add(self, key, entry):
        self.entries[key] = entry
        self._evict()

    def resize(self, capacity: int) -> int:
        previous, self.capacity = self.capacity, capacity
        self._evict()
        if capacity == 0:  # off forgets every sighting and failure too
            self.seen.clear()
            self.failed.clear()
        return previous

    def _evict(self):
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def give_up(self, key, err: Exception):
        """A problem that failed to capture runs directly from now on; says so once."""
        self.entries.pop(key, None)
        self.failed.add(key)
        warnings.warn(f"mona_kernels: CUDA graph capture failed, running this problem directly: {err}",
                      RuntimeWarning, stacklevel=3)


CACHE = GraphCache(_capacity_from_env())


def graph_cache(capacity: int | None = None) -> int:
    """The capacity of the Triton path's graph cache (entries, each one problem; 0: off); sets it when
    ``capacity`` is given (fewer entries drops the least recently used) and returns the previous one."""
    if capacity is None:
        return CACHE.capacity
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
    with CACHE.lock:
        return CACHE.resize(capacity)


# Tensors of at least this many bytes are copied on their own (a memcpy), the rest by one foreach
# launch per dtype. Same-run A/B (benchmarks/ab_staging.py, eager fwd+bwd, bf16): copying the 34 MB
# tokens alone took 3.4% off at COCO stage 1 with a 16 MB threshold (run 61) and 2.0% with this one
# (run 62), where the GPU sets the pace; at 25.7 MB (Swin stage 1, 32 images) the extra launches
# cost host time and the step took 5% longer (run 61). Below the threshold one launch for many
# tensors costs the least host time.
LARGE_COPY_BYTES = 32 << 20


def _split(statics):
    """``(large, groups)``: the positions of the tensors copied alone, and ``[(tensors, positions)]``
    for the rest, one per dtype (the foreach ops take their one-launch path only when every tensor of
    a list has the same dtype)."""
    large, groups = [], {}
    for i, t in enumerate(statics):
        if t.numel() * t.element_size() >= LARGE_COPY_BYTES:
            large.append(i)
        else:
            groups.setdefault(t.dtype, []).append(i)
    return large, [([statics[i] for i in index], index) for index in groups.values()]


class Staging:
    """Copies a fixed list of sources into static buffers: each large one by ``copy_``, the rest by one
    ``_foreach_copy_`` per dtype."""

    def __init__(self, statics):
        self.statics = statics
        self.large, self.groups = _split(statics)

    def __call__(self, sources):
        for i in self.large:
            self.statics[i].copy_(sources[i])
        for statics, index in self.groups:
            torch._foreach_copy_(statics, [sources[i] for i in index])


class CopyOut:
    """Fresh copies of a fixed list of static buffers: each large one by ``clone``, the rest by one
    foreach launch per dtype. There the copy is a multiplication by one, exact in every floating dtype
    (infinities and signed zeros included; a NaN stays a NaN, its sign and payload need not): a
    ``clone`` costs a separate allocation and memcpy call per tensor, host time that the small shapes
    feel."""

    def __init__(self, statics):
        self.statics = statics
        self.large, self.groups = _split(statics)
        self.n = len(statics)

    def __call__(self):
        out = [None] * self.n
        for i in self.large:
            out[i] = self.statics[i].clone()
        for statics, index in self.groups:
            for i, t in zip(index, torch._foreach_mul(statics, 1.0)):
                out[i] = t
        return out


_side_streams: dict = {}


def side_stream(device: int) -> torch.cuda.Stream:
    """The stream on which captures run and warm up, one per device for the process (the
    benchmark's captures too): PyTorch keeps a cuBLAS workspace (32 MiB on Hopper) for each stream a
    GEMM has run on, so a new stream per capture would leave one behind each time."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def capture(body, pool=None):
    """``(graph, outputs)``: runs ``body()`` once on a side stream (Triton compiles, cuBLAS takes its
    workspace), then captures a second run. The current stream waits for both."""
    device = torch.cuda.current_device()
    side = side_stream(device)
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            body()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                outputs = body()
            except BaseException:
                try:
                    graph.capture_end()
                except RuntimeError:
                    pass  # the capture was invalidated; the body's own error says why
                raise
            graph.capture_end()
    finally:
        current.wait_stream(side)
    return graph, outputs
