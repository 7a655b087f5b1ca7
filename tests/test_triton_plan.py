"""The six kernels of the Triton plan, each against the reference's own intermediate values (float64,
through the interpreter on the CPU), and the plan as a whole: gradcheck, determinism, and no
compile keyed by the image size."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import CPU_BACKENDS, assert_close, mona_params, randomize_
from mona_kernels.ops.multiscale_dwconv import merge_kernels
from mona_kernels.reference import Mona as RefMona, multiscale_dwconv_ref

F64 = torch.float64
pytestmark = pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="the Triton plan runs on the CPU only under "
                                                                      "TRITON_INTERPRET=1")

# Odd sizes, a row or column of one pixel, C not a power of two, d of 16, 64 and 96, and C over WIDE_C
# (F1 and B2 take smaller tiles there).
SHAPES = [(2, 5, 7, 24, 16), (1, 1, 9, 130, 64), (3, 6, 1, 40, 16), (1, 4, 3, 20, 96), (2, 3, 5, 264, 16)]


def _chain(B, H, W, C, d):
    """The reference module, its input, an upstream gradient, and every intermediate value of its
    forward with the gradient reaching it."""
    from mona_kernels.backends import Params
    ref = randomize_(RefMona(C, bottleneck=d).to(F64))
    x = torch.randn(B * H * W, C, dtype=F64, requires_grad=True)
    conv = ref.adapter_conv
    y = ref.norm(x) * ref.gamma + x * ref.gammax
    h1 = ref.project1(y)
    h2 = multiscale_dwconv_ref(h1.view(B, H, W, d), conv.conv1.weight, conv.conv1.bias, conv.conv2.weight,
                               conv.conv2.bias, conv.conv3.weight, conv.conv3.bias).reshape(-1, d)
    h3 = h2 + F.linear(h2, conv.projector.weight.view(d, d), conv.projector.bias)
    a = F.gelu(h3)
    out = x + ref.project2(a)
    for t in (h1, h2, h3, a):
        t.retain_grad()
    g = torch.randn_like(out)
    out.backward(g)
    params = Params(*mona_params(ref))
    return dict(ref=ref, x=x, g=g, h1=h1, h2=h2, h3=h3, a=a, out=out, params=[q.detach() for q in params],
                grads=[q.grad for q in params])


@pytest.fixture(params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def chain(request):
    torch.manual_seed(0)
    return request.param, _chain(*request.param)


def _merged(q):
    """The merged conv kernel as the plan lays it out: (50, d), the 49 taps then the bias."""
    K, bias = merge_kernels(*q[6:12], dtype=F64)
    return torch.cat([K, bias[None]])


def test_ln_down_writes_h1_the_token_statistics_and_the_merged_conv(chain):
    from mona_kernels.backends.triton.ln_down import ln_down
    (B, H, W, C, d), c = chain
    q = c["params"]
    x = c["x"].detach()
    h1, mean, rstd, K = ln_down(x, *q[:12], 1e-5, F64, F64)
    assert_close(h1, c["h1"], F64, "h1")
    assert_close(K, _merged(q), F64, "K")
    assert_close(mean, x.mean(1), F64, "mean")
    assert_close(rstd, (x.var(1, unbiased=False) + 1e-5).rsqrt(), F64, "rstd")


def test_conv_up_writes_the_adapter_output_and_h2(chain):
    from mona_kernels.backends.triton.conv_up import conv_up
    (B, H, W, C, d), c = chain
    q = c["params"]
    out, h2 = conv_up(c["h1"].detach(), c["x"].detach(), _merged(q), *q[12:], None, 0.0, H, W)
    assert_close(out, c["out"], F64, "out")
    assert_close(h2, c["h2"], F64, "h2")


def test_tail_bwd_writes_dh2_and_a_and_the_projector_partials(chain):
    from mona_kernels.backends.triton.tail_bwd import tail_bwd
    (B, H, W, C, d), c = chain
    q = c["params"]
    partial = torch.zeros(5 + 3 * (d * d + d), dtype=F64)  # rows from element 5: the offset is honoured
    dh2, a = tail_bwd(c["g"], c["h2"].detach(), *q[12:15], None, 0.0, partial, 5, 3)
    assert torch.all(partial[:5] == 0)
    partial = partial[5:].view(3, d * d + d)
    assert_close(dh2, c["h2"].grad, F64, "dh2")
    assert_close(a, c["a"], F64, "a")
    assert_close(partial.sum(0)[:d * d].view(d, d, 1, 1), c["grads"][12], F64, "dWp")
    assert_close(partial.sum(0)[d * d:], c["grads"][13], F64, "dbp")


def test_conv_ln_bwd_writes_dh1_and_dx(chain):
    from mona_kernels.backends.triton.conv_ln_bwd import conv_ln_bwd
    (B, H, W, C, d), c = chain
    q = c["params"]
    x = c["x"].detach()
    mean, rstd = x.mean(1), (x.var(1, unbiased=False) + 1e-5).rsqrt()
    dh1, dx = conv_ln_bwd(c["h2"].grad, x, mean, rstd, c["g"], _merged(q), q[4], q[0], q[2], q[3], H, W)
    assert_close(dh1, c["h1"].grad, F64, "dh1")
    assert_close(dx, c["x"].grad, F64, "dx")


def test_param_grads_and_reduce_grads_give_every_other_parameter_gradient(chain):
    from mona_kernels.backends.triton.param_grads import param_grads
    from mona_kernels.backends.triton.reduce_grads import grads_size, reduce_grads, row_lengths
    (B, H, W, C, d), c = chain
    q = c["params"]
    x = c["x"].detach()
    mean, rstd = x.mean(1), (x.var(1, unbiased=False) + 1e-5).rsqrt()
    rows = (3, 2, 4)  # channel, projector and tap rows; the projector rows' partials come from B1
    len_channel, len_tail, len_tap = row_lengths(C, d)
    tail_offset = rows[0] * len_channel
    tap_offset = tail_offset + rows[1] * len_tail
    partial = torch.zeros(tap_offset + rows[2] * len_tap, dtype=F64)
    partial[tail_offset:tail_offset + d * d + d] = torch.cat([c["grads"][12].flatten(), c["grads"][13]])
    param_grads(c["g"], c["a"].detach(), c["h1"].grad, x, mean, rstd, q[0], q[1], q[2], q[3], q[4],
                c["h1"].detach(), c["h2"].grad, H, W, partial, 0, rows[0], tap_offset, rows[2])
    grads = torch.full((grads_size(C, d),), float("nan"), dtype=F64)  # an element B4 misses stays NaN
    reduce_grads(partial, grads, C, d, *rows)
    names = ["norm.weight", "norm.bias", "gamma", "gammax", "project1.weight", "project1.bias", "conv1.weight",
             "conv1.bias", "conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias", "projector.weight",
             "projector.bias", "project2.weight", "project2.bias"]
    for name, got, want in zip(names, grads.split([t.numel() for t in q]), c["grads"]):
        assert_close(got.view(want.shape), want, F64, name)


def _plan_inputs(B=1, H=3, W=4, C=12, d=16, seed=0):
    from mona_kernels.backends import Params
    torch.manual_seed(seed)
    ref = randomize_(RefMona(C, bottleneck=d).to(F64))
    params = Params(*(q.detach().clone().requires_grad_() for q in mona_params(ref)))
    return torch.randn(B * H * W, C, dtype=F64, requires_grad=True), params


def test_gradcheck_of_the_whole_op():
    from mona_kernels.backends.triton import adapter_fwd
    x, params = _plan_inputs()

    def fn(x, *ps):
        return adapter_fwd(x, list(ps), None, 3, 4, 1e-5, 0.0, F64)[0]

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_two_backward_passes_are_bit_equal():
    from mona_kernels.backends.triton import adapter_fwd
    x, params = _plan_inputs(B=2, H=7, W=9, C=40, d=16)
    x32 = x.detach().float().requires_grad_()
    p32 = type(params)(*(q.detach().float().requires_grad_() for q in params))
    seed = torch.tensor([1234])
    runs = []
    for _ in range(2):
        out = adapter_fwd(x32, list(p32), seed, 7, 9, 1e-5, 0.1, torch.float32)[0]
        runs.append(torch.autograd.grad(out, [x32, *p32], torch.ones_like(out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_eager_calls_and_the_registered_operator_give_the_same_bits():
    """Eager calls skip the operator's dispatch and run the plan's functions through an
    autograd.Function; the operator (what torch.compile sees) must give the same output and
    gradients, dropout included. The CUDA plan's eager forward is its operator (C++): the same
    Function with the operator as forward stands in for it here."""
    from mona_kernels.backends import _EagerAdapter
    from mona_kernels.backends import triton as plan
    x, params = _plan_inputs(B=2, H=7, W=9, C=40, d=16)
    seed = torch.tensor([1234])
    g = torch.randn(x.shape, dtype=F64)
    out = plan.adapter_fwd(x, list(params), seed, 7, 9, 1e-5, 0.1, F64)[0]
    want = (out, *torch.autograd.grad(out, [x, *params], g))
    for eager in (plan.ADAPTER, plan.ADAPTER._replace(forward=plan.adapter_fwd)):
        # the Function takes tokens as (B, N, C)
        out = _EagerAdapter.apply(eager, x.view(2, 63, 40), seed, 7, 9, 1e-5, 0.1, F64, *params).view(x.shape)
        got = (out, *torch.autograd.grad(out, [x, *params], g))
        for a, b in zip(got, want):
            assert torch.equal(a, b)


KERNELS = {"ln_down": ["M", "n_rows"], "conv_up": ["H", "W", "M"],
           "tail_bwd": ["M", "n_tiles", "partial_off"], "conv_ln_bwd": ["H", "W", "M"],
           "param_grads": ["H", "W", "M", "tokens", "n_tiles", "n_channel", "n_splits", "channel_off", "tap_off"],
           "reduce_grads": ["C", "rows_channel", "rows_tail", "rows_tap"]}
# Kernels whose token rows are C elements apart: C keeps Triton's specialisation there (a multiple of
# 16 or not, two compiles at most for a model's every width), so that the compiler can prove each
# row's 16-byte alignment and load and store tokens 16 bytes at a time.
ALIGNED_C = ["ln_down", "conv_up", "tail_bwd", "conv_ln_bwd", "param_grads"]


def test_no_kernel_specialises_on_an_argument_that_follows_the_image_size():
    """Triton compiles a new kernel for each value class of a specialised integer: every integer that
    changes with B, H or W must be exempt, so a new image size compiles nothing; C must not be, where
    it is a token row's length."""
    script = (
        "import importlib, json\n"
        f"kernels = {KERNELS!r}\n"
        "out = {}\n"
        "for mod, _ in kernels.items():\n"
        "    m = importlib.import_module('mona_kernels.backends.triton.' + mod)\n"
        "    k = getattr(m, mod + '_kernel')\n"
        "    out[mod] = [p.name for p in k.params if p.do_not_specialize]\n"
        "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    exempt = json.loads(result.stdout.strip().splitlines()[-1])
    for mod, sizes in KERNELS.items():
        assert set(sizes) <= set(exempt[mod]), f"{mod} specialises on {set(sizes) - set(exempt[mod])}"
    for mod in ALIGNED_C:
        assert "C" not in exempt[mod], f"{mod} cannot vectorise its token rows with C exempt"


# Shared memory a program may use: sm_86 (and sm_89) give 99 KB, sm_90 227 KB.
SHARED_LIMIT = {86: 101376, 90: 232448}


@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
def test_every_kernel_fits_the_shared_memory_of_the_gpus_it_runs_on(arch):
    """Compiles each kernel for the architecture, ahead of time and without a GPU, at every dtype
    pairing with the launch options its launcher picks, up to the widest bottleneck the plan runs."""
    from mona_kernels.backends.triton import MAX_D
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "_compile_plan.py")
    result = subprocess.run([sys.executable, script, str(arch), str(MAX_D)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    shared = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(shared) == 4 * 8
    over = {k: v for k, v in shared.items() if v > SHARED_LIMIT[arch]}
    assert not over, f"over the {SHARED_LIMIT[arch]} bytes of sm_{arch}: {over}"
