"""pytest-benchmark suite for the GPU: the fused adapter and ops against the reference at the benchmark
shapes, forward+backward, bf16. Skipped without CUDA.

    pytest benchmarks/test_bench_adapter.py --benchmark-columns=median,iqr --benchmark-sort=name

Each case checks the fused result against the reference before it is timed.
"""
import pytest
import torch

import mona_kernels as mk
from mona_kernels.benchmark import GPU_SHAPES
from mona_kernels.reference import Mona as RefMona, multiscale_dwconv_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
IDS = ["x".join(map(str, s)) for s in GPU_SHAPES]


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _adapter_case(shape, fused):
    B, H, W, C = shape
    torch.manual_seed(0)
    ref = RefMona(C, dropout=0.0).cuda().bfloat16()
    model = mk.Mona(C, dropout=0.0).cuda().bfloat16() if fused else ref
    if fused:
        model.load_state_dict(ref.state_dict())
    x = torch.randn(B, H * W, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    params = [x, *model.parameters()]
    if fused:
        out, out_ref = model(x, (H, W)), ref(x, (H, W))
        err = ((out.float() - out_ref.float()).norm() / out_ref.float().norm()).item()
        assert err < 1e-2, f"fused adapter differs from the reference by {err:.3g}"
    return lambda: torch.autograd.grad(model(x, (H, W)), params, g)


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=IDS)
@pytest.mark.parametrize("variant", ["reference", "fused"])
def test_adapter_fwd_bwd(benchmark, shape, variant):
    benchmark.group = f"adapter {'x'.join(map(str, shape))}"
    step = _adapter_case(shape, variant == "fused")
    step()
    benchmark(_synced(step))


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=IDS)
@pytest.mark.parametrize("variant", ["reference", "fused"])
def test_multiscale_dwconv_fwd(benchmark, shape, variant):
    B, H, W, _ = shape
    benchmark.group = f"dwconv {B}x{H}x{W}x64"
    conv = RefMona(64, bottleneck=64).adapter_conv.cuda().bfloat16()
    ws = [conv.conv1.weight, conv.conv1.bias, conv.conv2.weight, conv.conv2.bias, conv.conv3.weight, conv.conv3.bias]
    h = torch.randn(B, H, W, 64, device="cuda", dtype=torch.bfloat16)
    fn = (lambda: mk.multiscale_dwconv(h, *ws)) if variant == "fused" else (lambda: multiscale_dwconv_ref(h, *ws))
    if variant == "fused":
        ref = multiscale_dwconv_ref(h, *ws).float()
        assert ((fn().float() - ref).norm() / ref.norm()).item() < 1e-2
    benchmark(_synced(fn))
