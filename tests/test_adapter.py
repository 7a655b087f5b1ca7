"""The drop-in fused Mona module, on the CPU and on the GPU: parity with the reference in every
dtype and under autocast, state_dict, layouts, dropout, CUDA-graph capture, conversion of existing
models, and input errors."""
import pytest
import torch
import torch.nn as nn

from conftest import (CHAIN_SCALE, CPU_BACKENDS, DEVICE_BACKENDS, GPU_DTYPES, TOLERANCE, FixedScale, assert_close,
                      check_adapter, f64_pair, gpu_pair, mona_params, needs_cuda, randomize_, rel_err)
from mona_kernels.benchmark import capture_graph
import mona_kernels as mk
from mona_kernels.reference import Mona as RefMona, multiscale_dwconv_ref

F64 = torch.float64


# float32 and float64 both take the six-kernel plan on Triton. C = 130
# and C = 520 run the fused up projection (forward) and its gradient (backward) over 3 blocks of 64
# and 5 of 128 (forward) or 64 (backward) channels, the last one partial. 2x9x11 has 7 pixel tiles,
# so the backward's persistent programs (4 on the CPU) each sum several tiles' bias gradients. d = 96 is over
# the Triton plan's widest bottleneck and runs the PyTorch plan.
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B,H,W,C,d", [(2, 5, 7, 24, 16), (1, 1, 6, 10, 8), (1, 7, 1, 33, 64), (3, 3, 4, 48, 12),
                                       (1, 3, 5, 130, 16), (1, 2, 3, 520, 8), (2, 9, 11, 40, 16), (1, 3, 4, 20, 96)])
def test_outputs_and_every_gradient_match_reference(backend, B, H, W, C, d, dtype):
    ref, fused = f64_pair(C, d, backend=backend)
    fused.to(dtype)
    x = torch.randn(B, H * W, C, dtype=F64, requires_grad=True)
    xd = x.detach().to(dtype).requires_grad_()
    out, out_ref = fused(xd, (H, W)), ref(x, (H, W))
    assert out.dtype == dtype
    assert_close(out, out_ref, dtype, "out", scale=CHAIN_SCALE[dtype])
    g = torch.randn_like(out_ref)
    grads = torch.autograd.grad(out, [xd, *fused.parameters()], g.to(dtype))
    grads_ref = torch.autograd.grad(out_ref, [x, *ref.parameters()], g)
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        assert a.dtype == dtype, name
        assert_close(a, b, dtype, name, scale=CHAIN_SCALE[dtype])


def test_parameter_names_shapes_and_initial_values_match_the_checkpoint_layout():
    fused, ref = mk.Mona(96), RefMona(96)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert "adapter_conv.conv3.weight" in fused.state_dict()
    assert torch.all(fused.gamma == 1e-6) and torch.all(fused.gammax == 1)
    assert fused.dropout.p == 0.1 and fused.project1.out_features == 64


def test_the_authors_positional_factor_builds_their_module_and_loads_their_checkpoint():
    """The authors' backbone builds each adapter as ``Mona(dim, 8)``: 8 is their unused ``factor``,
    and the bottleneck stays 64."""
    theirs = randomize_(RefMona(96, 8))
    fused = mk.Mona(96, 8)
    assert fused.project1.out_features == 64 and fused.adapter_conv.conv3.weight.shape == (64, 1, 7, 7)
    fused.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 12, 96)
    assert_close(fused.eval()(x, (3, 4)), theirs.eval()(x, (3, 4)), torch.float32, "out")


