"""The standalone fused ops, LN-scaling and the merged multi-scale depthwise conv: values and every
gradient against the float64 reference, determinism, awkward layouts and clear errors, on the CPU
(every backend that runs there) and on the GPU (every dtype), and the CUDA backend's tilings."""
import pytest
import torch

from conftest import CPU_BACKENDS, DEVICE_BACKENDS, GPU_DTYPES, assert_close, assert_parity, needs_cuda
import mona_kernels as mk
from mona_kernels import ln_scale, multiscale_dwconv
from mona_kernels.ops.multiscale_dwconv import DWConv7Function, merge_kernels
from mona_kernels.reference import ln_scale_ref, multiscale_dwconv_ref

FUSED_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


def _ln_inputs(shape, dtype=torch.float64):
    C = shape[-1]
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    params = [torch.randn(C, dtype=dtype) for _ in range(4)]
    return [t.requires_grad_() for t in [x] + params]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 7, 37), (5, 3), (2, 3, 128), (1, 2, 1536), (65, 96)])
def test_ln_scale_matches_reference_with_all_gradients(backend, shape):
    inputs = _ln_inputs(shape)
    assert_parity(lambda *t: ln_scale(*t, backend=backend), ln_scale_ref, inputs, inputs,
                  ("x", "weight", "bias", "gamma", "gammax"), torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ln_scale_gradcheck(backend):
    x, *params = _ln_inputs((2, 3, 11))
    assert torch.autograd.gradcheck(lambda *t: ln_scale(*t, backend=backend), (x, *params))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ln_scale_weight_gradients_are_deterministic(backend):
    inputs = _ln_inputs((40, 33))
    dy = torch.randn(40, 33, dtype=torch.float64)
    first = torch.autograd.grad(ln_scale(*inputs, backend=backend), inputs, dy)
    second = torch.autograd.grad(ln_scale(*inputs, backend=backend), inputs, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ln_scale_non_contiguous_input(backend):
    x, *params = _ln_inputs((6, 40))
    x_view = x[:, ::2]
    params = [p[:20].detach() for p in params]
    assert_close(ln_scale(x_view, *params, backend=backend), ln_scale_ref(x_view, *params), torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ln_scale_nan_propagates_like_reference(backend):
    x, *params = _ln_inputs((4, 9))
    x = x.detach().clone()
    x[1, 3] = float("nan")
    y, y_ref = ln_scale(x, *params, backend=backend), ln_scale_ref(x, *params)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


def test_ln_scale_wrong_parameter_size_names_the_argument():
    x, w, b, g, gx = _ln_inputs((2, 8))
    with pytest.raises(ValueError, match="gamma"):
        ln_scale(x, w, b, g[:7], gx)


def test_ln_scale_unsupported_dtype_names_the_argument():
    x, *params = _ln_inputs((2, 8))
    with pytest.raises(TypeError, match="x"):
        ln_scale(x.detach().to(torch.int32), *params)


def test_ln_scale_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        ln_scale(*_ln_inputs((2, 8)), backend="fast")


def _dw_inputs(B, H, W, d, dtype=torch.float64):
    h = torch.randn(B, H, W, d, dtype=dtype)
    weights = []
    for k in (3, 5, 7):
        weights += [torch.randn(d, 1, k, k, dtype=dtype), torch.randn(d, dtype=dtype)]
    return [t.requires_grad_() for t in [h] + weights]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 1, 9, 4), (1, 9, 1, 4), (1, 1, 1, 3), (2, 13, 11, 70),
                                   (1, 3, 5, 256), (1, 17, 20, 64)])
