"""One-call functional forms of the fused ops."""
from __future__ import annotations

import torch

from . import backends
from .ops.ln_scale import check_ln_params, ln_scale
from .ops.multiscale_dwconv import check_dwconv_params, multiscale_dwconv
from .ops.utils import check_pixels, check_tensor, on_input_device

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
    check_ln_params(C, x, norm_weight=norm_weight, norm_bias=norm_bias, gamma=gamma, gammax=gammax)
    check_tensor("project1_weight", project1_weight, ndim=2, like=x)
    d = project1_weight.shape[0]
    if project1_weight.shape[1] != C:
        raise ValueError(f"project1_weight must be (d, {C}) for x with {C} channels, got {tuple(project1_weight.shape)}")
    if d > MAX_BOTTLENECK:
        raise ValueError(f"bottleneck width d={d} is over the supported maximum {MAX_BOTTLENECK}")
    check_tensor("project1_bias", project1_bias, size=(d,), like=x)
    check_dwconv_params(d, x, w3=conv1_weight, b3=conv1_bias, w5=conv2_weight, b5=conv2_bias,
                        w7=conv3_weight, b7=conv3_bias)
    check_tensor("projector_weight", projector_weight, size=(d, d, 1, 1), like=x)
    check_tensor("projector_bias", projector_bias, size=(d,), like=x)
    check_tensor("project2_weight", project2_weight, size=(C, d), like=x)
    check_tensor("project2_bias", project2_bias, size=(C,), like=x)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    name = backends.resolve(x.device, backend)
    params = backends.Params(norm_weight, norm_bias, gamma, gammax, project1_weight, project1_bias, conv1_weight,
                             conv1_bias, conv2_weight, conv2_bias, conv3_weight, conv3_bias, projector_weight,
                             projector_bias, project2_weight, project2_bias)
    return backends.adapter(name, x, params, H, W, float(eps), float(dropout), _compute_dtype(x))