def test_state_dict_round_trip_with_reference():
    ref, fused = f64_pair()
    back = RefMona(24, bottleneck=16).to(F64)
    back.load_state_dict(fused.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_spatial_layout_input_returns_spatial_layout(backend):
    ref, fused = f64_pair(backend=backend)
    x = torch.randn(2, 4, 5, 24, dtype=F64)
    out = fused(x)
    assert out.shape == x.shape
    assert_close(out, ref(x.reshape(2, 20, 24), (4, 5)).view_as(x), F64)


def test_dropout_is_reproducible_under_manual_seed_and_differs_between_seeds():
    _, fused = f64_pair(dropout=0.5)
    x = torch.randn(2, 12, 24, dtype=F64)
    torch.manual_seed(3)
    a = fused(x, (3, 4))
    torch.manual_seed(3)
    b = fused(x, (3, 4))
    torch.manual_seed(4)
    c = fused(x, (3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_keeps_the_reference_rate_and_scale(backend):
    p = 0.3
    seed = torch.tensor([1234])
    like = torch.empty(400, 64, dtype=F64)
    scale = mk.backends.dropout_scale(backend, seed, like, p)
    kept = scale != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    assert torch.allclose(scale[kept], torch.full_like(scale[kept], 1 / (1 - p)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,d", [(F64, 16), (torch.float32, 16), (F64, 10)], ids=["f64", "f32", "f64-d10"])
def test_backward_reuses_the_forward_dropout_mask(backend, dtype, d):
    # d = 16 draws four channels a Philox call in the Triton plan; d = 10 one an element
    _, fused = f64_pair(d=d, dropout=0.4, backend=backend)
    fused.to(dtype)
    x64 = torch.randn(1, 20, 24, dtype=F64)
    x = x64.to(dtype).requires_grad_()
    torch.manual_seed(7)
    out = fused(x, (4, 5))
    # Redraw the seed the forward drew (the PyTorch plan draws its mask right after the manual seed),
    # and give the reference exactly that mask.
    torch.manual_seed(7)
    seed = torch.tensor([7]) if backend == "torch" else torch.randint(0, 2**62, (1,))
    scale = mk.backends.dropout_scale(backend, seed, torch.empty(20, d, dtype=dtype), 0.4)
    assert (scale == 0).any()
    ref = RefMona(24, bottleneck=d, dropout=0.0).to(F64)
    ref.load_state_dict(fused.state_dict())
    ref.dropout = FixedScale(scale)
    x_ref = x64.clone().requires_grad_()
    out_ref = ref(x_ref, (4, 5))
    assert_close(out, out_ref, dtype, "out", scale=CHAIN_SCALE[dtype])
    g = torch.randn_like(out_ref)
    grads = torch.autograd.grad(out, [x, *fused.parameters()], g.to(dtype))
    grads_ref = torch.autograd.grad(out_ref, [x_ref, *ref.parameters()], g)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, dtype, scale=CHAIN_SCALE[dtype])


def test_fold_warns_and_changes_nothing():
    ref, fused = f64_pair()
    fused.eval()
    ref.eval()
    x = torch.randn(2, 30, 24, dtype=F64)
    before = fused(x, (5, 6))
    with pytest.warns(FutureWarning, match="no longer needed"):
        assert fused.fold() is fused
    assert torch.equal(fused(x, (5, 6)), before)
    assert_close(before, ref(x, (5, 6)), F64)


def test_eval_under_no_grad_keeps_no_graph():
    _, fused = f64_pair()
    fused.eval()
    with torch.no_grad():
        out = fused(torch.randn(1, 6, 24, dtype=F64), (2, 3))
    assert out.grad_fn is None and not out.requires_grad


def test_a_parametrized_weight_is_used():
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    ref, fused = f64_pair()
    parametrize.register_parametrization(fused.project1, "weight", Double())
    with torch.no_grad():
        ref.project1.weight.mul_(2)
    x = torch.randn(1, 6, 24, dtype=F64)
    assert_close(fused(x, (2, 3)), ref(x, (2, 3)), F64, "out")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_is_right_or_raises_never_wrong(backend):
    """The fused kernels have no derivatives of their own, so a double backward raises; the PyTorch
    plan is autograd through PyTorch's ops, so its double backward is the reference's."""
    ref, fused = f64_pair(backend=backend)
    x = torch.randn(1, 6, 24, dtype=F64, requires_grad=True)
    (dx,) = torch.autograd.grad(fused(x, (2, 3)).square().sum(), x, create_graph=True)
    if backend == "torch":
        (dx_ref,) = torch.autograd.grad(ref(x, (2, 3)).square().sum(), x, create_graph=True)
        assert_close(torch.autograd.grad(dx.sum(), x)[0], torch.autograd.grad(dx_ref.sum(), x)[0], F64)
        return
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|no autograd formula"):
        torch.autograd.grad(dx.sum(), x)
    # also where x reaches the loss by another path too: the adapter's part is never just left out
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad((dx * x).sum(), x)


class _AuthorsStyleBlock(nn.Module):
    def __init__(self, C, names=("my_module_1", "my_module_2")):
        super().__init__()
        self.attn = nn.Linear(C, C)
        for n in names:
            setattr(self, n, RefMona(C, bottleneck=8))


class _OtherMona(nn.Module):
    """A foreign class with the Mona parameter layout."""

    def __init__(self, C, d=8):
        super().__init__()
        ref = RefMona(C, bottleneck=d, dropout=0.2)
        for name, child in ref.named_children():
            setattr(self, name, child)
        self.gamma, self.gammax = ref.gamma, ref.gammax


def test_convert_replaces_every_mona_keeping_weights_and_flags():
    model = nn.Sequential(_AuthorsStyleBlock(16), _AuthorsStyleBlock(16, ("mona1", "mona2")), nn.Linear(16, 3))
    model.add_module("foreign", _OtherMona(16))
    for m in model.modules():
        if isinstance(m, (RefMona, _OtherMona)):
            randomize_(m)
    model = model.to(F64)
    model[0].my_module_1.project1.weight.requires_grad_(False)
    model[1].mona2.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, n = mk.convert(model)
    assert n == 5
    assert all(isinstance(m, mk.Mona) for m in (model[0].my_module_1, model[0].my_module_2, model[1].mona1,
                                                  model[1].mona2, model.foreign))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[0].my_module_1.project1.weight.requires_grad
    assert not model[1].mona2.training and model[1].mona1.training
    assert model.foreign.dropout.p == 0.2 and model.foreign.gamma.dtype == F64
    assert mk.convert(model)[1] == 0


def test_convert_of_a_single_module_returns_the_fused_module():
    ref = RefMona(16, bottleneck=8)
    fused, n = mk.convert(ref)
    assert n == 1 and isinstance(fused, mk.Mona)


@pytest.mark.parametrize("args,error,match", [
    (((2, 12, 24), (3, 5)), ValueError, r"N=12 tokens but hw_shapes=\(3, 5\)"),
    (((2, 12, 20), (3, 4)), ValueError, r"x has 20 channels .* in_dim=24"),
    (((12, 24), (3, 4)), ValueError, r"\(B, N, C\) .* \(B, H, W, C\); got \(12, 24\)"),
    (((1, 2, 2, 3, 24), (3, 4)), ValueError, r"\(B, N, C\) .* \(B, H, W, C\); got \(1, 2, 2, 3, 24\)"),
    (((2, 12, 24), (-3, -4)), ValueError, r"positive integers \(H, W\), got \(-3, -4\)"),
    (((2, 12, 24), (3.0, 4.0)), TypeError, r"hw_shapes must be two integers"),
    (((2, 12, 24), torch.tensor([3.0, 4.0])), TypeError, r"hw_shapes must be two integers"),
    (((2, 12, 24), (3, 4, 1)), TypeError, r"hw_shapes must be two integers"),
])
def test_bad_input_raises_a_clear_error(args, error, match):
    _, fused = f64_pair()
    shape, hw = args
    with pytest.raises(error, match=match):
        fused(torch.randn(*shape, dtype=F64), hw)


@pytest.mark.parametrize("hw", [(3, 4), [3, 4], torch.Size([3, 4]), torch.tensor([3, 4]),
                                (torch.tensor(3), torch.tensor(4))], ids=["tuple", "list", "size", "tensor", "0-d"])
def test_hw_shapes_takes_any_pair_of_integers(hw):
    ref, fused = f64_pair()
    x = torch.randn(2, 12, 24, dtype=F64)
    assert_close(fused(x, hw), ref(x, (3, 4)), F64)


def test_channels_first_input_to_the_depthwise_op_names_the_layout():
    conv = RefMona(24, bottleneck=16).adapter_conv
    weights = [conv.conv1.weight, conv.conv1.bias, conv.conv2.weight, conv.conv2.bias, conv.conv3.weight,
               conv.conv3.bias]
    with pytest.raises(ValueError, match=r"channels-last \(B, H, W, d\).*permute"):
        mk.multiscale_dwconv(torch.randn(2, 16, 5, 6), *weights)


def test_missing_hw_shapes_is_an_error():
    _, fused = f64_pair()
    with pytest.raises(ValueError, match="hw_shapes"):
        fused(torch.randn(1, 6, 24, dtype=F64))


def test_integer_input_is_a_type_error():
    _, fused = f64_pair()
    with pytest.raises(TypeError, match="x"):
        fused(torch.ones(1, 6, 24, dtype=torch.int64), (2, 3))


def test_more_pixels_than_the_kernels_index_is_refused():
    """Checked before any kernel runs: meta tensors carry the sizes and no data."""
    fused = mk.Mona(16, bottleneck=8).to("meta")
    with pytest.raises(ValueError, match=r"x has B\*H\*W = 2147483648 pixels"):
        fused(torch.empty(2, 2**30, 16, device="meta"), (2**15, 2**15))
    conv = RefMona(16, bottleneck=8).adapter_conv.to("meta")
    weights = [conv.conv1.weight, conv.conv1.bias, conv.conv2.weight, conv.conv2.bias, conv.conv3.weight,
               conv.conv3.bias]
    with pytest.raises(ValueError, match=r"h has B\*H\*W = 2147483648 pixels"):
        mk.multiscale_dwconv(torch.empty(2, 2**15, 2**15, 8, device="meta"), *weights)


def test_bottleneck_over_maximum_is_refused():
    with pytest.raises(ValueError, match=rf"bottleneck must be a positive integer up to {mk.MAX_BOTTLENECK}"):
        mk.Mona(8, bottleneck=mk.MAX_BOTTLENECK + 1)
    wide = RefMona(8, bottleneck=mk.MAX_BOTTLENECK + 1)  # the functional form, given such weights
    with pytest.raises(ValueError, match="bottleneck width"):
        mk.mona(torch.randn(1, 4, 8), (2, 2), *mona_params(wide))


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_dim=0), r"in_dim must be a positive integer, got 0"),
    (dict(in_dim=8.0), r"in_dim must be a positive integer, got 8.0"),
    (dict(bottleneck=0), r"bottleneck must be a positive integer up to 256, got 0"),
    (dict(eps=-1e-5), r"eps must be a non-negative number, got -1e-05"),
    (dict(eps=float("nan")), r"eps must be a non-negative number, got nan"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(backend="trition"), r"backend must be one of .*'triton'.* got 'trition'"),
])
def test_a_bad_constructor_argument_is_named(kwargs, match):
    """Refused when the module is built, before any weight exists, not at its first call."""
    kwargs = {"in_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        mk.Mona(kwargs.pop("in_dim"), **kwargs)


def test_integer_sizes_of_any_integer_type_are_taken():
    np = pytest.importorskip("numpy")
    m = mk.Mona(np.int64(8), bottleneck=np.int32(4), eps=np.float32(1e-5))
    assert m.project1.weight.shape == (4, 8)


def test_a_negative_eps_is_refused_by_the_functions():
    ref = RefMona(8, bottleneck=4)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        mk.mona(torch.randn(1, 4, 8), (2, 2), *mona_params(ref), eps=-1.0)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        mk.ln_scale(torch.randn(4, 8), ref.norm.weight, ref.norm.bias, ref.gamma, ref.gammax, eps=-1.0)


# The Triton interpreter converts fp32 to bf16 by truncation, where GPUs round to nearest, so the
# Triton path runs here under fp16 autocast (rounded to nearest on both) and its bf16 accuracy is
# checked on the GPU (below). Both run fp32 tokens and parameters through the compute-dtype
# kernels: y written in it by the LN kernel, the weights cast together, the gradients copied back.
@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.float16)])
def test_autocast_gradients_are_as_accurate_as_the_reference(backend, dtype):
    """Under low-precision autocast (fp32 parameters) every gradient is within that dtype's tolerance
    of the float64 truth, and no worse than twice the reference module's own autocast error."""
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} cannot run on the CPU here")
    ref = randomize_(RefMona(32, bottleneck=16, dropout=0.0))
    fused = mk.Mona(32, bottleneck=16, dropout=0.0, backend=backend)
    fused.load_state_dict(ref.state_dict())
    truth = RefMona(32, bottleneck=16, dropout=0.0).to(F64)
    truth.load_state_dict(ref.state_dict())
    x = torch.randn(2, 30, 32)
    g = torch.randn(2, 30, 32)
    x64 = x.double().requires_grad_()
    grads_true = torch.autograd.grad(truth(x64, (5, 6)), [x64, *truth.parameters()], g.double())
    errors = {}
    for label, module in (("ref", ref), ("fused", fused)):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            out = module(xx, (5, 6))
        assert out.dtype == torch.float32
        grads = torch.autograd.grad(out, [xx, *module.parameters()], g)
        assert all(gr.dtype == torch.float32 for gr in grads[1:])
        errors[label] = [rel_err(a, b) for a, b in zip(grads, grads_true)]
    for name, e_fused, e_ref in zip(["x"] + [n for n, _ in fused.named_parameters()], errors["fused"], errors["ref"]):
        assert e_fused <= TOLERANCE[dtype], f"{name}: {e_fused:.3g}"
        assert e_fused <= 2 * e_ref + 1e-3, f"{name}: fused {e_fused:.3g} vs reference {e_ref:.3g}"


