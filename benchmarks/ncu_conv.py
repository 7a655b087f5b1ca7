"""One launch each of the CUDA extension's conv and wgrad kernels at COCO stage 1 (for ncu).

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats python benchmarks/ncu_conv.py
"""
import torch

from mona_kernels.ops import cuda_ext

B, H, W, d = 2, 200, 336, 64
h = torch.randn(B, H, W, d, device="cuda", dtype=torch.bfloat16)
g = torch.randn_like(h)
K = torch.randn(49, d, device="cuda")
bias = torch.randn(d, device="cuda")
for _ in range(2):
    cuda_ext.dwconv7_fwd(h, K, bias)
    cuda_ext.dwconv7_wgrad(h, g)
torch.cuda.synchronize()
