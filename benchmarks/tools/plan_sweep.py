"""GPU time of each Triton plan kernel over its launch options, one option of one stage changed at a
time, against the kernel's byte budget (docs/design.md) at the copy bandwidth measured here. Each
variant's output and gradients are first checked against the default's.

    python benchmarks/tools/plan_sweep.py [--fp32] [B,H,W,C ...]      (default 32,56,56,128 2,200,336,128)

bf16 (fp32 with --fp32: twice the bytes of the budget), d = 64, no dropout. Without a GPU
(TRITON_INTERPRET=1) it checks every variant at one small shape and times nothing.
"""
import sys

import torch

import mona_kernels as mk
from mona_kernels.backends.triton import conv_ln_bwd, conv_up, ln_down, param_grads, tail_bwd
from mona_kernels.benchmark import measure_bandwidth
from profile_adapter import kernel_table  # this folder's: GPU time per kernel of a step

D = 64
# Bytes a token each kernel must move with 2-byte tensors (docs/design.md, "Byte and FLOP budget").
BUDGET = {"ln_down_kernel": lambda C: 2 * C + 2 * D + 8, "conv_up_kernel": lambda C: 4 * C + 4 * D,
          "tail_bwd_kernel": lambda C: 2 * C + 6 * D, "conv_ln_bwd_kernel": lambda C: 6 * C + 4 * D + 8,
          "param_grads_kernel": lambda C: 4 * C + 8 * D + 8}
# Per kernel: its stage module and the variants tried, each a set of the module's constants changed
# together from their defaults (put back after each variant).
VARIANTS = [
    (ln_down, "ln_down_kernel", [dict(BLOCK_M=64), dict(WARPS=8)]),
    (conv_up, "conv_up_kernel", [dict(TILE=16), dict(TILE=16, WARPS=2), dict(TILE=64), dict(WARPS=8)]),
    (tail_bwd, "tail_bwd_kernel", [dict(TILE=32), dict(PROGRAMS_PER_SM=1), dict(PROGRAMS_PER_SM=4), dict(WARPS=8)]),
    (conv_ln_bwd, "conv_ln_bwd_kernel", [dict(TILE=32), dict(TILE=128), dict(WARPS=8)]),
    (param_grads, "param_grads_kernel", [dict(TAP_TILE=16), dict(TAP_PROGRAMS_PER_SM=2), dict(TAP_PROGRAMS_PER_SM=8),
                                         dict(BLOCK_M=64), dict(CHANNEL_PROGRAMS_PER_SM=2), dict(WARPS=8)]),
]


def _problem(shape, device, dtype):
    B, H, W, C = shape
    torch.manual_seed(0)
    m = mk.Mona(C, bottleneck=D, dropout=0.0, backend="triton").to(device, dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5 / (p[0].numel() ** 0.5 if p.dim() > 1 else 1))
    x = torch.randn(B, H * W, C, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)

    def step():
        out = m(x, (H, W))
        return (out.detach(), *torch.autograd.grad(out, [x, *m.parameters()], g))
    return step


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(shapes, fp32=False):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if fp32 or device.type != "cuda" else torch.bfloat16
    timed = device.type == "cuda"
    bandwidth = measure_bandwidth(device) if timed else None
    if not timed:
        shapes = [(1, 5, 7, 24)]
    print("| shape | kernel | variant | kernel µs | × byte budget | whole step µs | max rel. diff to default |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        step = _problem(shape, device, dtype)
        want = step()
        M, C = shape[0] * shape[1] * shape[2], shape[3]
        name = "x".join(map(str, shape))
        if timed:
            default_times = kernel_table(step)[0]
        for module, kernel, variants in VARIANTS:
            budget_us = M * BUDGET[kernel](C) * dtype.itemsize / 2 / bandwidth * 1e6 if timed else None
            if timed:
                us = default_times[kernel]
                print(f"| {name} | {kernel} | default | {us:.1f} | {us / budget_us:.1f}× | "
                      f"{sum(default_times.values()):.1f} | 0 |", flush=True)
            for changes in variants:
                defaults = {key: getattr(module, key) for key in changes}
                label = ", ".join(f"{key}={value}" for key, value in changes.items())
                try:
                    for key, value in changes.items():
                        setattr(module, key, value)
                    diff = max(_rel(a, b) for a, b in zip(step(), want))
                    if diff > 2e-2:  # a wrong variant is reported, not timed
                        print(f"| {name} | {kernel} | {label} | WRONG | – | – | {diff:.2e} |", flush=True)
                        continue
                    if not timed:
                        print(f"| {name} | {kernel} | {label} | – | – | – | {diff:.2e} |")
                        continue
                    times = kernel_table(step)[0]
                    us = times[kernel]
                    print(f"| {name} | {kernel} | {label} | {us:.1f} | {us / budget_us:.1f}× | "
                          f"{sum(times.values()):.1f} | {diff:.2e} |", flush=True)
                finally:
                    for key, value in defaults.items():
                        setattr(module, key, value)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--fp32"]
    main([tuple(int(v) for v in s.split(",")) for s in args] or [(32, 56, 56, 128), (2, 200, 336, 128)],
         fp32="--fp32" in sys.argv[1:])
