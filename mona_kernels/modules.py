"""``nn.Module`` drop-ins; each only gathers its parameters and calls the fused op."""
from __future__ import annotations

import torch

from . import backend as _backend, reference
from .functional import hw_pair, mona, mona_merged
from .ops.multiscale_dwconv import merge_kernels
from .ops.utils import acc_dtype, cast


class Mona(reference.Mona):
    """The Mona adapter, fused. Same constructor (the authors' ``Mona(in_dim, factor)``), parameter
    names and state_dict as the reference.

    ``forward(x, hw_shapes)`` takes tokens (B, N, C) with ``N = H * W``; it also takes (B, H, W, C)
    without ``hw_shapes`` and returns that layout. ``backend`` forces ``'triton'`` or ``'torch'``.
    """

    def __init__(self, in_dim: int, factor: int = 4, *, bottleneck: int = 64, dropout: float = 0.1,
                 eps: float = 1e-5, backend: str | None = None):
        super().__init__(in_dim, factor, bottleneck=bottleneck, dropout=dropout, eps=eps)
        self.backend = backend
        self._folded = None

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
        # the Triton and PyTorch plans merge the convs where they run them: folding changes nothing there
        if self._folded is not None and not self.training and _backend.resolve(x.device, self.backend) == "cuda":
            out = self._forward_folded(x, hw_shapes)
        else:
            out = mona(x, hw_shapes, *self._params(), dropout=p, eps=self.norm.eps, backend=self.backend)
        return out.view(B, H, W, C) if spatial else out

    def fold(self):
        """Merge the three depthwise convs and the identity into one 7x7 kernel for inference.

        Outputs do not change; the parameters stay as they are (checkpoints still load and save).
        Entering training mode, or changing the weights, calls for :meth:`unfold` or a new ``fold``.
        """
        conv = self.adapter_conv
        with torch.no_grad():
            K, bias = merge_kernels(conv.conv1.weight, conv.conv1.bias, conv.conv2.weight, conv.conv2.bias,
                                    conv.conv3.weight, conv.conv3.bias, dtype=acc_dtype(conv.conv3.weight.dtype))
        self._folded = (K.contiguous(), bias)
        return self

    def unfold(self):
        self._folded = None
        return self

    def train(self, mode: bool = True):
        if mode:
            self._folded = None
        return super().train(mode)

    def _forward_folded(self, x, hw_shapes):
        B, N, C = x.shape
        H, W = hw_pair(hw_shapes)
        if N != H * W:
            raise ValueError(f"x has N={N} tokens but hw_shapes=({H}, {W}) gives H*W={H * W}")
        K, bias = self._folded
        d = K.shape[1]
        conv = self.adapter_conv
        return mona_merged(x, (B, H, W), self.norm.weight, self.norm.bias, self.gamma, self.gammax,
                           self.project1.weight, self.project1.bias, cast(K, acc_dtype(x.dtype)), cast(bias, acc_dtype(x.dtype)),
                           conv.projector.weight.view(d, d), conv.projector.bias,
                           self.project2.weight, self.project2.bias, 0.0, self.norm.eps, self.backend)
