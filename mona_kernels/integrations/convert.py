"""Swap every Mona adapter inside an existing model for the fused module, in place."""
from __future__ import annotations

import torch.nn as nn

from ..modules import Mona as FusedMona

_CONV_SIZES = (("conv1", 3), ("conv2", 5), ("conv3", 7))


def _is_depthwise(conv, k: int) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (k, k) and conv.groups == conv.in_channels
            == conv.out_channels and conv.padding == (k // 2, k // 2) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.bias is not None)


def is_mona(module: nn.Module) -> bool:
    """True for any module with the Mona parameter layout that is not already the fused one."""
    if isinstance(module, FusedMona):
        return False
    p1, p2 = getattr(module, "project1", None), getattr(module, "project2", None)
    norm, conv = getattr(module, "norm", None), getattr(module, "adapter_conv", None)
    if not (isinstance(p1, nn.Linear) and isinstance(p2, nn.Linear) and isinstance(norm, nn.LayerNorm)):
        return False
    if not (isinstance(getattr(module, "gamma", None), nn.Parameter)
            and isinstance(getattr(module, "gammax", None), nn.Parameter)):
        return False
    if conv is None or not all(_is_depthwise(getattr(conv, n, None), k) for n, k in _CONV_SIZES):
        return False
    proj = getattr(conv, "projector", None)
    C, d = p1.in_features, p1.out_features
    return (isinstance(proj, nn.Conv2d) and proj.kernel_size == (1, 1) and proj.groups == 1
            and proj.in_channels == proj.out_channels == d and conv.conv1.in_channels == d
            and p2.in_features == d and p2.out_features == C and norm.normalized_shape == (C,)
            and norm.elementwise_affine and module.gamma.shape == (C,) and module.gammax.shape == (C,))


def _fused_from(module: nn.Module, backend) -> FusedMona:
    drop = getattr(module, "dropout", None)
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    fused = FusedMona(module.project1.in_features, bottleneck=module.project1.out_features, dropout=p,
                      eps=module.norm.eps, backend=backend)
    fused.to(device=module.gamma.device, dtype=module.gamma.dtype)
    own = dict(module.named_parameters())
    fused.load_state_dict({name: own[name].detach() for name, _ in fused.named_parameters()})
    for name, param in fused.named_parameters():
        param.requires_grad_(own[name].requires_grad)
    fused.train(module.training)
    return fused


def convert(model: nn.Module, backend: str | None = None):
    """Replace, in place, every Mona-shaped module of ``model`` (the reference class, the authors'
    ``my_module_1``/``my_module_2``, ports' ``mona1``/``mona2``, or any class with that parameter
    layout) with :class:`mona_kernels.Mona`, keeping weights, dropout, device, dtype, ``requires_grad``
    and train/eval. Returns ``(model, number_replaced)``.
    """
    if is_mona(model):
        return _fused_from(model, backend), 1
    targets = [(name, mod) for name, mod in model.named_modules() if name and is_mona(mod)]
    replaced = 0
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if getattr(parent, attr, None) is not mod:
            continue
        setattr(parent, attr, _fused_from(mod, backend))
        replaced += 1
    return model, replaced
