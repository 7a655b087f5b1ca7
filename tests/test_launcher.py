"""The fast launch path: it must call exactly the kernel Triton would pick, with the arguments in
signature order, and fall back to Triton's own path whenever it cannot be sure. Runs on the CPU with
a stand-in kernel, since the fast path itself is only taken on a GPU."""
from types import SimpleNamespace

import pytest
import torch

from mona_kernels.backends.triton import launcher
from mona_kernels.backends.triton.launcher import Launcher


class FakeKernel:
    def __init__(self, log, tag):
        self.log, self.tag = log, tag
        self.function, self.packed_metadata = object(), object()

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *args):
        self.log.append(("fast", self.tag, (g0, g1, g2), stream, args))


class FakeJit:
    """Stands in for a JITFunction: f(x_ptr, y_ptr, n (not specialised), c, BLOCK: constexpr)."""

    def __init__(self):
        self.log = []
        self.compiled = 0
        P = SimpleNamespace
        self.params = [P(name="x_ptr", is_constexpr=False, do_not_specialize=False),
                       P(name="y_ptr", is_constexpr=False, do_not_specialize=False),
                       P(name="n", is_constexpr=False, do_not_specialize=True),
                       P(name="c", is_constexpr=False, do_not_specialize=False),
                       P(name="BLOCK", is_constexpr=True, do_not_specialize=False)]

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.compiled += 1
            self.log.append(("triton", grid, args, kwargs))
            return FakeKernel(self.log, self.compiled)
        return run


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launcher, "_current_raw_stream", lambda device: 77)
    monkeypatch.setattr(launcher, "_launch_hooks", lambda: (None, None))
    monkeypatch.setattr(Launcher, "_disabled", False)


def test_second_call_goes_straight_to_the_compiled_kernel(fake_gpu):
    fn = FakeJit()
    launch = Launcher(fn)
    x, y = torch.randn(64), torch.randn(64)
    launch[(3,)](x, y, 1000, 64, BLOCK=32, num_warps=4)
    launch[(5, 2)](x, y, 2000, 64, BLOCK=32, num_warps=4)  # n is not specialised: same kernel
    assert [e[0] for e in fn.log] == ["triton", "fast"]
    _, tag, grid, stream, args = fn.log[1]
    assert tag == 1 and grid == (5, 2, 1) and stream == 77
    assert args[:2] == (x, y) and args[2:] == (2000, 64, 32)  # constexprs in signature order


def test_arguments_by_keyword_or_constexprs_by_position_are_keyed_too(fake_gpu):
    fn = FakeJit()
    launch = Launcher(fn)
    x, y = torch.randn(64), torch.randn(64)
    launch[(1,)](x, y, 10, c=64, BLOCK=32)
    launch[(1,)](x, y, 20, c=64, BLOCK=32)
    launch[(1,)](x, y, 20, c=48, BLOCK=32)  # c is specialised
    launch[(1,)](x, y, 30, 48, 32)  # the constexpr by position: the same kernel as by keyword
    launch[(1,)](x, y, 40, 48, 64)  # another constexpr value
    assert [e[0] for e in fn.log] == ["triton", "fast", "triton", "fast", "triton"]
    assert fn.log[1][4] == (x, y, 20, 64, 32) and fn.log[3][4] == (x, y, 30, 48, 32)


@pytest.mark.parametrize("change", ["misaligned", "dtype", "specialised_int", "wide_int", "constexpr", "option"])
def test_anything_triton_specialises_on_takes_its_path(fake_gpu, change):
    fn = FakeJit()
    launch = Launcher(fn)
    x, y = torch.randn(64), torch.randn(64)
    launch[(1,)](x, y, 10, 64, BLOCK=32, num_warps=4)
    args, kw = [x, y, 10, 64], dict(BLOCK=32, num_warps=4)
    if change == "misaligned":
        args[0] = torch.randn(65)[1:]  # 4 bytes past an aligned allocation
    elif change == "dtype":
        args[1] = y.double()
    elif change == "specialised_int":
        args[3] = 48
    elif change == "wide_int":
        args[2] = 2**31
    elif change == "constexpr":
        kw["BLOCK"] = 64
    else:
        kw["num_warps"] = 8
    launch[(1,)](*args, **kw)
    assert [e[0] for e in fn.log] == ["triton", "triton"]


def test_missing_argument_or_launcher_mismatch_falls_back(fake_gpu):
    fn = FakeJit()
    launch = Launcher(fn)
    x = torch.randn(8)
    launch[(1,)](x, x, 1, 8)  # BLOCK omitted: cannot be keyed, Triton handles (and here: records)
    launch[(1,)](x, x, 1, 8)
    assert [e[0] for e in fn.log] == ["triton", "triton"]

    class Broken(FakeKernel):
        def run(self, *a):
            raise TypeError("launcher takes other arguments")
    fn2 = FakeJit()
    launch2 = Launcher(fn2)
    launch2[(1,)](x, x, 1, 8, BLOCK=8)
    key = next(iter(launch2.cache))
    launch2.cache[key] = Broken(fn2.log, 0)
    launch2[(1,)](x, x, 1, 8, BLOCK=8)
    assert [e[0] for e in fn2.log] == ["triton", "triton"] and Launcher._disabled


def test_interpreter_always_uses_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fn = FakeJit()
    x = torch.randn(8)
    for _ in range(2):
        Launcher(fn)[(1,)](x, x, 1, 8, BLOCK=8)
    assert [e[0] for e in fn.log] == ["triton", "triton"]

