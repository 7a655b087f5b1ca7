"""ln_scale: outputs and all five gradients against the reference, gradcheck, and input errors."""
import pytest
import torch

from conftest import CPU_BACKENDS, assert_close, assert_parity
from mona_kernels import ln_scale
from mona_kernels.ops.ln_scale import LNScaleFunction
from mona_kernels.reference import ln_scale_ref


def _inputs(shape, dtype=torch.float64):
    C = shape[-1]
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    params = [torch.randn(C, dtype=dtype) for _ in range(4)]
    return [t.requires_grad_() for t in [x] + params]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 7, 37), (5, 3), (2, 3, 128), (1, 2, 1536), (65, 96)])
def test_matches_reference_with_all_gradients(backend, shape):
    inputs = _inputs(shape)
    assert_parity(lambda *t: ln_scale(*t, backend=backend), ln_scale_ref, inputs, inputs,
                  ("x", "weight", "bias", "gamma", "gammax"), torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    x, *params = _inputs((2, 3, 11))
    assert torch.autograd.gradcheck(
        lambda *t: LNScaleFunction.apply(t[0].view(-1, 11), *t[1:], 1e-5, backend), (x, *params))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_gradients_are_deterministic(backend):
    inputs = _inputs((40, 33))
    dy = torch.randn(40, 33, dtype=torch.float64)
    first = torch.autograd.grad(ln_scale(*inputs, backend=backend), inputs, dy)
    second = torch.autograd.grad(ln_scale(*inputs, backend=backend), inputs, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_input(backend):
    x, *params = _inputs((6, 40))
    x_view = x[:, ::2]
    params = [p[:20].detach() for p in params]
    assert_close(ln_scale(x_view, *params, backend=backend), ln_scale_ref(x_view, *params), torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates_like_reference(backend):
    x, *params = _inputs((4, 9))
    x = x.detach().clone()
    x[1, 3] = float("nan")
    y, y_ref = ln_scale(x, *params, backend=backend), ln_scale_ref(x, *params)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


def test_wrong_parameter_size_names_the_argument():
    x, w, b, g, gx = _inputs((2, 8))
    with pytest.raises(ValueError, match="gamma"):
        ln_scale(x, w, b, g[:7], gx)


def test_unsupported_dtype_names_the_argument():
    x, *params = _inputs((2, 8))
    with pytest.raises(TypeError, match="x"):
        ln_scale(x.detach().to(torch.int32), *params)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        ln_scale(*_inputs((2, 8)), backend="fast")
