"""GPU parity: every dtype and backend against the float64 reference, the benchmark shapes, non-contiguous
inputs, autocast and torch.compile. Skipped where CUDA is absent."""
import pytest
import torch

from conftest import DEVICE_BACKENDS, assert_close, assert_parity, needs_cuda, randomize_, rel_err
import mona_kernels as mk
from mona_kernels.benchmark import capture_graph
from mona_kernels.reference import Mona as RefMona, ln_scale_ref, multiscale_dwconv_ref

pytestmark = needs_cuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_SHAPES = [(32, 56, 56, 128), (32, 14, 14, 512), (2, 200, 336, 128), (2, 100, 168, 256),
               (2, 50, 84, 512), (4, 128, 128, 192), (4, 32, 32, 768)]
# Whole-adapter gradients chain five low-precision matmuls; their error budget is wider than one op's.
CHAIN_SCALE = {torch.float32: 10.0, torch.float16: 3.0, torch.bfloat16: 3.0}


@pytest.fixture(autouse=True)
def _exact_fp32():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 37, 96), (2, 33, 1536), (3, 5, 2048), (6, 7, 512), (3, 7, 130), (5, 11, 6), (2, 9, 2046)])
def test_ln_scale(backend, dtype, shape):
    C = shape[-1]
    x64 = torch.randn(shape, device="cuda", dtype=torch.float64) * 2 + 0.5
    p64 = [torch.randn(C, device="cuda", dtype=torch.float64) for _ in range(4)]
    x = x64.to(dtype).requires_grad_()
    params = [p.float().requires_grad_() for p in p64]
    ref_inputs = [x.detach().double().requires_grad_()] + [p.detach().double().requires_grad_() for p in params]
    assert_parity(lambda *t: mk.ln_scale(*t, backend=backend), ln_scale_ref, [x, *params], ref_inputs,
                  "x w b gamma gammax".split(), dtype)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
# (1, 257, 259, 24) is over the Triton conv's LARGE_MAP_PIXELS, which switches it to its large-map tile.
@pytest.mark.parametrize("shape", [(2, 57, 61, 64), (1, 1, 33, 64), (3, 20, 1, 40), (1, 31, 29, 256), (1, 257, 259, 24)])
def test_multiscale_dwconv(backend, dtype, shape):
    B, H, W, d = shape
    h = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
    weights = []
    for k in (3, 5, 7):
        weights += [(torch.randn(d, 1, k, k, device="cuda") / k).requires_grad_(),
                    torch.randn(d, device="cuda").requires_grad_()]
    ref_inputs = [t.detach().double().requires_grad_() for t in [h, *weights]]
    assert_parity(lambda *t: mk.multiscale_dwconv(*t, backend=backend), multiscale_dwconv_ref, [h, *weights],
                  ref_inputs, "h w3 b3 w5 b5 w7 b7".split(), dtype)


