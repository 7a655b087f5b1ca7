"""Raw launches of the merged 7x7 depthwise conv and its kernel gradient (GPU time only): the
Triton kernels, the CUDA extension's, and cuDNN's single 7x7 depthwise conv on the same tensor.

    python benchmarks/sweep_dwconv.py
"""
import torch
import triton.testing

from mona_kernels.backend import _can_run
from mona_kernels.ops import cuda_ext
from mona_kernels.ops.mona_adapter import _tail_triton
from mona_kernels.ops.multiscale_dwconv import _conv_triton, _wgrad_triton

SHAPES = [(2, 200, 336, 64), (32, 56, 56, 64), (32, 14, 14, 64)]
WGRAD_TILES = [(8, 4), (16, 4), (16, 8), (32, 8), (32, 16)]
TAIL_TILES = [(32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]


def us(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def main():
    torch.manual_seed(0)
    has_cuda_ext = _can_run("cuda", torch.device("cuda")) is None
    # CUDA variants: conv 0 (4 rows a thread, 3 blocks an SM; the default), 1 (8 rows, 2), 2 (4 rows, 4), 3 (6 rows, 2);
    # wgrad 0 (4 channels a thread), 1 (2 channels)
    print("| shape | floor fwd us | cuDNN 7x7 fwd | cuDNN wgrad | triton conv | triton wgrad | cuda conv v0 | v1 | v2 | v3 "
          "| cuda conv flip | cuda wgrad v0 | v1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    tiles, tails = [], []
    for B, H, W, d in SHAPES:
        h = torch.randn(B, H, W, d, device="cuda", dtype=torch.bfloat16)
        g = torch.randn_like(h)
        K = torch.randn(49, d, device="cuda")
        bias = torch.randn(d, device="cuda")
        conv = torch.nn.Conv2d(d, d, 7, padding=3, groups=d).cuda().bfloat16().to(memory_format=torch.channels_last)
        hc, gc = h.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
        floor = 2 * h.numel() * 2 / 4.25e12 * 1e6
        row = [f"{B}x{H}x{W}x{d}", f"{floor:.1f}", us(lambda: conv(hc)),
               us(lambda: torch.nn.grad.conv2d_weight(hc, conv.weight.shape, gc, padding=3, groups=d)),
               us(lambda: _conv_triton(h, K, bias)), us(lambda: _wgrad_triton(h, g))]
        if has_cuda_ext:
            row += [us(lambda: cuda_ext.dwconv7_fwd(h, K, bias, False, v)) for v in range(4)]
            row += [us(lambda: cuda_ext.dwconv7_fwd(g, K, None, True))]
            row += [us(lambda: cuda_ext.dwconv7_wgrad(h, g, v)) for v in range(2)]
        print("| " + " | ".join(v if isinstance(v, str) else f"{v:.1f}" for v in row) + " |")
        tiles.append((f"{B}x{H}x{W}x{d}", [us(lambda: _wgrad_triton(h, g, p, w)) for p, w in WGRAD_TILES]))
        wp, bp, seed = torch.randn(d, d, device="cuda") / 8, torch.randn(d, device="cuda"), torch.tensor([1])
        h1 = h.view(-1, d)
        tails.append((f"{B}x{H}x{W}x{d}", [us(lambda: _tail_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, store, t, w))
                                           for store in (False, True) for t, w in TAIL_TILES]))
    print("\nTriton wgrad (with its partial sum) by pixel tile and warps, us")
    print("| shape | " + " | ".join(f"{p} px / {w} warps" for p, w in WGRAD_TILES) + " |")
    print("|---|" + "---|" * len(WGRAD_TILES))
    for shape, times in tiles:
        print(f"| {shape} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("\nTriton fused tail (conv, projector, GELU; forward writes a' only, backward also h2 and h3) by "
          "pixel tile and warps, us")
    print("| shape | " + " | ".join(f"{kind} {t} px / {w} warps" for kind in ("fwd", "bwd") for t, w in TAIL_TILES)
          + " |")
    print("|---|" + "---|" * (2 * len(TAIL_TILES)))
    for shape, times in tails:
        print(f"| {shape} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    main()