def test_dwconv_matches_reference_with_all_gradients(backend, shape):
    inputs = _dw_inputs(*shape)
    assert_parity(lambda *t: multiscale_dwconv(*t, backend=backend), multiscale_dwconv_ref, inputs, inputs,
                  ("h", "w3", "b3", "w5", "b5", "w7", "b7"), torch.float64)


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_dwconv_gradcheck_merged_function(backend):
    """The fused backends' autograd Function over the merged kernel (the PyTorch plan differentiates
    through PyTorch's own conv instead)."""
    h = torch.randn(1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    K = torch.randn(49, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: DWConv7Function.apply(*t, backend), (h, K, bias))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dwconv_gradcheck_six_weights(backend):
    inputs = _dw_inputs(1, 3, 4, 2)
    assert torch.autograd.gradcheck(lambda *t: multiscale_dwconv(*t, backend=backend), inputs)


def test_dwconv_merged_kernel_is_identity_plus_average():
    _, w3, b3, w5, b5, w7, b7 = _dw_inputs(1, 1, 1, 5)
    K, bias = merge_kernels(w3, b3, w5, b5, w7, b7, dtype=torch.float64)
    K = K.t().reshape(5, 7, 7)
    expected = w7[:, 0].clone() / 3
    expected[:, 1:6, 1:6] += w5[:, 0] / 3
    expected[:, 2:5, 2:5] += w3[:, 0] / 3
    expected[:, 3, 3] += 1
    assert_close(K, expected, torch.float64)
    assert_close(bias, (b3 + b5 + b7) / 3, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dwconv_weight_gradients_are_deterministic(backend):
    inputs = _dw_inputs(2, 9, 10, 8)
    dout = torch.randn(2, 9, 10, 8, dtype=torch.float64)
    first = torch.autograd.grad(multiscale_dwconv(*inputs, backend=backend), inputs, dout)
    second = torch.autograd.grad(multiscale_dwconv(*inputs, backend=backend), inputs, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dwconv_non_contiguous_input(backend):
    h, *weights = _dw_inputs(1, 6, 5, 8)
    h_nchw = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    h_view = h_nchw.permute(0, 2, 3, 1)
    weights = [w[:4].detach() for w in weights]
    assert_close(multiscale_dwconv(h_view, *weights, backend=backend),
                 multiscale_dwconv_ref(h_view, *weights), torch.float64)


def test_dwconv_wrong_kernel_shape_names_the_argument():
    h, w3, b3, w5, b5, w7, b7 = _dw_inputs(1, 4, 4, 3)
    with pytest.raises(ValueError, match="w5"):
        multiscale_dwconv(h, w3, b3, w3, b5, w7, b7)


def test_dwconv_wrong_rank_names_the_argument():
    h, *weights = _dw_inputs(1, 4, 4, 3)
    with pytest.raises(ValueError, match="h must have rank 4"):
        multiscale_dwconv(h[0], *weights)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs TRITON_INTERPRET=1")
def test_dwconv_triton_merge_matches_torch_merge_in_float32():
    from mona_kernels.backends.triton.dwconv import merge_kernels as merge_triton
    from mona_kernels.ops.multiscale_dwconv import _merge_torch
    _, *weights = _dw_inputs(1, 1, 1, 70, dtype=torch.float32)
    weights = [w.detach() for w in weights]
    for got, expected in zip(merge_triton(*weights), _merge_torch(*weights, torch.float32)):
        assert_close(got, expected, torch.float32)


@needs_cuda
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(4, 37, 96), (2, 33, 1536), (3, 5, 2048), (6, 7, 512), (3, 7, 130), (5, 11, 6), (2, 9, 2046)])
def test_ln_scale_on_the_gpu_in_every_dtype(backend, dtype, shape):
    C = shape[-1]
    x64 = torch.randn(shape, device="cuda", dtype=torch.float64) * 2 + 0.5
    p64 = [torch.randn(C, device="cuda", dtype=torch.float64) for _ in range(4)]
    x = x64.to(dtype).requires_grad_()
    params = [p.float().requires_grad_() for p in p64]
    ref_inputs = [x.detach().double().requires_grad_()] + [p.detach().double().requires_grad_() for p in params]
    assert_parity(lambda *t: mk.ln_scale(*t, backend=backend), ln_scale_ref, [x, *params], ref_inputs,
                  "x w b gamma gammax".split(), dtype)


@needs_cuda
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
# (1, 257, 259, 24) is over the Triton conv's LARGE_MAP_PIXELS, which switches it to its large-map tile.
@pytest.mark.parametrize("shape", [(2, 57, 61, 64), (1, 1, 33, 64), (3, 20, 1, 40), (1, 31, 29, 256), (1, 257, 259, 24)])
def test_dwconv_on_the_gpu_in_every_dtype(backend, dtype, shape):
    B, H, W, d = shape
    h = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
    weights = []
    for k in (3, 5, 7):
        weights += [(torch.randn(d, 1, k, k, device="cuda") / k).requires_grad_(),
                    torch.randn(d, device="cuda").requires_grad_()]
    ref_inputs = [t.detach().double().requires_grad_() for t in [h, *weights]]
    assert_parity(lambda *t: mk.multiscale_dwconv(*t, backend=backend), multiscale_dwconv_ref, [h, *weights],
                  ref_inputs, "h w3 b3 w5 b5 w7 b7".split(), dtype)


@needs_cuda
@pytest.mark.skipif("cuda" not in DEVICE_BACKENDS, reason="the CUDA extension is not available")
@pytest.mark.parametrize("dtype", GPU_DTYPES)
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


@needs_cuda
@pytest.mark.skipif("cuda" not in DEVICE_BACKENDS, reason="the CUDA extension is not available")
@pytest.mark.parametrize("dtype", GPU_DTYPES)
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


@needs_cuda
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
