"""One launch each of the depthwise kernels at COCO stage 1 (for ncu): the Triton conv and wgrad,
and the CUDA extension's register-row conv (variant 0), shared-memory conv (4), sliding-window wgrad
(0) and shared-memory wgrad (2).

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats python benchmarks/tools/ncu_conv.py
"""
import torch

from mona_kernels.backends import cuda
from mona_kernels.backends.triton.dwconv import dwconv7_fwd, dwconv7_wgrad

B, H, W, d = 2, 200, 336, 64
h = torch.randn(B, H, W, d, device="cuda", dtype=torch.bfloat16)
g = torch.randn_like(h)
K = torch.randn(49, d, device="cuda")
bias = torch.randn(d, device="cuda")
for _ in range(2):
    dwconv7_fwd(h, K, bias)
    dwconv7_wgrad(h, g)
    for v in (0, 4):
        cuda.dwconv7_fwd(h, K, bias, False, v)
    for v in (0, 2):
        cuda.dwconv7_wgrad(h, g, v)
torch.cuda.synchronize()
