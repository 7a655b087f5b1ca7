"""The drop-in fused Mona module: parity with the reference, state_dict, layouts, dropout, folding,
conversion of existing models, and input errors."""
import pytest
import torch
import torch.nn as nn

from conftest import CPU_BACKENDS, TOLERANCE, assert_close, randomize_, rel_err
import mona_kernels as mk
from mona_kernels.reference import Mona as RefMona

F64 = torch.float64


def _pair(C=24, d=16, dropout=0.0, backend=None):
    ref = randomize_(RefMona(C, bottleneck=d, dropout=dropout).to(F64))
    fused = mk.Mona(C, bottleneck=d, dropout=dropout, backend=backend).to(F64)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


# Whole-adapter gradients chain several fp32 matmuls: a wider budget than one op's 1e-5.
CHAIN_SCALE = {F64: 1.0, torch.float32: 10.0}


# float32 with d <= 64 takes the single-kernel tails on Triton; float64 the composite path. C = 130
# and C = 520 run the fused up projection (forward) and its gradient (backward) over 3 blocks of 64
# and 5 of 128 (forward) or 64 (backward) channels, the last one partial. 2x9x11 has 7 pixel tiles,
# so the backward's persistent programs (4 on the CPU) each sum several tiles' bias gradients.
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B,H,W,C,d", [(2, 5, 7, 24, 16), (1, 1, 6, 10, 8), (1, 7, 1, 33, 64), (3, 3, 4, 48, 12),
                                       (1, 3, 5, 130, 16), (1, 2, 3, 520, 8), (2, 9, 11, 40, 16)])
def test_outputs_and_every_gradient_match_reference(backend, B, H, W, C, d, dtype):
    ref, fused = _pair(C, d, backend=backend)
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
    ref, fused = _pair()
    back = RefMona(24, bottleneck=16).to(F64)
    back.load_state_dict(fused.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_spatial_layout_input_returns_spatial_layout(backend):
    ref, fused = _pair(backend=backend)
    x = torch.randn(2, 4, 5, 24, dtype=F64)
    out = fused(x)
    assert out.shape == x.shape
    assert_close(out, ref(x.reshape(2, 20, 24), (4, 5)).view_as(x), F64)


def test_dropout_is_reproducible_under_manual_seed_and_differs_between_seeds():
    _, fused = _pair(dropout=0.5)
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
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_backward_reuses_the_forward_dropout_mask(backend, dtype):
    _, fused = _pair(dropout=0.4, backend=backend)
    fused.to(dtype)
    x64 = torch.randn(1, 20, 24, dtype=F64)
    x = x64.to(dtype).requires_grad_()
    torch.manual_seed(7)
    out = fused(x, (4, 5))
    # Redraw the seed the forward drew (the PyTorch plan draws its mask right after the manual seed),
    # and give the reference exactly that mask.
    torch.manual_seed(7)
    seed = torch.tensor([7]) if backend == "torch" else torch.randint(0, 2**62, (1,))
    scale = mk.backends.dropout_scale(backend, seed, torch.empty(20, 16, dtype=dtype), 0.4)
    assert (scale == 0).any()
    ref = RefMona(24, bottleneck=16, dropout=0.0).to(F64)
    ref.load_state_dict(fused.state_dict())
    ref.dropout = _FixedScale(scale)
    x_ref = x64.clone().requires_grad_()
    out_ref = ref(x_ref, (4, 5))
    assert_close(out, out_ref, dtype, "out", scale=CHAIN_SCALE[dtype])
    g = torch.randn_like(out_ref)
    grads = torch.autograd.grad(out, [x, *fused.parameters()], g.to(dtype))
    grads_ref = torch.autograd.grad(out_ref, [x_ref, *ref.parameters()], g)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, dtype, scale=CHAIN_SCALE[dtype])


class _FixedScale(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, a):
        return a * self.scale.view(a.shape)


def test_fold_warns_and_changes_nothing():
    ref, fused = _pair()
    fused.eval()
    ref.eval()
    x = torch.randn(2, 30, 24, dtype=F64)
    before = fused(x, (5, 6))
    with pytest.warns(FutureWarning, match="no longer needed"):
        assert fused.fold() is fused
    assert torch.equal(fused(x, (5, 6)), before)
    assert_close(before, ref(x, (5, 6)), F64)


