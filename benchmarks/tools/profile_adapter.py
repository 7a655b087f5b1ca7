"""Where forward+backward GPU time goes, per kernel, and whether the step captures in a CUDA graph.

    python benchmarks/tools/profile_adapter.py [--amp] [--rows N] [B,H,W,C ...]

For the eager reference and each fused backend that runs here: torch.profiler's GPU time per kernel
(microseconds per step, top rows) and the step's total GPU time; then a CUDA-graph capture of the
step, printing the whole traceback where capture fails. ``--amp`` profiles what a network trained
under bf16 autocast runs: fp32 tokens and parameters with the step under ``torch.autocast``.
``--rows`` sets how many kernels each table lists (16).
"""
import collections
import sys
import traceback

import torch
from torch.profiler import ProfilerActivity, profile

import mona_kernels as mk
from mona_kernels import reference
from mona_kernels.backends import unavailable
from mona_kernels.benchmark import capture_graph

SHAPES = [(2, 200, 336, 128), (32, 56, 56, 128)]
STEPS = 5


def variants(C, dtype):
    torch.manual_seed(0)
    ref = reference.Mona(C).cuda().to(dtype)
    ref.dropout.p = 0.0
    out = {"reference": ref}
    for b in ("triton", "cuda"):
        if unavailable(b, torch.device("cuda")) is None:  # None: it runs here
            m = mk.Mona(C, dropout=0.0, backend=b).cuda().to(dtype)
            m.load_state_dict(ref.state_dict())
            out[f"fused[{b}]"] = m
    return out


def kernel_table(step):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    per = collections.Counter()
    count = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:70]] += e.device_time / STEPS
            count[e.name[:70]] += 1 / STEPS
    return per, count


def try_graph(step):
    try:
        graph, _ = capture_graph(step)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return f"captured; replay {start.elapsed_time(end) / 20 * 1e3:.1f} us per step"
    except Exception:
        return "capture FAILED:\n" + traceback.format_exc(limit=12)


def main():
    args = sys.argv[1:]
    amp = "--amp" in args
    rows = 16
    if "--rows" in args:
        rows = int(args[args.index("--rows") + 1])
        del args[args.index("--rows"):args.index("--rows") + 2]
    args = [a for a in args if a != "--amp"]
    shapes = [tuple(map(int, s.split(","))) for s in args] or SHAPES
    dtype = torch.float32 if amp else torch.bfloat16
    label = "fp32 under bf16 autocast" if amp else "bf16"
    for B, H, W, C in shapes:
        for name, model in variants(C, dtype).items():
            x = torch.randn(B, H * W, C, device="cuda", dtype=dtype, requires_grad=True)
            g = torch.randn_like(x)
            params = [x, *model.parameters()]

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    out = model(x, (H, W))
                return torch.autograd.grad(out, params, g.to(out.dtype))

            per, count = kernel_table(step)
            print(f"\n=== {name} fwd+bwd {B}x{H}x{W}x{C} {label}: {sum(per.values()):.1f} us GPU per step, "
                  f"{sum(count.values()):.0f} kernels ===")
            for k, us in per.most_common(rows):
                print(f"{us:9.1f} us  x{count[k]:.0f}  {k}")
            print(try_graph(step))


if __name__ == "__main__":
    main()
