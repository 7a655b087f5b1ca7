"""Shared test helpers: the tolerance table, backends to run, random parameter fills, and the
adapter pairs (fused and float64 reference) the GPU tests compare."""
import os

import pytest
import torch

import mona_kernels as mk
from mona_kernels.backends import unavailable
from mona_kernels.reference import Mona as RefMona

# ||actual - expected|| / ||expected|| against a float64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def assert_close(actual, expected, dtype, name="", scale=1.0):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= TOLERANCE[dtype] * scale, f"{name}: relative error {err:.3g} over {TOLERANCE[dtype] * scale:.3g}"


def assert_parity(fn, ref_fn, inputs, ref_inputs, names, dtype, scale=1.0):
    """``fn(*inputs)`` and the gradient of every input against the oracle ``ref_fn(*ref_inputs)``
    (float64), for one random output gradient; the output keeps the dtype of the first input."""
    out, out_ref = fn(*inputs), ref_fn(*ref_inputs)
    assert out.dtype == inputs[0].dtype, f"output dtype {out.dtype} != input dtype {inputs[0].dtype}"
    assert_close(out, out_ref, dtype, "out", scale)
    g = torch.randn_like(out_ref)
    grads = torch.autograd.grad(out, inputs, g.to(out.dtype))
    grads_ref = torch.autograd.grad(out_ref, ref_inputs, g)
    for name, a, b in zip(names, grads, grads_ref):
        assert_close(a, b, dtype, name, scale)


def backends_for(device: torch.device):
    """Every backend that can run on ``device`` in this process, or those that
    ``MONA_KERNELS_TEST_BACKENDS`` (comma-separated) names among them."""
    wanted = os.environ.get("MONA_KERNELS_TEST_BACKENDS", "triton,cuda,torch").split(",")
    return [b for b in ("triton", "cuda", "torch") if b in wanted and unavailable(b, device) is None]


CPU_BACKENDS = backends_for(torch.device("cpu"))
DEVICE_BACKENDS = backends_for(DEVICE)


def randomize_(module: torch.nn.Module, scale: float = 0.5):
    """Fill every parameter with fresh random values so that no path of the adapter is negligible;
    matrices are scaled by 1/sqrt(fan-in) to keep activations of order one at any width."""
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn_like(p) * scale / fan_in ** 0.5)
    return module


def mona_params(m) -> tuple:
    """A reference module's sixteen parameters in the order :func:`mona_kernels.mona` takes them."""
    c = m.adapter_conv
    return (m.norm.weight, m.norm.bias, m.gamma, m.gammax, m.project1.weight, m.project1.bias, c.conv1.weight,
            c.conv1.bias, c.conv2.weight, c.conv2.bias, c.conv3.weight, c.conv3.bias, c.projector.weight,
            c.projector.bias, m.project2.weight, m.project2.bias)


needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Whole-adapter gradients chain five matmuls; their error budget is wider than one op's.
CHAIN_SCALE = {torch.float64: 1.0, torch.float32: 10.0, torch.float16: 3.0, torch.bfloat16: 3.0}


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 matmuls and convs in full fp32, so that fp32 results meet the fp32 tolerance."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def f64_pair(C=24, d=16, dropout=0.0, backend=None):
    """(reference, fused Mona) on the CPU in float64, with the same random parameters."""
    ref = randomize_(RefMona(C, bottleneck=d, dropout=dropout).to(torch.float64))
    fused = mk.Mona(C, bottleneck=d, dropout=dropout, backend=backend).to(torch.float64)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def gpu_pair(C, dtype, d=64):
    """(float64 reference, fused Mona in ``dtype``) on the GPU, with the same random parameters."""
    ref = randomize_(RefMona(C, bottleneck=d, dropout=0.0)).cuda().double()
    fused = mk.Mona(C, bottleneck=d, dropout=0.0).cuda().to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def check_adapter(fused, ref, x, hw, dtype, scale):
    """The fused output and every gradient (x and each parameter) against the float64 reference."""
    x_ref = x.detach().double().requires_grad_()
    out, out_ref = fused(x, hw), ref(x_ref, hw)
    assert_close(out, out_ref, dtype, "out")
    g = torch.randn_like(out_ref)
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    grads = torch.autograd.grad(out, [x, *fused.parameters()], g.to(out.dtype))
    for name, a, b in zip(names, grads, torch.autograd.grad(out_ref, [x_ref, *ref.parameters()], g)):
        assert_close(a, b, dtype, name, scale=scale)


class FixedScale(torch.nn.Module):
    """A dropout stand-in for the reference: multiplies by a given mask."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, a):
        return a * self.scale.to(a.dtype).view(a.shape)