def _adapter_pair(C, dtype, d=64):
    ref = randomize_(RefMona(C, bottleneck=d, dropout=0.0)).cuda().double()
    fused = mk.Mona(C, bottleneck=d, dropout=0.0).cuda().to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _check_adapter(fused, ref, x, hw, dtype, scale):
    x_ref = x.detach().double().requires_grad_()
    out, out_ref = fused(x, hw), ref(x_ref, hw)
    assert_close(out, out_ref, dtype, "out")
    g = torch.randn_like(out_ref)
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    grads = _grads(out, [x, *fused.parameters()], g.to(out.dtype))
    for name, a, b in zip(names, grads, _grads(out_ref, [x_ref, *ref.parameters()], g)):
        assert_close(a, b, dtype, name, scale=scale)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_odd_shape(backend, dtype):
    ref, fused = _adapter_pair(96, dtype)
    fused.backend = backend
    x = torch.randn(2, 37 * 23, 96, device="cuda").to(dtype).requires_grad_()
    _check_adapter(fused, ref, x, (37, 23), dtype, CHAIN_SCALE[dtype])


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adapter_spec_shapes_bf16(shape, backend):
    B, H, W, C = shape
    ref, fused = _adapter_pair(C, torch.bfloat16)
    fused.backend = backend
    x = torch.randn(B, H * W, C, device="cuda").to(torch.bfloat16).requires_grad_()
    _check_adapter(fused, ref, x, (H, W), torch.bfloat16, CHAIN_SCALE[torch.bfloat16])


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_bf16_output_is_as_accurate_as_the_bf16_reference(backend):
    # within tolerance is not enough: the fused output should lose no more to rounding than the
    # reference module itself does in bf16 (both measured against float64)
    ref, fused = _adapter_pair(256, torch.bfloat16)
    fused.backend = backend
    ref_bf16 = RefMona(256, bottleneck=64, dropout=0.0).cuda().to(torch.bfloat16)
    ref_bf16.load_state_dict(ref.state_dict())
    x = torch.randn(2, 40 * 30, 256, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        truth = ref(x.double(), (40, 30))
        assert rel_err(fused(x, (40, 30)), truth) <= 1.25 * rel_err(ref_bf16(x, (40, 30)), truth)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_bf16_tokens_with_fp32_parameters(backend):
    ref, fused = _adapter_pair(96, torch.float32, d=32)
    fused.backend = backend
    x = torch.randn(2, 13 * 11, 96, device="cuda").to(torch.bfloat16).requires_grad_()
    _check_adapter(fused, ref, x, (13, 11), torch.bfloat16, CHAIN_SCALE[torch.bfloat16])


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_empty_batch_gives_empty_output_and_zero_gradients(backend):
    _, fused = _adapter_pair(64, torch.float32, d=16)
    fused.backend = backend
    x = torch.randn(0, 5 * 6, 64, device="cuda", requires_grad=True)
    for _ in range(3):  # the graph caches take no empty problem: every call runs directly
        out = fused(x, (5, 6))
        assert out.shape == x.shape
        grads = _grads(out.sum(), list(fused.parameters()), None)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_non_contiguous_tokens():
    ref, fused = _adapter_pair(64, torch.float32)
    base = torch.randn(2, 64, 30, device="cuda")
    x = base.transpose(1, 2).requires_grad_()
    assert not x.is_contiguous()
    _check_adapter(fused, ref, x, (5, 6), torch.float32, CHAIN_SCALE[torch.float32])


# (C, d, (H, W)): aligned rows, and odd C and d, whose weights sit misaligned in the CUDA backend's
# one cast buffer and whose LN rows take the scalar path
AUTOCAST_CASES = [(128, 64, (15, 17)), (130, 6, (7, 9))]


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=lambda c: f"C{c[0]}-d{c[1]}")
def test_autocast_keeps_fp32_parameters_and_accurate_gradients(backend, dtype, case):
    C, d, hw = case
    ref, fused = _adapter_pair(C, torch.float32, d=d)
    fused.backend = backend
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    for _ in range(3):  # direct, then the graph caches' capture and replay
        x = torch.randn(2, hw[0] * hw[1], C, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=dtype):
            out = fused(x, hw)
        assert out.dtype == torch.float32
        x_ref = x.detach().double().requires_grad_()
        out_ref = ref(x_ref, hw)
        assert_close(out, out_ref, dtype, "out")
        g = torch.randn_like(out)
        grads = _grads(out, [x, *fused.parameters()], g)
        assert all(gr.dtype == torch.float32 for gr in grads[1:])
        for name, a, b in zip(names, grads, _grads(out_ref, [x_ref, *ref.parameters()], g.double())):
            assert_close(a, b, dtype, name, scale=CHAIN_SCALE[dtype])


def test_torch_compile_fullgraph_matches_eager():
    ref, fused = _adapter_pair(128, torch.bfloat16)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 9 * 11, 128, device="cuda").to(torch.bfloat16).requires_grad_()
    out = compiled(x, (9, 11))
    assert_close(out, ref(x.detach().double(), (9, 11)), torch.bfloat16, "compiled out")
    out.float().sum().backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_fp16_large_values_do_not_overflow():
    ref, fused = _adapter_pair(256, torch.float16)
    x = (torch.randn(1, 64, 256, device="cuda") * 300).half()
    out = fused(x, (8, 8))
    assert torch.isfinite(out).all() == torch.isfinite(ref(x.double(), (8, 8))).all()


def test_mixed_devices_name_the_argument():
    fused = mk.Mona(32, bottleneck=16).cuda()
    with pytest.raises(ValueError, match="device|cpu"):
        fused(torch.randn(1, 4, 32), (2, 2))


