"""Where the fused adapter's forward+backward time goes: torch.profiler, top kernels by GPU time.

    python benchmarks/profile_adapter.py [B,H,W,C ...]
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import mona_kernels as mk

SHAPES = [(2, 200, 336, 128), (32, 56, 56, 128)]


def main():
    shapes = [tuple(map(int, s.split(","))) for s in sys.argv[1:]] or SHAPES
    for B, H, W, C in shapes:
        torch.manual_seed(0)
        fused = mk.Mona(C, dropout=0.1).cuda().bfloat16()
        x = torch.randn(B, H * W, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        params = [x, *fused.parameters()]
        for _ in range(3):
            torch.autograd.grad(fused(x, (H, W)), params, g)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.autograd.grad(fused(x, (H, W)), params, g)
            torch.cuda.synchronize()
        print(f"\n=== fused adapter fwd+bwd, {B}x{H}x{W}x{C} bf16, 5 steps ===")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()
