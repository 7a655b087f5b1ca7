"""The oracle: the Mona adapter in plain PyTorch, as docs/design.md defines it.

Parameter names, shapes and initial values match the authors' checkpoints, so a state_dict saved
from their module loads here unchanged, and ``mona_kernels.Mona`` loads this module's unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MonaOp", "Mona", "multiscale_dwconv_ref", "ln_scale_ref"]


def ln_scale_ref(x, weight, bias, gamma, gammax, eps: float = 1e-5):
    """``LayerNorm(x) * gamma + x * gammax`` over the last dimension."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps) * gamma + x * gammax


def multiscale_dwconv_ref(h, w3, b3, w5, b5, w7, b7):
    """``h + (dw3(h) + dw5(h) + dw7(h)) / 3`` for channels-last ``h`` of shape (B, H, W, d)."""
    hc = h.permute(0, 3, 1, 2)
    d = hc.shape[1]
    convs = [F.conv2d(hc, w, b, padding=w.shape[-1] // 2, groups=d) for w, b in ((w3, b3), (w5, b5), (w7, b7))]
    out = (convs[0] + convs[1] + convs[2]) / 3.0 + hc
    return out.permute(0, 2, 3, 1)


class MonaOp(nn.Module):
    """Multi-scale depthwise convolution with averaging, then a 1x1 projector with a residual (NCHW)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size=3, padding=1, groups=in_features)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size=5, padding=2, groups=in_features)
        self.conv3 = nn.Conv2d(in_features, in_features, kernel_size=7, padding=3, groups=in_features)
        self.projector = nn.Conv2d(in_features, in_features, kernel_size=1)

    def forward(self, x):
        h2 = (self.conv1(x) + self.conv2(x) + self.conv3(x)) / 3.0 + x
        return h2 + self.projector(h2)


class Mona(nn.Module):
    """The Mona adapter on tokens ``x`` of shape (B, N, C) with ``N = H * W``.

    ``Mona(in_dim, factor)`` is the authors' constructor: their ``factor`` is accepted and unused, as
    in their code, and the bottleneck is 64 wide. ``bottleneck``, ``dropout`` and ``eps`` are keywords.
    """

    def __init__(self, in_dim: int, factor: int = 4, *, bottleneck: int = 64, dropout: float = 0.1,
                 eps: float = 1e-5):
        super().__init__()
        self.project1 = nn.Linear(in_dim, bottleneck)
        self.project2 = nn.Linear(bottleneck, in_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.adapter_conv = MonaOp(bottleneck)
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.gamma = nn.Parameter(torch.ones(in_dim) * 1e-6)
        self.gammax = nn.Parameter(torch.ones(in_dim))

    def forward(self, x, hw_shapes):
        identity = x
        y = self.norm(x) * self.gamma + x * self.gammax
        h1 = self.project1(y)
        b, n, d = h1.shape
        h, w = hw_shapes
        h1 = h1.reshape(b, h, w, d).permute(0, 3, 1, 2)
        h3 = self.adapter_conv(h1).permute(0, 2, 3, 1).reshape(b, n, d)
        a = self.dropout(F.gelu(h3))
        return identity + self.project2(a)