# ---------------------------------------------------------------------------------------------------
# On the GPU: every backend that runs there, against the float64 reference.

GPU_SHAPES = [(32, 56, 56, 128), (32, 14, 14, 512), (2, 200, 336, 128), (2, 100, 168, 256),
               (2, 50, 84, 512), (4, 128, 128, 192), (4, 32, 32, 768)]


@needs_cuda
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_adapter_odd_shape(backend, dtype):
    ref, fused = gpu_pair(96, dtype)
    fused.backend = backend
    x = torch.randn(2, 37 * 23, 96, device="cuda").to(dtype).requires_grad_()
    check_adapter(fused, ref, x, (37, 23), dtype, CHAIN_SCALE[dtype])


@needs_cuda
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adapter_spec_shapes_bf16(shape, backend):
    B, H, W, C = shape
    ref, fused = gpu_pair(C, torch.bfloat16)
    fused.backend = backend
    x = torch.randn(B, H * W, C, device="cuda").to(torch.bfloat16).requires_grad_()
    check_adapter(fused, ref, x, (H, W), torch.bfloat16, CHAIN_SCALE[torch.bfloat16])


@needs_cuda
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_bf16_output_is_as_accurate_as_the_bf16_reference(backend):
    # within tolerance is not enough: the fused output should lose no more to rounding than the
    # reference module itself does in bf16 (both measured against float64)
    ref, fused = gpu_pair(256, torch.bfloat16)
    fused.backend = backend
    ref_bf16 = RefMona(256, bottleneck=64, dropout=0.0).cuda().to(torch.bfloat16)
    ref_bf16.load_state_dict(ref.state_dict())
    x = torch.randn(2, 40 * 30, 256, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        truth = ref(x.double(), (40, 30))
        assert rel_err(fused(x, (40, 30)), truth) <= 1.25 * rel_err(ref_bf16(x, (40, 30)), truth)


@needs_cuda
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_bf16_tokens_with_fp32_parameters(backend):
    ref, fused = gpu_pair(96, torch.float32, d=32)
    fused.backend = backend
    x = torch.randn(2, 13 * 11, 96, device="cuda").to(torch.bfloat16).requires_grad_()
    check_adapter(fused, ref, x, (13, 11), torch.bfloat16, CHAIN_SCALE[torch.bfloat16])


@needs_cuda
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_empty_batch_gives_empty_output_and_zero_gradients(backend):
    _, fused = gpu_pair(64, torch.float32, d=16)
    fused.backend = backend
    x = torch.randn(0, 5 * 6, 64, device="cuda", requires_grad=True)
    for _ in range(3):  # every call, not only the first
        out = fused(x, (5, 6))
        assert out.shape == x.shape
        grads = torch.autograd.grad(out.sum(), list(fused.parameters()), None)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@needs_cuda
def test_non_contiguous_tokens():
    ref, fused = gpu_pair(64, torch.float32)
    base = torch.randn(2, 64, 30, device="cuda")
    x = base.transpose(1, 2).requires_grad_()
    assert not x.is_contiguous()
    check_adapter(fused, ref, x, (5, 6), torch.float32, CHAIN_SCALE[torch.float32])


# (C, d, (H, W)): aligned rows, and odd C and d, whose weights sit misaligned in the CUDA backend's
# one cast buffer and whose LN rows take the scalar path
AUTOCAST_CASES = [(128, 64, (15, 17)), (130, 6, (7, 9))]


@needs_cuda
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=lambda c: f"C{c[0]}-d{c[1]}")
def test_autocast_keeps_fp32_parameters_and_accurate_gradients(backend, dtype, case):
    C, d, hw = case
    ref, fused = gpu_pair(C, torch.float32, d=d)
    fused.backend = backend
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    for _ in range(3):  # three calls: nothing carries over between them
        x = torch.randn(2, hw[0] * hw[1], C, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=dtype):
            out = fused(x, hw)
        assert out.dtype == torch.float32
        x_ref = x.detach().double().requires_grad_()
        out_ref = ref(x_ref, hw)
        assert_close(out, out_ref, dtype, "out")
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, *fused.parameters()], g)
        assert all(gr.dtype == torch.float32 for gr in grads[1:])
        for name, a, b in zip(names, grads, torch.autograd.grad(out_ref, [x_ref, *ref.parameters()], g.double())):
            assert_close(a, b, dtype, name, scale=CHAIN_SCALE[dtype])


