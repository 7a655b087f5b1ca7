"""Where the host time of one adapter backward (or forward) goes, op by op and Python function by
function, at a shape whose GPU work is negligible.

    python benchmarks/tools/profile_host.py [B,H,W,C] [backend] [fwd|bwd]      (default 1,8,8,128 triton bwd)

Prints torch.profiler's CPU ops by self time and cProfile's functions by internal time, over 50 calls.
"""
import cProfile
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import mona_kernels as mk


def main():
    B, H, W, C = (tuple(map(int, sys.argv[1].split(","))) if len(sys.argv) > 1 else (1, 8, 8, 128))
    backend = sys.argv[2] if len(sys.argv) > 2 else "triton"
    which = sys.argv[3] if len(sys.argv) > 3 else "bwd"
    torch.manual_seed(0)
    fused = mk.Mona(C, dropout=0.0, backend=backend).cuda().to(torch.bfloat16)
    x = torch.randn(B, H * W, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    params = [x, *fused.parameters()]
    calls = 50

    def run():
        outs = [fused(x, (H, W)) for _ in range(calls)]
        if which == "fwd":
            return
        for out in outs:
            torch.autograd.grad(out, params, g)

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    pr = cProfile.Profile()
    pr.enable()
    run()
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
