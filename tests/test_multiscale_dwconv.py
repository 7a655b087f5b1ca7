"""multiscale_dwconv: output and all seven gradients against three separate convs, gradcheck,
determinism, awkward sizes and input errors."""
import pytest
import torch

from conftest import CPU_BACKENDS, assert_close, assert_parity
from mona_kernels import multiscale_dwconv
from mona_kernels.ops.multiscale_dwconv import DWConv7Function, merge_kernels
from mona_kernels.reference import multiscale_dwconv_ref


def _inputs(B, H, W, d, dtype=torch.float64):
    h = torch.randn(B, H, W, d, dtype=dtype)
    weights = []
    for k in (3, 5, 7):
        weights += [torch.randn(d, 1, k, k, dtype=dtype), torch.randn(d, dtype=dtype)]
    return [t.requires_grad_() for t in [h] + weights]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 1, 9, 4), (1, 9, 1, 4), (1, 1, 1, 3), (2, 13, 11, 70),
                                   (1, 3, 5, 256), (1, 17, 20, 64)])
def test_matches_reference_with_all_gradients(backend, shape):
    inputs = _inputs(*shape)
    assert_parity(lambda *t: multiscale_dwconv(*t, backend=backend), multiscale_dwconv_ref, inputs, inputs,
                  ("h", "w3", "b3", "w5", "b5", "w7", "b7"), torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_merged_function(backend):
    h = torch.randn(1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    K = torch.randn(49, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: DWConv7Function.apply(*t, backend), (h, K, bias))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_six_weights(backend):
    inputs = _inputs(1, 3, 4, 2)
    assert torch.autograd.gradcheck(lambda *t: multiscale_dwconv(*t, backend=backend), inputs)


def test_merged_kernel_is_identity_plus_average():
    _, w3, b3, w5, b5, w7, b7 = _inputs(1, 1, 1, 5)
    K, bias = merge_kernels(w3, b3, w5, b5, w7, b7, dtype=torch.float64)
    K = K.t().reshape(5, 7, 7)
    expected = w7[:, 0].clone() / 3
    expected[:, 1:6, 1:6] += w5[:, 0] / 3
    expected[:, 2:5, 2:5] += w3[:, 0] / 3
    expected[:, 3, 3] += 1
    assert_close(K, expected, torch.float64)
    assert_close(bias, (b3 + b5 + b7) / 3, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_gradients_are_deterministic(backend):
    inputs = _inputs(2, 9, 10, 8)
    dout = torch.randn(2, 9, 10, 8, dtype=torch.float64)
    first = torch.autograd.grad(multiscale_dwconv(*inputs, backend=backend), inputs, dout)
    second = torch.autograd.grad(multiscale_dwconv(*inputs, backend=backend), inputs, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_input(backend):
    h, *weights = _inputs(1, 6, 5, 8)
    h_nchw = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    h_view = h_nchw.permute(0, 2, 3, 1)
    weights = [w[:4].detach() for w in weights]
    assert_close(multiscale_dwconv(h_view, *weights, backend=backend),
                 multiscale_dwconv_ref(h_view, *weights), torch.float64)


def test_wrong_kernel_shape_names_the_argument():
    h, w3, b3, w5, b5, w7, b7 = _inputs(1, 4, 4, 3)
    with pytest.raises(ValueError, match="w5"):
        multiscale_dwconv(h, w3, b3, w3, b5, w7, b7)


def test_wrong_rank_names_the_argument():
    h, *weights = _inputs(1, 4, 4, 3)
    with pytest.raises(ValueError, match="h must have rank 4"):
        multiscale_dwconv(h[0], *weights)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs TRITON_INTERPRET=1")
def test_triton_merge_matches_torch_merge_in_float32():
    from mona_kernels.ops.multiscale_dwconv import _merge_torch, _merge_triton
    _, *weights = _inputs(1, 1, 1, 70, dtype=torch.float32)
    weights = [w.detach() for w in weights]
    for got, expected in zip(_merge_triton(*weights, torch.float32), _merge_torch(*weights, torch.float32)):
        assert_close(got, expected, torch.float32)
