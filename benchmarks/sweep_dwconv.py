"""Sweep tile size and warps of the depthwise conv and wgrad kernels on raw launches (GPU time only),
beside cuDNN's single 7x7 depthwise conv and its weight gradient on the same tensor.

    python benchmarks/sweep_dwconv.py
"""
import torch
import triton.testing

from mona_kernels.ops.multiscale_dwconv import _conv_triton, _wgrad_triton

SHAPES = [(2, 200, 336, 64), (32, 56, 56, 64), (32, 14, 14, 64)]


def ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    torch.manual_seed(0)
    for B, H, W, d in SHAPES:
        h = torch.randn(B, H, W, d, device="cuda", dtype=torch.bfloat16)
        g = torch.randn_like(h)
        K = torch.randn(49, d, device="cuda")
        bias = torch.randn(d, device="cuda")
        conv = torch.nn.Conv2d(d, d, 7, padding=3, groups=d).cuda().bfloat16().to(memory_format=torch.channels_last)
        hc = h.permute(0, 3, 1, 2)
        floor = 2 * h.numel() * 2 / 4.25e12 * 1e3
        print(f"\nshape {B}x{H}x{W}x{d}: HBM floor fwd {floor * 1e3:.1f} us")
        print(f"  cudnn 7x7 fwd {ms(lambda: conv(hc)) * 1e3:.1f} us")
        print(f"  cudnn 7x7 wgrad {ms(lambda: torch.nn.grad.conv2d_weight(hc, conv.weight.shape, g.permute(0, 3, 1, 2), padding=3, groups=d)) * 1e3:.1f} us")
        for pixels in (32, 64, 128):
            for warps in (2, 4, 8):
                t = ms(lambda: _conv_triton(h, K, bias, pixels, warps))
                print(f"  conv  pixels={pixels:4d} warps={warps} {t * 1e3:8.1f} us")
        for pixels in (64, 128, 256):
            for warps in (4, 8):
                t = ms(lambda: _wgrad_triton(h, g, pixels, warps))
                print(f"  wgrad pixels={pixels:4d} warps={warps} {t * 1e3:8.1f} us")


if __name__ == "__main__":
    main()