@needs_cuda
def test_fp16_large_values_do_not_overflow():
    ref, fused = gpu_pair(256, torch.float16)
    x = (torch.randn(1, 64, 256, device="cuda") * 300).half()
    out = fused(x, (8, 8))
    assert torch.isfinite(out).all() == torch.isfinite(ref(x.double(), (8, 8))).all()


@needs_cuda
def test_mixed_devices_name_the_argument():
    fused = mk.Mona(32, bottleneck=16).cuda()
    with pytest.raises(ValueError, match="device|cpu"):
        fused(torch.randn(1, 4, 32), (2, 2))


@needs_cuda
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_dropout_rate_scale_and_backward_mask(backend):
    p = 0.3
    seed = torch.tensor([987654321])
    scale = mk.backends.dropout_scale(backend, seed, torch.empty(3000, 64, device="cuda"), p)
    kept = scale != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    assert torch.allclose(scale[kept], torch.full_like(scale[kept], 1 / (1 - p)))
    # The backward applies exactly the forward's mask: compare with the reference given that mask.
    ref, fused = gpu_pair(48, torch.float32, d=16)
    fused.backend, fused.dropout.p = backend, 0.4
    x = torch.randn(2, 6 * 7, 48, device="cuda", requires_grad=True)
    torch.manual_seed(11)
    out = fused(x, (6, 7))
    torch.manual_seed(11)
    # the fused plans draw their seed on the device; the PyTorch plan draws its mask as nn.Dropout does
    seed = torch.tensor([11]) if backend == "torch" else torch.randint(0, 2**62, (1,), device="cuda")
    ref.dropout = FixedScale(mk.backends.dropout_scale(backend, seed, torch.empty(84, 16, device="cuda"), 0.4))
    x_ref = x.detach().double().requires_grad_()
    out_ref = ref(x_ref, (6, 7))
    assert_close(out, out_ref, torch.float32, "out", scale=CHAIN_SCALE[torch.float32])
    g = torch.randn_like(out)
    for name, a, b in zip(["x"] + [n for n, _ in fused.named_parameters()],
                          torch.autograd.grad(out, [x, *fused.parameters()], g),
                          torch.autograd.grad(out_ref, [x_ref, *ref.parameters()], g.double())):
        assert_close(a, b, torch.float32, name, scale=CHAIN_SCALE[torch.float32])


