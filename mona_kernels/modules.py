"""``nn.Module`` drop-ins; each only gathers its parameters and calls the fused op."""
from __future__ import annotations

import operator
import warnings

import torch

from . import backends, reference
from .functional import MAX_BOTTLENECK, hw_pair, mona
from .ops.utils import check_dropout, check_eps


def _is_size(value, most=None) -> bool:
    """Whether ``value`` is an integer (Python's or numpy's) from 1 to ``most``."""
    try:
        n = operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool) and n >= 1 and (most is None or n <= most)


class Mona(reference.Mona):
    """The Mona adapter, fused. Same constructor (the authors' ``Mona(in_dim, factor)``), parameter
    names and state_dict as the reference.

    ``forward(x, hw_shapes)`` takes tokens (B, N, C) with ``N = H * W``; it also takes (B, H, W, C)
    without ``hw_shapes`` and returns that layout. ``backend`` forces ``'triton'`` or ``'torch'``.
    """

    def __init__(self, in_dim: int, factor: int = 4, *, bottleneck: int = 64, dropout: float = 0.1,
                 eps: float = 1e-5, backend: str | None = None):
        for name, value, most in (("in_dim", in_dim, None), ("bottleneck", bottleneck, MAX_BOTTLENECK)):
            if not _is_size(value, most):
                raise ValueError(f"{name} must be a positive integer{f' up to {most}' if most else ''}, "
                                 f"got {value!r}")
        check_eps(eps)
        check_dropout(dropout)
        backends.check_name(backend)
        super().__init__(in_dim, factor, bottleneck=bottleneck, dropout=dropout, eps=eps)
        self.backend = backend

    def _params(self):
        # Plain dict lookups: nn.Module.__getattr__ costs about a microsecond a name, every call. A
        # name that is not a registered parameter (a parametrization's property) takes getattr.
        mods = self._modules
        conv = mods["adapter_conv"]._modules
        owners = (mods["norm"], self, mods["project1"], conv["conv1"], conv["conv2"], conv["conv3"],
                  conv["projector"], mods["project2"])
        names = [("gamma", "gammax") if m is self else ("weight", "bias") for m in owners]
        try:
            return tuple(m._parameters[n] for m, pair in zip(owners, names) for n in pair)
        except KeyError:
            return tuple(getattr(m, n) for m, pair in zip(owners, names) for n in pair)

    def forward(self, x, hw_shapes=None):
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be tokens (B, N, C) with hw_shapes=(H, W), or a map (B, H, W, C); got {shape}")
        in_dim = self.gammax.shape[0]
        if x.shape[-1] != in_dim:
            raise ValueError(f"x has {x.shape[-1]} channels (its last dimension) but this Mona was built with "
                             f"in_dim={in_dim}")
        spatial = x.dim() == 4
        if spatial:
            if hw_shapes is not None and hw_pair(hw_shapes) != tuple(x.shape[1:3]):
                raise ValueError(f"hw_shapes={tuple(hw_shapes)} disagrees with x of shape {tuple(x.shape)}")
            B, H, W, C = x.shape
            hw_shapes = (H, W)
            x = x.reshape(B, H * W, C)
        elif hw_shapes is None:
            raise ValueError(f"hw_shapes=(H, W) is required for tokens x of shape {tuple(x.shape)} (B, N, C)")
        p = self.dropout.p if self.training else 0.0
        out = mona(x, hw_shapes, *self._params(), dropout=p, eps=self.norm.eps, backend=self.backend)
        return out.view(B, H, W, C) if spatial else out

    def fold(self):
        """Does nothing and warns: every backend merges the three depthwise convs and the identity into
        one 7x7 kernel where it runs them, so there is nothing left to fold for inference. Kept so that
        code written for earlier versions runs; returns the module."""
        warnings.warn("Mona.fold() is no longer needed and changes nothing: every backend merges the convs "
                      "inside its kernels", FutureWarning, stacklevel=2)
        return self