class _Mask(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, a):
        return a * self.scale.to(a.dtype).view(a.shape)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_dropout_rate_scale_and_backward_mask(backend):
    p = 0.3
    seed = torch.tensor([987654321])
    scale = mk.backends.dropout_scale(backend, seed, torch.empty(3000, 64, device="cuda"), p)
    kept = scale != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    assert torch.allclose(scale[kept], torch.full_like(scale[kept], 1 / (1 - p)))
    # The backward applies exactly the forward's mask: compare with the reference given that mask.
    ref, fused = _adapter_pair(48, torch.float32, d=16)
    fused.backend, fused.dropout.p = backend, 0.4
    x = torch.randn(2, 6 * 7, 48, device="cuda", requires_grad=True)
    torch.manual_seed(11)
    out = fused(x, (6, 7))
    torch.manual_seed(11)
    # the fused plans draw their seed on the device; the PyTorch plan draws its mask as nn.Dropout does
    seed = torch.tensor([11]) if backend == "torch" else torch.randint(0, 2**62, (1,), device="cuda")
    ref.dropout = _Mask(mk.backends.dropout_scale(backend, seed, torch.empty(84, 16, device="cuda"), 0.4))
    x_ref = x.detach().double().requires_grad_()
    out_ref = ref(x_ref, (6, 7))
    assert_close(out, out_ref, torch.float32, "out", scale=CHAIN_SCALE[torch.float32])
    g = torch.randn_like(out)
    for name, a, b in zip(["x"] + [n for n, _ in fused.named_parameters()],
                          _grads(out, [x, *fused.parameters()], g),
                          _grads(out_ref, [x_ref, *ref.parameters()], g.double())):
        assert_close(a, b, torch.float32, name, scale=CHAIN_SCALE[torch.float32])


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_cuda_graph_replay_matches_eager(backend):
    _, fused = _adapter_pair(64, torch.bfloat16)
    fused.backend = backend
    static_x = torch.randn(2, 9 * 10, 64, device="cuda").to(torch.bfloat16).requires_grad_()
    static_g = torch.randn_like(static_x)
    params = [static_x, *fused.parameters()]

    def step():
        return torch.autograd.grad(fused(static_x, (9, 10)), params, static_g)

    graph, static_grads = capture_graph(step, warmup=2)
    with torch.no_grad():  # new data in the captured buffers, then replay
        static_x.copy_(torch.randn_like(static_x))
        static_g.copy_(torch.randn_like(static_g))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(static_grads, eager):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_tensors_on_a_gpu_other_than_the_current_one(backend):
    ref, fused = _adapter_pair(64, torch.float32, d=16)
    ref, fused = ref.to("cuda:1"), fused.to("cuda:1")
    fused.backend = backend
    with torch.cuda.device(0):
        for _ in range(3):  # direct, capture + replay, replay
            x = torch.randn(2, 5 * 6, 64, device="cuda:1", requires_grad=True)
            _check_adapter(fused, ref, x, (5, 6), torch.float32, CHAIN_SCALE[torch.float32])
        h = torch.randn(2, 5, 6, 16, device="cuda:1")
        c = fused.adapter_conv
        weights = [c.conv1.weight, c.conv1.bias, c.conv2.weight, c.conv2.bias, c.conv3.weight, c.conv3.bias]
        assert_close(mk.multiscale_dwconv(h, *weights, backend=backend),
                     multiscale_dwconv_ref(h.double(), *[w.double() for w in weights]), torch.float32, "h2")


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_dropout_under_graph_capture_draws_a_new_mask_every_replay(backend, monkeypatch):
    """The Triton and CUDA backends draw the seed on the GPU inside a capture: each replay gets a new
    mask, and the replay equals an eager call given that replay's seed. The PyTorch plan's dropout
    draws from PyTorch's capture-safe generator: each replay draws a new mask too."""
    fused = randomize_(mk.Mona(32, bottleneck=16, dropout=0.25, backend=backend)).cuda()
    x = torch.randn(2, 16, 32, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    params = [x, *fused.parameters()]

    def step():
        out = fused(x, (4, 4))
        return (out.detach(), *torch.autograd.grad(out, params, g))

    step()
    if backend == "torch":
        graph, static = capture_graph(step, warmup=2)
        outs = []
        for _ in range(2):
            graph.replay()
            outs.append(static[0].clone())
        assert not torch.equal(outs[0], outs[1])
        return
    drawn = []
    draw = mk.backends.draw_seed
    monkeypatch.setattr(mk.backends, "draw_seed", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    graph, static = capture_graph(step, warmup=2)
    seed = drawn[-1]
    assert seed.is_cuda  # the captured call's seed, rewritten by every replay
    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replayed = [t.clone() for t in static]
        monkeypatch.setattr(mk.backends, "draw_seed",
                            lambda *a, value=seed.item(), **k: torch.tensor([value], device="cuda"))
        for a, b in zip(replayed, step()):
            assert torch.equal(a, b)
        outs.append(replayed[0])
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.skipif("cuda" not in DEVICE_BACKENDS, reason="the CUDA extension is not available")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_tilings_give_identical_results(dtype):
    from mona_kernels.backends import cuda
    h = torch.randn(2, 13, 19, 64, device="cuda").to(dtype)
    g = torch.randn_like(h)
    K, bias = torch.randn(49, 64, device="cuda"), torch.randn(64, device="cuda")
    for flip in (False, True):
        base = cuda.dwconv7_fwd(h, K, bias, flip, 0)
        for variant in (1, 2, 3):
            assert torch.equal(cuda.dwconv7_fwd(h, K, bias, flip, variant), base), (flip, variant)
    assert torch.equal(cuda.dwconv7_wgrad(h, g, 1), cuda.dwconv7_wgrad(h, g, 0))


@pytest.mark.skipif("cuda" not in DEVICE_BACKENDS, reason="the CUDA extension is not available")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 13, 19, 64), (1, 9, 40, 40), (3, 5, 7, 128), (1, 20, 33, 200), (1, 9, 11, 6)])
def test_cuda_shared_memory_tiles_match_the_register_kernels(dtype, shape):
    """Conv variants 4-8 and wgrad variants 2-3 (shared-memory tiles) sum the same products in another
    order: equal to the register kernels (variant 0) up to fp32 reassociation and one rounding of the output, at
    partial row, column and channel tiles. D = 6 is not a multiple of a 16-byte chunk and falls back."""
    from mona_kernels.backends import cuda
    h = torch.randn(shape, device="cuda").to(dtype)
    g = torch.randn_like(h)
    D = shape[-1]
    K, bias = torch.randn(49, D, device="cuda"), torch.randn(D, device="cuda")
    rtol = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    for flip in (False, True):
        base = cuda.dwconv7_fwd(h, K, bias, flip, 0).float()
        for variant in (4, 5, 6, 7, 8):
            out = cuda.dwconv7_fwd(h, K, bias, flip, variant)
            assert out.dtype == dtype and out.shape == h.shape
            torch.testing.assert_close(out.float(), base, rtol=rtol, atol=1e-4, msg=f"flip {flip} variant {variant}")
    wbase = cuda.dwconv7_wgrad(h, g, 0)
    for variant in (2, 3):
        torch.testing.assert_close(cuda.dwconv7_wgrad(h, g, variant), wbase, rtol=1e-4, atol=1e-3,
                                   msg=f"wgrad variant {variant}")


