"""The PyTorch plan: the adapter as autograd through PyTorch's own ops, for the CPU and for GPUs
where neither the Triton plan nor the CUDA extension runs. It differs from the reference in two
places: the three depthwise convs and the identity run as one merged 7x7 conv (49 taps instead of
9 + 25 + 49 and one weight gradient instead of three), and LayerNorm-scaling takes two passes over
the tokens instead of four (gamma folded into LayerNorm's affine). torch.compile traces it like any
model.
The standalone ops' PyTorch forms, :func:`ln_scale` and :func:`multiscale_dwconv`, differentiate the
same way."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Params


def merged_kernel(w3, b3, w5, b5, w7, b7):
    """``(K, bias)``: the 7x7 depthwise kernel ``delta + (pad(w3) + pad(w5) + w7) / 3`` as (d, 1, 7, 7)
    and its bias ``(b3 + b5 + b7) / 3``; differentiable, so the three convs' gradients follow."""
    K = (F.pad(w3, (2, 2, 2, 2)) + F.pad(w5, (1, 1, 1, 1)) + w7) / 3.0
    delta = torch.zeros_like(K[:1])
    delta[..., 3, 3] = 1.0
    return K + delta, (b3 + b5 + b7) / 3.0


def _like_tokens(x: torch.Tensor, params):
    """The parameters in the tokens' dtype outside autocast, as the fused plans compute (PyTorch's
    LayerNorm and convs take no mixed dtypes); under autocast, as they are."""
    if torch.is_autocast_enabled(x.device.type) or all(t.dtype == x.dtype for t in params):
        return params
    return [t.to(x.dtype) for t in params]


def _scaled_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor, gammax: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """``LayerNorm(x) * gamma + x * gammax`` in two passes over the tokens instead of the reference's
    four (LayerNorm, two products, a sum): gamma folded into LayerNorm's affine,
    (xn * w + b) * gamma = xn * (w * gamma) + b * gamma, in the parameters' dtype, then one addcmul."""
    w, b, gammax = _like_tokens(x, (w * gamma, b * gamma, gammax))
    return torch.addcmul(F.layer_norm(x, x.shape[-1:], w, b, eps), x, gammax)


def adapter(x: torch.Tensor, q: Params, H: int, W: int, eps: float, p: float) -> torch.Tensor:
    """The adapter's output for tokens x (B, N, C), N = H * W; dropout ``p`` draws from torch's
    generator as ``nn.Dropout`` does."""
    B, N, C = x.shape
    d = q.W1.shape[0]
    y = _scaled_layer_norm(x, q.w_ln, q.b_ln, q.gamma, q.gammax, eps)
    q = Params(*q[:4], *_like_tokens(x, q[4:]))  # the four LayerNorm-scaling ones are used above
    h1 = F.linear(y, q.W1, q.b1)
    K, bias = merged_kernel(q.w3, q.b3, q.w5, q.b5, q.w7, q.b7)
    # channels-last tokens viewed as NCHW: the conv reads them in place
    h2 = F.conv2d(h1.view(B, H, W, d).permute(0, 3, 1, 2), K.to(h1.dtype), bias.to(h1.dtype), padding=3, groups=d)
    h2 = h2.permute(0, 2, 3, 1).reshape(B, N, d)
    h3 = h2 + F.linear(h2, q.Wp.view(d, d), q.bp)
    a = F.dropout(F.gelu(h3), p, training=p > 0)
    return x + F.linear(a, q.W2, q.b2)


def dropout_scale(seed: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """The mask :func:`adapter` draws for activations like ``like`` after ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[like.device] if like.is_cuda else []):
        torch.manual_seed(int(seed))
        return F.dropout(torch.ones_like(like), p)


def ln_scale(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor, gammax: torch.Tensor,
             eps: float) -> torch.Tensor:
    """``LayerNorm(x) * gamma + x * gammax`` over the last dimension, by PyTorch's own LayerNorm."""
    return _scaled_layer_norm(x, w, b, gamma, gammax, eps)


def multiscale_dwconv(h: torch.Tensor, w3, b3, w5, b5, w7, b7) -> torch.Tensor:
    """``h + (dw3(h) + dw5(h) + dw7(h)) / 3`` for channels-last h (B, H, W, d), as one merged 7x7 conv
    that reads h in place."""
    d = h.shape[-1]
    K, bias = merged_kernel(*_like_tokens(h, (w3, b3, w5, b5, w7, b7)))
    return F.conv2d(h.permute(0, 3, 1, 2), K, bias, padding=3, groups=d).permute(0, 2, 3, 1)
