"""One-call functional forms of the fused ops."""
from __future__ import annotations

import torch

from . import backends
from .ops.ln_scale import check_ln_params, ln_scale
from .ops.multiscale_dwconv import check_dwconv_params, multiscale_dwconv
from .ops.utils import SUPPORTED_DTYPES, check_dropout, check_eps, check_pixels, check_tensor, on_input_device

__all__ = ["ln_scale", "multiscale_dwconv", "mona", "MAX_BOTTLENECK"]

# Widest bottleneck the fused kernels are built and tested for.
MAX_BOTTLENECK = 256


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _is_int(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def hw_pair(hw_shapes) -> tuple[int, int]:
    """``(H, W)`` from a pair of positive integers: a tuple, list or ``torch.Size``, or an integer
    tensor of two elements."""
    values = hw_shapes
    if isinstance(values, torch.Tensor) and values.dim() == 1 and not values.is_floating_point():
        values = list(values)
    if not isinstance(values, (tuple, list)) or len(values) != 2 or not all(_is_int(v) for v in values):
        raise TypeError(f"hw_shapes must be two integers (H, W), got {hw_shapes!r}")
    H, W = (int(v) if isinstance(v, torch.Tensor) else v for v in values)
    if H < 1 or W < 1:
        raise ValueError(f"hw_shapes must be two positive integers (H, W), got ({H}, {W})")
    return H, W


@on_input_device
def mona(x, hw_shapes, norm_weight, norm_bias, gamma, gammax, project1_weight, project1_bias,
         conv1_weight, conv1_bias, conv2_weight, conv2_bias, conv3_weight, conv3_bias,
         projector_weight, projector_bias, project2_weight, project2_bias,
         dropout: float = 0.0, eps: float = 1e-5, backend: str | None = None):
    """The whole Mona adapter on tokens ``x`` (B, N, C), ``N = H * W``, fused; returns (B, N, C).

    ``dropout`` is the probability applied (pass 0 in eval). Weights are named and shaped as in
    :class:`mona_kernels.reference.Mona`.
    """
    check_tensor("x", x, ndim=3)
    H, W = hw_pair(hw_shapes)
    B, N, C = x.shape
    if N != H * W:
        raise ValueError(f"x has N={N} tokens but hw_shapes=({H}, {W}) gives H*W={H * W}")
    check_pixels("x", B * N)
    params = backends.Params(norm_weight, norm_bias, gamma, gammax, project1_weight, project1_bias, conv1_weight,
                             conv1_bias, conv2_weight, conv2_bias, conv3_weight, conv3_bias, projector_weight,
                             projector_bias, project2_weight, project2_bias)
    if not _well_formed(x, params):
        _check_params(x, params)
    dropout = check_dropout(dropout)
    name = backends.resolve(x.device, backend)
    return backends.adapter(name, x, params, H, W, check_eps(eps), dropout, _compute_dtype(x))


def _shapes(C: int, d: int) -> tuple:
    """The sixteen parameters' shapes, in the order of :class:`backends.Params`."""
    return ((C,), (C,), (C,), (C,), (d, C), (d,), (d, 1, 3, 3), (d,), (d, 1, 5, 5), (d,), (d, 1, 7, 7), (d,),
            (d, d, 1, 1), (d,), (C, d), (C,))


def _well_formed(x: torch.Tensor, params: backends.Params) -> bool:
    """The common case at a fraction of the checks' host time (an eager step calls this once per
    adapter): every parameter a tensor of a supported dtype, on x's device, of its shape."""
    try:
        d = params.W1.shape[0]
        device = x.device
        return (d <= MAX_BOTTLENECK and tuple(q.shape for q in params) == _shapes(x.shape[2], d)
                and all(q.device == device and q.dtype in SUPPORTED_DTYPES for q in params))
    except (AttributeError, IndexError):
        return False


def _check_params(x: torch.Tensor, q: backends.Params):
    """Raises the error that names the first parameter that is not as :func:`mona` expects."""
    C = x.shape[2]
    check_ln_params(C, x, norm_weight=q.w_ln, norm_bias=q.b_ln, gamma=q.gamma, gammax=q.gammax)
    check_tensor("project1_weight", q.W1, ndim=2, like=x)
    d = q.W1.shape[0]
    if q.W1.shape[1] != C:
        raise ValueError(f"project1_weight must be (d, {C}) for x with {C} channels, got {tuple(q.W1.shape)}")
    if d > MAX_BOTTLENECK:
        raise ValueError(f"bottleneck width d={d} is over the supported maximum {MAX_BOTTLENECK}")
    check_tensor("project1_bias", q.b1, size=(d,), like=x)
    check_dwconv_params(d, x, w3=q.w3, b3=q.b3, w5=q.w5, b5=q.b5, w7=q.w7, b7=q.b7)
    check_tensor("projector_weight", q.Wp, size=(d, d, 1, 1), like=x)
    check_tensor("projector_bias", q.bp, size=(d,), like=x)
    check_tensor("project2_weight", q.W2, size=(C, d), like=x)
    check_tensor("project2_bias", q.b2, size=(C,), like=x)
