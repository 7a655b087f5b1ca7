"""Adapters inside timm-style Swin and ViT blocks, freezing, adapter-only checkpoints and activation
checkpointing. Stand-ins mirror timm's block attributes so these run without timm; the real
timm models are checked where timm is installed."""
import pytest
import torch
import torch.nn as nn

from conftest import CPU_BACKENDS, assert_close, randomize_
import mona_kernels as mk
from mona_kernels.integrations import add_mona, adapter_state_dict, freeze_all_but_adapters, load_adapter_state_dict

F64 = torch.float64


class SwinTransformerBlock(nn.Module):
    """timm's Swin block shape: (B, H, W, C) in and out, attention through ``_attn``."""

    def __init__(self, C):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.proj = nn.Linear(C, C)
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))
        self.drop_path1 = self.drop_path2 = nn.Identity()

    def _attn(self, x):
        return self.proj(x)

    def forward(self, x):
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        return (x + self.drop_path2(self.mlp(self.norm2(x)))).reshape(B, H, W, C)


class TinySwin(nn.Module):
    def __init__(self, C=16):
        super().__init__()
        self.layers = nn.Sequential(SwinTransformerBlock(C), SwinTransformerBlock(C))
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.layers(x).mean(dim=(1, 2)))


class Block(nn.Module):
    """timm's ViT block shape: (B, prefix + N, C)."""

    def __init__(self, C):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = nn.Linear(C, C)
        self.mlp = nn.Linear(C, C)
        self.ls1 = self.ls2 = self.drop_path1 = self.drop_path2 = nn.Identity()


class TinyViT(nn.Module):
    def __init__(self, C=16, grid=(3, 4)):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.grid_size = grid
        self.num_prefix_tokens = 1
        self.blocks = nn.Sequential(Block(C), Block(C))


def _randomized(model):
    add_mona(model, bottleneck=8, dropout=0.0, fused=False)
    randomize_(model)
    return model.to(F64)


def test_swin_adapters_sit_after_each_residual():
    model = _randomized(TinySwin())
    x = torch.randn(2, 4, 5, 16, dtype=F64)
    blk = model.layers[0]
    B, H, W, C = x.shape
    h = x + blk._attn(blk.norm1(x))
    h = blk.my_module_1(h.reshape(B, -1, C), (H, W))
    h = h + blk.mlp(blk.norm2(h))
    expected = blk.my_module_2(h, (H, W)).reshape(B, H, W, C)
    assert_close(blk(x), expected, F64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_converted_swin_matches_reference_adapters_with_gradients(backend):
    ref = _randomized(TinySwin())
    fused = _randomized(TinySwin())
    fused.load_state_dict(ref.state_dict())
    _, n = mk.convert(fused, backend=backend)
    assert n == 4
    x = torch.randn(2, 4, 5, 16, dtype=F64)
    out, out_ref = fused(x), ref(x)
    assert_close(out, out_ref, F64)
    for a, b in zip(torch.autograd.grad(out.sum(), list(fused.parameters())),
                    torch.autograd.grad(out_ref.sum(), list(ref.parameters()))):
        assert_close(a, b, F64)


def test_vit_prefix_tokens_pass_through_the_adapter_untouched():
    model = _randomized(TinyViT())
    blk = model.blocks[0]
    x = torch.randn(2, 1 + 12, 16, dtype=F64)
    h = x + blk.attn(blk.norm1(x))
    after = mk.integrations.timm._patch_tokens_only(blk.my_module_1, h, 1, (3, 4))
    assert torch.equal(after[:, :1], h[:, :1])
    assert_close(after[:, 1:], blk.my_module_1(h[:, 1:], (3, 4)), F64)
    h = after + blk.mlp(blk.norm2(after))
    expected = torch.cat([h[:, :1], blk.my_module_2(h[:, 1:], (3, 4))], dim=1)
    assert_close(blk(x), expected, F64)


def test_freeze_and_adapter_only_checkpoint_round_trip():
    model = _randomized(TinySwin())
    n_trainable = freeze_all_but_adapters(model, keep=("head",))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("my_module_" in n or n.startswith("head") for n in names)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = adapter_state_dict(model)
    assert state and all("my_module_" in k for k in state)
    other = _randomized(TinySwin())
    load_adapter_state_dict(other, state)
    assert all(torch.equal(v, adapter_state_dict(other)[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state_dict(other, dict(list(state.items())[1:]))


def test_model_without_swin_or_vit_blocks_is_refused():
    with pytest.raises(TypeError, match="no timm"):
        add_mona(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_activation_checkpointing_gives_the_same_gradients(backend):
    fused = randomize_(mk.Mona(16, bottleneck=8, dropout=0.3, backend=backend).to(F64))
    x = torch.randn(2, 12, 16, dtype=F64, requires_grad=True)
    torch.manual_seed(5)
    plain = torch.autograd.grad(fused(x, (3, 4)).square().sum(), [x, *fused.parameters()])
    torch.manual_seed(5)
    out = torch.utils.checkpoint.checkpoint(fused, x, (3, 4), use_reentrant=False)
    ckpt = torch.autograd.grad(out.square().sum(), [x, *fused.parameters()])
    for a, b in zip(ckpt, plain):
        assert_close(a, b, F64)


try:
    import timm
except ImportError:
    timm = None


@pytest.mark.skipif(timm is None, reason="timm is not installed")
@pytest.mark.parametrize("name,shape", [("swin_tiny_patch4_window7_224", (1, 3, 224, 224)),
                                        ("vit_tiny_patch16_224", (1, 3, 224, 224))])
def test_real_timm_model_fused_matches_reference_adapters(name, shape):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=5).double().eval()
    add_mona(ref, fused=False, dropout=0.0)
    randomize_(ref, scale=0.1)
    fused = timm.create_model(name, pretrained=False, num_classes=5).double().eval()
    add_mona(fused, dropout=0.0)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(shape, dtype=F64)
    assert_close(fused(x), ref(x), F64)
