"""The PyTorch plan: the adapter as autograd through PyTorch's own ops, for the CPU and for GPUs
where neither the Triton plan nor the CUDA extension runs. It differs from the reference in one
place: the three depthwise convs and the identity run as one merged 7x7 conv (49 taps instead of
9 + 25 + 49 and one weight gradient instead of three). torch.compile traces it like any model.
Also the standalone ops' PyTorch forms (``ln_scale_*``, ``dwconv7_*``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Params
from ..ops.utils import acc_dtype

KSIZE = 7
TAPS = KSIZE * KSIZE


def merged_kernel(w3, b3, w5, b5, w7, b7):
    """``(K, bias)``: the 7x7 depthwise kernel ``delta + (pad(w3) + pad(w5) + w7) / 3`` as (d, 1, 7, 7)
    and its bias ``(b3 + b5 + b7) / 3``; differentiable, so the three convs' gradients follow."""
    K = (F.pad(w3, (2, 2, 2, 2)) + F.pad(w5, (1, 1, 1, 1)) + w7) / 3.0
    delta = torch.zeros_like(K[:1])
    delta[..., 3, 3] = 1.0
    return K + delta, (b3 + b5 + b7) / 3.0


def adapter(x: torch.Tensor, q: Params, H: int, W: int, eps: float, p: float) -> torch.Tensor:
    """The adapter's output for tokens x (B, N, C), N = H * W; dropout ``p`` draws from torch's
    generator as ``nn.Dropout`` does."""
    B, N, C = x.shape
    d = q.W1.shape[0]
    if not torch.is_autocast_enabled(x.device.type) and any(t.dtype != x.dtype for t in q):
        q = Params(*(t.to(x.dtype) for t in q))  # as the fused plans: parameters in the tokens' dtype
    y = F.layer_norm(x, (C,), q.w_ln, q.b_ln, eps) * q.gamma + x * q.gammax
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


def ln_scale_fwd(x, w, b, gamma, gammax, eps):
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    mean = xf.mean(dim=1)
    xc = xf - mean[:, None]
    rstd = torch.rsqrt((xc * xc).mean(dim=1) + eps)
    xn = xc * rstd[:, None]
    y = (xn * w.to(acc) + b.to(acc)) * gamma.to(acc) + xf * gammax.to(acc)
    return y.to(x.dtype), mean, rstd


def ln_scale_bwd(dy, x, w, b, gamma, gammax, mean, rstd):
    acc = mean.dtype
    xf, dyf = x.to(acc), dy.to(acc)
    w, b, gamma, gammax = (p.to(acc) for p in (w, b, gamma, gammax))
    xn = (xf - mean[:, None]) * rstd[:, None]
    t = dyf * (gamma * w)
    dx = dyf * gammax + rstd[:, None] * (t - t.mean(1, keepdim=True) - xn * (t * xn).mean(1, keepdim=True))
    dy_xn = (dyf * xn).sum(0)
    dy_sum = dyf.sum(0)
    rows = [dy_xn * w + dy_sum * b, (dyf * xf).sum(0), dy_xn * gamma, dy_sum * gamma]
    return dx.to(x.dtype), torch.stack(rows)


def dwconv7_fwd(h, K, bias, flip: bool = False):
    """The merged conv over channels-last h by PyTorch's depthwise conv2d; ``flip`` rotates K."""
    D = h.shape[-1]
    acc = K.dtype
    weight = (K.flip(0) if flip else K).t().reshape(D, 1, KSIZE, KSIZE)
    out = F.conv2d(h.permute(0, 3, 1, 2).to(acc), weight, bias, padding=KSIZE // 2, groups=D)
    return out.permute(0, 2, 3, 1).to(h.dtype).contiguous()


def dwconv7_wgrad(h, dout):
    """``(50, d)``: the merged kernel's gradient and the bias's, by PyTorch's conv2d_weight."""
    D = h.shape[-1]
    acc = acc_dtype(h.dtype)
    hc = h.permute(0, 3, 1, 2).to(acc)
    gc = dout.permute(0, 3, 1, 2).to(acc)
    dK = torch.nn.grad.conv2d_weight(hc, (D, 1, KSIZE, KSIZE), gc, padding=KSIZE // 2, groups=D)
    return torch.cat([dK.reshape(D, TAPS).t(), gc.sum(dim=(0, 2, 3))[None]])
