"""Whether an eager Swin-B training step waits on the GPU or on the host: per adapter variant, the
wall time a step (ten back to back), the GPU's busy time a step (the union of its kernels'
intervals in a torch.profiler trace) and the host's time to enqueue one step without waiting on the
GPU (median of five).

    python benchmarks/tools/profile_step.py [--batch 32] [--variants zero-cost,fused,reference]

Run each variant in its own process (one name in --variants) to keep them from sharing an allocator
and a warm host; B = 32, 224x224, bf16 autocast, frozen backbone, as benchmarks/swin_step.py.
"""
import argparse
import copy
import os
import sys
import time

import torch
import timm
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mona_kernels as mk  # noqa: E402
from mona_kernels.integrations import add_mona, freeze_all_but_adapters  # noqa: E402
from swin_step import ZeroCostAdapter, blocks_of, install, step_fn  # noqa: E402


def busy_ms(intervals) -> float:
    """Milliseconds covered by the union of the profiler's (start, end) intervals in microseconds."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total, end = total + e - s, e
        elif e > end:
            total, end = total + e - end, e
    return total / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variants", default="zero-cost,fused,reference")
    ap.add_argument("--backend", default="triton", help="the fused adapters' backend")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model("swin_base_patch4_window7_224", pretrained=False).cuda()
    add_mona(model, fused=False, dropout=0.0)
    freeze_all_but_adapters(model, keep=("head",))
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (args.batch,), device="cuda")
    reference = [(b.my_module_1, b.my_module_2) for b in blocks_of(model)]
    variants = {
        "reference": lambda: reference,
        "fused": lambda: [tuple(mk.convert(copy.deepcopy(m), backend=args.backend)[0] for m in pair)
                          for pair in reference],
        "zero-cost": lambda: [tuple(ZeroCostAdapter(m.gamma.shape[0]).cuda() for m in pair) for pair in reference],
    }
    print(f"Swin-B step, B={args.batch}, bf16 autocast, {torch.cuda.get_device_name()}")
    print("| adapters | wall ms | GPU busy ms | host enqueue ms | kernels a step |\n|---|---|---|---|---|")
    for label in args.variants.split(","):
        install(model, variants[label]())
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step = step_fn(model, x, y, opt)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()  # ten steps back to back: the host may run ahead of the GPU
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 10 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]
        enqueue = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            enqueue.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
        enqueue.sort()
        print(f"| {label} | {wall:.1f} | {busy_ms(kernels) / 3:.1f} | {enqueue[len(enqueue) // 2]:.1f} "
              f"| {len(kernels) / 3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