def test_eval_under_no_grad_keeps_no_graph():
    _, fused = _pair()
    fused.eval()
    with torch.no_grad():
        out = fused(torch.randn(1, 6, 24, dtype=F64), (2, 3))
    assert out.grad_fn is None and not out.requires_grad


def test_a_parametrized_weight_is_used():
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    ref, fused = _pair()
    parametrize.register_parametrization(fused.project1, "weight", Double())
    with torch.no_grad():
        ref.project1.weight.mul_(2)
    x = torch.randn(1, 6, 24, dtype=F64)
    assert_close(fused(x, (2, 3)), ref(x, (2, 3)), F64, "out")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_is_right_or_raises_never_wrong(backend):
    """The fused kernels have no derivatives of their own, so a double backward raises; the PyTorch
    plan is autograd through PyTorch's ops, so its double backward is the reference's."""
    ref, fused = _pair(backend=backend)
    x = torch.randn(1, 6, 24, dtype=F64, requires_grad=True)
    (dx,) = torch.autograd.grad(fused(x, (2, 3)).square().sum(), x, create_graph=True)
    if backend == "torch":
        (dx_ref,) = torch.autograd.grad(ref(x, (2, 3)).square().sum(), x, create_graph=True)
        assert_close(torch.autograd.grad(dx.sum(), x)[0], torch.autograd.grad(dx_ref.sum(), x)[0], F64)
        return
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|no autograd formula"):
        torch.autograd.grad(dx.sum(), x)


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
    _, fused = _pair()
    shape, hw = args
    with pytest.raises(error, match=match):
        fused(torch.randn(*shape, dtype=F64), hw)


@pytest.mark.parametrize("hw", [(3, 4), [3, 4], torch.Size([3, 4]), torch.tensor([3, 4]),
                                (torch.tensor(3), torch.tensor(4))], ids=["tuple", "list", "size", "tensor", "0-d"])
def test_hw_shapes_takes_any_pair_of_integers(hw):
    ref, fused = _pair()
    x = torch.randn(2, 12, 24, dtype=F64)
    assert_close(fused(x, hw), ref(x, (3, 4)), F64)


def test_channels_first_input_to_the_depthwise_op_names_the_layout():
    conv = RefMona(24, bottleneck=16).adapter_conv
    weights = [conv.conv1.weight, conv.conv1.bias, conv.conv2.weight, conv.conv2.bias, conv.conv3.weight,
               conv.conv3.bias]
    with pytest.raises(ValueError, match=r"channels-last \(B, H, W, d\).*permute"):
        mk.multiscale_dwconv(torch.randn(2, 16, 5, 6), *weights)


def test_missing_hw_shapes_is_an_error():
    _, fused = _pair()
    with pytest.raises(ValueError, match="hw_shapes"):
        fused(torch.randn(1, 6, 24, dtype=F64))


def test_integer_input_is_a_type_error():
    _, fused = _pair()
    with pytest.raises(TypeError, match="x"):
        fused(torch.ones(1, 6, 24, dtype=torch.int64), (2, 3))


def test_bottleneck_over_maximum_is_refused():
    fused = mk.Mona(8, bottleneck=mk.MAX_BOTTLENECK + 1)
    with pytest.raises(ValueError, match="bottleneck"):
        fused(torch.randn(1, 4, 8), (2, 2))


# The Triton interpreter converts fp32 to bf16 by truncation, where GPUs round to nearest, so the
# Triton path runs here under fp16 autocast (rounded to nearest on both) and its bf16 accuracy is
# checked on the GPU (test_gpu.py). Both run fp32 tokens and parameters through the compute-dtype
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_traces_without_graph_breaks(backend):
    """The whole forward and backward are registered ops, so dynamo traces the module in one graph."""
    if backend == "triton":
        pytest.skip("torch.compile cannot trace the Triton interpreter; tests/test_gpu.py compiles the Triton plan")
    ref, fused = _pair(backend=backend)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 20, 24, dtype=F64, requires_grad=True)
    out = compiled(x, (4, 5))
    assert_close(out, ref(x, (4, 5)), F64)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *fused.parameters()], g)
    grads_ref = torch.autograd.grad(ref(x, (4, 5)), [x, *ref.parameters()], g)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, F64)