@pytest.mark.skipif("cuda" not in DEVICE_BACKENDS, reason="the CUDA extension is not available")
def test_cuda_default_variants_follow_the_map_size():
    from mona_kernels.backends import cuda
    K, bias = torch.randn(49, 64, device="cuda"), torch.randn(64, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # conv: register rows below 2048 pixels; tiles (4), held to 64 registers (7) from 2 tiles an SM
    busy = 7 if 16 * 8 * 4 >= 2 * sms else 4
    for shape, conv, wgrad in (((2, 40, 60, 64), 4, 2), ((16, 64, 64, 64), busy, 2), ((2, 13, 19, 64), 0, 0),
                               ((1, 32, 32, 64), 0, 2)):
        h = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        g = torch.randn_like(h)
        assert torch.equal(cuda.dwconv7_fwd(h, K, bias), cuda.dwconv7_fwd(h, K, bias, False, conv)), shape
        assert torch.equal(cuda.dwconv7_wgrad(h, g), cuda.dwconv7_wgrad(h, g, wgrad)), shape


def test_benchmark_times_the_compiled_reference_beside_the_fused_adapter():
    """The benchmark's default run includes torch.compile(reference), whose backward is timed alone by
    replaying a retained graph; every variant must come back with times and small errors."""
    import math
    from mona_kernels.benchmark import bench_adapter
    rows = bench_adapter((2, 8, 8, 64), torch.bfloat16, torch.device("cuda"), reps=5, variants=("compiled",),
                         backends=["triton"], graphs=True)
    assert [r["variant"] for r in rows] == ["reference", "compiled", "fused[triton]"]
    for r in rows:
        for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["variant"], key)
        assert r["err_out"] < 2e-2 and r["err_grad"] < 2e-2, r["variant"]
    assert math.isnan(rows[1]["graph_fwd_bwd_ms"])  # the compiled variant is not graph-timed
    assert all(r["graph_fwd_ms"] > 0 and r["graph_fwd_bwd_ms"] > r["graph_fwd_ms"] for r in (rows[0], rows[2]))


