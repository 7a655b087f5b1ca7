"""One forward+backward of the Triton plan (bf16, d = 64) after a warm-up, for ncu:

    ncu --kernel-name regex:"^(ln_down|conv_up|tail_bwd|conv_ln_bwd|param_grads|reduce_grads)_kernel" \
        --launch-skip 6 --launch-count 6 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        python benchmarks/tools/ncu_plan.py [B,H,W,C]          (default 32,56,56,128)
"""
import sys

import torch

import mona_kernels as mk

B, H, W, C = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "32,56,56,128").split(","))
torch.manual_seed(0)
m = mk.Mona(C, bottleneck=64, dropout=0.0, backend="triton").cuda().to(torch.bfloat16)
x = torch.randn(B, H * W, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn_like(x)
for _ in range(2):  # the first compiles; the second is the one to profile
    m(x, (H, W)).backward(g)
torch.cuda.synchronize()