@needs_cuda
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_cuda_graph_replay_matches_eager(backend):
    _, fused = gpu_pair(64, torch.bfloat16)
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


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_tensors_on_a_gpu_other_than_the_current_one(backend):
    ref, fused = gpu_pair(64, torch.float32, d=16)
    ref, fused = ref.to("cuda:1"), fused.to("cuda:1")
    fused.backend = backend
    with torch.cuda.device(0):
        for _ in range(3):  # three calls: nothing carries over between them
            x = torch.randn(2, 5 * 6, 64, device="cuda:1", requires_grad=True)
            check_adapter(fused, ref, x, (5, 6), torch.float32, CHAIN_SCALE[torch.float32])
        h = torch.randn(2, 5, 6, 16, device="cuda:1")
        c = fused.adapter_conv
        weights = [c.conv1.weight, c.conv1.bias, c.conv2.weight, c.conv2.bias, c.conv3.weight, c.conv3.bias]
        assert_close(mk.multiscale_dwconv(h, *weights, backend=backend),
                     multiscale_dwconv_ref(h.double(), *[w.double() for w in weights]), torch.float32, "h2")


@needs_cuda
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


_PARAM_NAMES = ["norm_weight", "norm_bias", "gamma", "gammax", "project1_weight", "project1_bias", "w3", "b3", "w5",
                "b5", "w7", "b7", "projector_weight", "projector_bias", "project2_weight", "project2_bias"]


@pytest.mark.parametrize("fault", ["shape", "dtype"])
@pytest.mark.parametrize("k", range(16), ids=_PARAM_NAMES)
def test_a_bad_parameter_is_named(k, fault):
    """mona() checks the sixteen parameters in one pass first; whatever fails it, the error must still
    name the parameter."""
    fused = mk.Mona(24, bottleneck=16, backend="torch")
    params = list(fused._params())
    q = params[k].detach()
    params[k] = q[..., None] if fault == "shape" else q.to(torch.int64)
    with pytest.raises((TypeError, ValueError), match=_PARAM_NAMES[k]):
        mk.functional.mona(torch.randn(2, 12, 24), (3, 4), *params, backend="torch")
