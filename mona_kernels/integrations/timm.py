"""Mona adapters for timm's Swin Transformer and ViT, placed as the authors place them: one after the
attention residual and one after the MLP residual of every block (``my_module_1``/``my_module_2``).

>>> model = timm.create_model("swin_base_patch4_window7_224")
>>> add_mona(model)                       # fused adapters in every block
>>> freeze_all_but_adapters(model, keep=("head",))
>>> torch.save(adapter_state_dict(model), "adapters.pt")
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from ..modules import Mona
from .. import reference

ADAPTER_NAMES = ("my_module_1", "my_module_2")
_SWIN_PARTS = ("norm1", "_attn", "drop_path1", "norm2", "mlp", "drop_path2")
_VIT_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def _swin_block_forward(self, x):
    B, H, W, C = x.shape
    x = x + self.drop_path1(self._attn(self.norm1(x)))
    x = self.my_module_1(x.reshape(B, -1, C), (H, W))
    x = x + self.drop_path2(self.mlp(self.norm2(x)))
    x = self.my_module_2(x, (H, W))
    return x.reshape(B, H, W, C)


def _vit_block_forward(self, x, attn_mask=None):
    attn_in = self.norm1(x)
    attn = self.attn(attn_in) if attn_mask is None else self.attn(attn_in, attn_mask=attn_mask)
    x = x + self.drop_path1(self.ls1(attn))
    x = _patch_tokens_only(self.my_module_1, x, self._mona_prefix, self._mona_grid)
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return _patch_tokens_only(self.my_module_2, x, self._mona_prefix, self._mona_grid)


def _patch_tokens_only(adapter, x, prefix: int, grid):
    """Apply ``adapter`` to the patch tokens; class and other prefix tokens pass through untouched."""
    if prefix == 0:
        return adapter(x, grid)
    return torch.cat([x[:, :prefix], adapter(x[:, prefix:], grid)], dim=1)


def _has(block, parts):
    return all(hasattr(block, p) for p in parts)


def _dim_of(block) -> int:
    norm = block.norm1
    shape = getattr(norm, "normalized_shape", None)
    if shape is None:
        raise TypeError(f"cannot read the channel count of {type(block).__name__}.norm1")
    return int(shape[0])


def add_mona(model: nn.Module, bottleneck: int = 64, dropout: float = 0.1, fused: bool = True,
             backend: str | None = None) -> int:
    """Insert two Mona adapters into every block of a timm Swin or ViT, in place, on the model's
    device and dtype. ``fused=False`` inserts the plain-PyTorch reference instead (for comparison).
    Returns the number of blocks changed; raises ``TypeError`` when no block is recognised."""
    param = next(model.parameters())
    make = (lambda C: Mona(C, bottleneck=bottleneck, dropout=dropout, backend=backend)) if fused else \
        (lambda C: reference.Mona(C, bottleneck=bottleneck, dropout=dropout))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    changed = 0
    for block in model.modules():
        name = type(block).__name__
        if name == "SwinTransformerBlock" and _has(block, _SWIN_PARTS):
            forward = _swin_block_forward
        elif name in ("Block", "ResPostBlock", "ParallelScalingBlock") and _has(block, _VIT_PARTS):
            if grid is None:
                raise TypeError("a ViT needs model.patch_embed.grid_size to know the token grid")
            block._mona_grid, block._mona_prefix = tuple(int(g) for g in grid), prefix
            forward = _vit_block_forward
        else:
            continue
        C = _dim_of(block)
        for attr in ADAPTER_NAMES:
            setattr(block, attr, make(C).to(device=param.device, dtype=param.dtype))
        block.forward = types.MethodType(forward, block)
        changed += 1
    if changed == 0:
        raise TypeError(f"no timm Swin or ViT block found in {type(model).__name__}")
    return changed


def _is_adapter_param(name: str) -> bool:
    return any(f"{a}." in name or name.startswith(a) for a in ADAPTER_NAMES)


def freeze_all_but_adapters(model: nn.Module, keep: tuple[str, ...] = ("head",)) -> int:
    """Freeze every parameter except the adapters' and those whose name starts with one of ``keep``.
    Returns the number of trainable parameters."""
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter_param(name) or name.startswith(keep))
        trainable += p.numel() if p.requires_grad else 0
    return trainable


def adapter_state_dict(model: nn.Module) -> dict:
    """Only the adapters' weights, under their names in ``model`` (a few MB for Swin-B)."""
    return {k: v for k, v in model.state_dict().items() if _is_adapter_param(k)}


def load_adapter_state_dict(model: nn.Module, state: dict) -> None:
    """Load weights saved by :func:`adapter_state_dict`; every adapter of ``model`` must be covered."""
    expected = set(adapter_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"adapter state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
