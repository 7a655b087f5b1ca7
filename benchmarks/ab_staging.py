"""Same-run A/B of the Triton graph cache's staging: every tensor by foreach launches (the rule before
session 8) against large tensors copied on their own (``graphs.LARGE_COPY_BYTES``), eager module
forward+backward in bf16, the two settings timed in turn over several rounds.

    python benchmarks/ab_staging.py [B,H,W,C ...]      (default: the three largest SPEC §2 shapes)
"""
import statistics
import sys

import torch
import triton.testing

import mona_kernels as mk
from mona_kernels.ops import graphs

SHAPES = [(2, 200, 336, 128), (32, 56, 56, 128), (4, 128, 128, 192), (32, 14, 14, 512)]
ROUNDS = 5


def main():
    shapes = [tuple(int(v) for v in s.split(",")) for s in sys.argv[1:]] or SHAPES
    split = graphs.LARGE_COPY_BYTES
    print("| shape | all foreach ms | large copied alone ms | ratio (median of rounds) | rounds' range |")
    print("|---|---|---|---|---|")
    for B, H, W, C in shapes:
        torch.manual_seed(0)
        m = mk.Mona(C).cuda().bfloat16().train()
        x = torch.randn(B, H * W, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)

        inputs = [x, *m.parameters()]

        def step():  # gradients returned, not accumulated into .grad (no extra adds)
            torch.autograd.grad(m(x, (H, W)), inputs, g)
        times = {}
        for _ in range(ROUNDS):
            for name, threshold in (("foreach", 1 << 62), ("split", split)):
                graphs.LARGE_COPY_BYTES = threshold
                previous = graphs.graph_cache(0)  # drop the entries: their copy lists were made at capture
                graphs.graph_cache(previous)
                times.setdefault(name, []).append(triton.testing.do_bench(step, return_mode="median"))
        graphs.LARGE_COPY_BYTES = split
        ratios = [b / a for a, b in zip(times["foreach"], times["split"])]
        print(f"| {B}x{H}x{W}x{C} | {statistics.median(times['foreach']):.3f} | {statistics.median(times['split']):.3f} "
              f"| {statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} |", flush=True)


if __name__ == "__main__":
    main()