def test_benchmark_graph_times_every_depthwise_variant():
    """Every variant of the depthwise op's table captures its forward and its forward+backward, the
    module's weights included (a live autograd graph over them once made the fwd+bwd capture fail)."""
    import math
    from mona_kernels.benchmark import bench_dwconv
    rows = bench_dwconv((2, 13, 9, 64), torch.bfloat16, torch.device("cuda"), reps=5, backends=DEVICE_BACKENDS,
                        graphs=True)
    assert [r["variant"] for r in rows] == ["reference", "single_7x7_conv"] + [f"fused[{b}]" for b in DEVICE_BACKENDS]
    for r in rows:
        assert math.isfinite(r["graph_fwd_ms"]) and r["graph_fwd_ms"] > 0, r["variant"]
        assert math.isfinite(r["graph_fwd_bwd_ms"]) and r["graph_fwd_bwd_ms"] > r["graph_fwd_ms"], r["variant"]
        if r["variant"] != "single_7x7_conv":
            assert r["err_out"] < 2e-2, r["variant"]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_triton_plan_matches_eager_and_compiles_once_for_every_size(mode):
    """Under torch.compile the plan's kernels are launched by the compiled graph itself (triton_op):
    results match eager ones, and new image and batch sizes compile nothing new after the first
    dynamic recompile. Not bit for bit: on an H100 one bf16 element of dx in some sizes came out one
    unit in the last place apart (Inductor compiles the kernels with its own specialisations)."""
    if "triton" not in DEVICE_BACKENDS:
        pytest.skip("Triton does not run on this GPU")
    torch._dynamo.reset()
    _, fused = _adapter_pair(96, torch.bfloat16)
    fused.backend = "triton"
    fused.dropout.p = 0.0
    compiled = torch.compile(fused, fullgraph=True, mode=mode)
    counters = torch._dynamo.utils.counters
    frames = None
    for B, H, W in [(2, 9, 11), (1, 13, 7), (3, 5, 17), (2, 16, 16), (1, 21, 3), (4, 7, 9)]:
        x = torch.randn(B, H * W, 96, device="cuda").bfloat16().requires_grad_()
        g = torch.randn_like(x)
        for _ in range(2 if mode == "reduce-overhead" else 1):  # warm-up, then a graph replay
            out = compiled(x, (H, W))
            got = (out.detach().clone(), *[t.clone() for t in torch.autograd.grad(out, [x, *fused.parameters()], g)])
        out = fused(x, (H, W))
        want = (out.detach(), *torch.autograd.grad(out, [x, *fused.parameters()], g))
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-3, (B, H, W, rel_err(a, b))
        if (B, H, W) == (3, 5, 17):  # the second size made the graph dynamic; later ones reuse it
            frames = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == frames


def test_new_image_sizes_compile_no_new_triton_kernel():
    """The plan's kernels take every size as a runtime argument: after the first call, new (H, W) and
    batch sizes launch the kernels already compiled (the fast launcher's cache keys are at least as
    fine as Triton's own, so a new key would be a new specialisation)."""
    if "triton" not in DEVICE_BACKENDS:
        pytest.skip("Triton does not run on this GPU")
    from mona_kernels.ops.utils import Launcher
    fused = randomize_(mk.Mona(96, bottleneck=64, backend="triton")).cuda().bfloat16()

    def step(B, H, W):
        x = torch.randn(B, H * W, 96, device="cuda").bfloat16().requires_grad_()
        torch.autograd.grad(fused(x, (H, W)), [x, *fused.parameters()], torch.randn_like(x))

    step(2, 9, 11)
    compiled = Launcher.stats["triton"]
    for B, H, W in [(1, 13, 7), (3, 5, 17), (2, 101, 67), (1, 21, 3), (4, 64, 64)]:
        step(B, H, W)
    assert Launcher.stats["triton"] == compiled
