"""The Triton path's graph cache bookkeeping (ops/graphs.py): when a problem is captured, what is
evicted, and how the capacity is set. Capture and replay themselves are GPU tests (test_gpu.py)."""
import pytest
import torch

from mona_kernels.ops import graphs


def test_a_problem_is_captured_the_second_time_it_is_seen():
    cache = graphs.GraphCache(2)
    assert not cache.seen_before("a")
    assert cache.seen_before("a")
    assert not cache.seen_before("b")


def test_least_recently_used_entry_goes_first():
    cache = graphs.GraphCache(2)
    cache.add("a", 1)
    cache.add("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.add("c", 3)
    assert list(cache.entries) == ["a", "c"]
    assert cache.get("b") is None


def test_shrinking_evicts_and_zero_turns_the_cache_off():
    cache = graphs.GraphCache(3)
    for key in "abc":
        cache.seen_before(key)
        cache.add(key, key)
    assert cache.resize(1) == 3
    assert list(cache.entries) == ["c"]
    cache.resize(0)
    assert not cache.entries
    assert not cache.seen_before("a") and not cache.seen_before("a")  # off: nothing is ever captured
    cache.resize(2)
    assert not cache.seen_before("a")  # sightings before switching off are forgotten


def test_a_failed_capture_is_not_tried_again():
    cache = graphs.GraphCache(2)
    cache.seen_before("a")
    cache.add("a", 1)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        cache.give_up("a", RuntimeError("boom"))
    assert cache.get("a") is None
    assert not cache.seen_before("a") and not cache.seen_before("a")


@pytest.mark.parametrize("bad", [-1, 2.0, True, "8"])
def test_capacity_is_checked(bad):
    with pytest.raises(ValueError, match="capacity"):
        graphs.graph_cache(bad)


def test_capacity_round_trips():
    previous = graphs.graph_cache(3)
    try:
        assert graphs.graph_cache() == 3
    finally:
        graphs.graph_cache(previous)


@pytest.mark.parametrize("raw", ["-2", "eight"])
def test_bad_environment_value_names_the_variable(raw, monkeypatch):
    monkeypatch.setenv("MONA_KERNELS_CUDA_GRAPHS", raw)
    with pytest.raises(ValueError, match="MONA_KERNELS_CUDA_GRAPHS"):
        graphs._capacity_from_env()


def _buffers(seed):
    """Static buffers of mixed dtypes and sizes, two of them over a lowered large-copy threshold."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 8), (8,), (40, 2), (5,), (300, 8)]
    dtypes = [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32, torch.float16]
    return [torch.randn(s, generator=g).to(dt) for s, dt in zip(shapes, dtypes)]


@pytest.mark.parametrize("threshold", [1 << 40, 4096, 1])  # all foreach, mixed, all copied alone
def test_staging_copies_every_source_into_its_buffer(threshold, monkeypatch):
    monkeypatch.setattr(graphs, "LARGE_COPY_BYTES", threshold)
    statics = [torch.full_like(t, float("nan")) for t in _buffers(0)]  # poisoned
    sources = _buffers(1)
    sources[2][0, 0] = float("-inf")
    graphs.Staging(statics)(sources)
    for s, t in zip(statics, sources):
        assert s.dtype == t.dtype and torch.equal(s, t)


@pytest.mark.parametrize("threshold", [1 << 40, 4096, 1])
def test_copy_out_gives_fresh_exact_copies(threshold, monkeypatch):
    monkeypatch.setattr(graphs, "LARGE_COPY_BYTES", threshold)
    statics = _buffers(2)
    statics[0][0, 0], statics[2][1, 1], statics[3][0] = float("nan"), float("inf"), -0.0
    copy_out = graphs.CopyOut(statics)
    out = copy_out()
    for o, s in zip(out, statics):
        assert o.dtype == s.dtype and o.data_ptr() != s.data_ptr()
        assert torch.equal(o.nan_to_num(7.0), s.nan_to_num(7.0)) and torch.equal(o.isnan(), s.isnan())
        assert torch.equal(torch.signbit(o) & ~o.isnan(), torch.signbit(s) & ~s.isnan())  # -0.0 stays -0.0
    for s in statics:  # the next call's results must not change these
        s.fill_(3.0)
    assert not any(torch.equal(o, s) for o, s in zip(out, statics))
