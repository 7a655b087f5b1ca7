"""GPU time of each Triton plan kernel over its launch options, one option of one stage changed at a
time, against the kernel's byte budget (docs/design.md) at the copy bandwidth measured here. Each
variant's output and gradients are first checked against the default's.

    python benchmarks/tools/plan_sweep.py [--fp32 | --autocast] [B,H,W,C ...]   (default 32,56,56,128 2,200,336,128)

bf16, d = 64, no dropout. --fp32: everything fp32. --autocast: fp32 tokens and parameters under bf16
autocast (as a timm Swin's adapters run), so x, g, out and dx are fp32 and the activations bf16.
Without a GPU (TRITON_INTERPRET=1) it checks every variant at one small shape and times nothing
(--autocast takes fp16 there).
"""
import sys

import torch

import mona_kernels as mk
from mona_kernels.backends.triton import conv_ln_bwd, conv_up, ln_down, param_grads, tail_bwd
from mona_kernels.backends.triton.common import rows_and_stages
from mona_kernels.benchmark import measure_bandwidth
from profile_adapter import kernel_table  # this folder's: GPU time per kernel of a step

D = 64
# Bytes a token each kernel must move (docs/design.md, "Byte and FLOP budget"), with xb-byte tokens
# (x, g, out, dx) and ab-byte bottleneck activations.
BUDGET = {"ln_down_kernel": lambda C, xb, ab: xb * C + ab * D + 8,
          "conv_up_kernel": lambda C, xb, ab: 2 * xb * C + 2 * ab * D,
          "tail_bwd_kernel": lambda C, xb, ab: xb * C + 3 * ab * D,
          "conv_ln_bwd_kernel": lambda C, xb, ab: 3 * xb * C + 2 * ab * D + 8,
          "param_grads_kernel": lambda C, xb, ab: 2 * xb * C + 4 * ab * D + 8}


class Tiles:
    """A stage's ``rows_and_stages`` as a variant, put in the stage module's namespace in its place.

    ``compute_dtype_only``: fed only the compute dtype (its last argument), so 4-byte tokens under
    --autocast get the tiles and pipeline stages of 2-byte ones. Where x or g is no ``tl.dot`` operand
    (F1, F2, B2; B1 casts g first), halving the tiles for it may cost more than it saves: F1 with
    4-byte tokens took 257 us with halved tiles against 169 with full ones (32x56x56x128, an H100).
    Shared memory stays within sm_86's 99 KB: B1's tiles, the largest, take 80 KB compiled ahead of
    time.
    ``stages``: the pipeline depth set, for a loop over C in one or two wide blocks, which gains
    nothing from more stages, whose buffers a (512, d) weight tile would multiply."""

    def __init__(self, compute_dtype_only=False, stages=None):
        self.compute_dtype_only, self.stages = compute_dtype_only, stages

    def __call__(self, rows, *dtypes):
        rows, options = rows_and_stages(rows, *(dtypes[-1:] if self.compute_dtype_only else dtypes))
        return rows, options if self.stages is None else {**options, "num_stages": self.stages}

    def __repr__(self):
        return ", ".join((["tiles of the compute dtype"] if self.compute_dtype_only else [])
                         + ([] if self.stages is None else [f"num_stages={self.stages}"]))


# Per kernel: its stage module and the variants tried, each a set of the module's constants changed
# together from their defaults (put back after each variant).
VARIANTS = [
    # over 256 channels, the loops over C in fewer, wider blocks: fewer dependent steps a program
    (ln_down, "ln_down_kernel", [dict(BLOCK_M=64), dict(WARPS=8), dict(WIDE_BLOCK_C=256),
                                 dict(WIDE_BLOCK_C=512, WIDE_WARPS=8, rows_and_stages=Tiles(stages=1))]),
    (conv_up, "conv_up_kernel", [dict(TILE=16), dict(TILE=16, WARPS=2), dict(TILE=64), dict(WARPS=8),
                                 dict(rows_and_stages=Tiles(compute_dtype_only=True)), dict(BLOCK_N=128),
                                 dict(BLOCK_N=256, rows_and_stages=Tiles(stages=1))]),
    (tail_bwd, "tail_bwd_kernel", [dict(TILE=32), dict(TILE=128), dict(PROGRAMS_PER_SM=1), dict(PROGRAMS_PER_SM=4),
                                   dict(WARPS=8), dict(rows_and_stages=Tiles(compute_dtype_only=True)),
                                   dict(BLOCK_N=128),
                                   dict(BLOCK_N=256, rows_and_stages=Tiles(stages=1))]),
    (conv_ln_bwd, "conv_ln_bwd_kernel", [dict(TILE=32), dict(TILE=128), dict(WARPS=8),
                                         dict(rows_and_stages=Tiles(compute_dtype_only=True)),
                                         dict(rows_and_stages=Tiles(compute_dtype_only=True), WIDE_TILE=16),
                                         dict(WIDE_BLOCK_N=256),
                                         dict(WIDE_BLOCK_N=512, WARPS=8, rows_and_stages=Tiles(stages=1))]),
    (param_grads, "param_grads_kernel", [dict(TAP_TILE=16), dict(TAP_PROGRAMS_PER_SM=2), dict(TAP_PROGRAMS_PER_SM=8),
                                         dict(BLOCK_M=64), dict(BLOCK_M=256), dict(CHANNEL_PROGRAMS_PER_SM=2),
                                         dict(WARPS=8)]),
]


def _problem(shape, device, dtype, autocast=None):
    B, H, W, C = shape
    torch.manual_seed(0)
    m = mk.Mona(C, bottleneck=D, dropout=0.0, backend="triton").to(device, dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5 / (p[0].numel() ** 0.5 if p.dim() > 1 else 1))
    x = torch.randn(B, H * W, C, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)

    def step():
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = m(x, (H, W))
        return (out.detach(), *torch.autograd.grad(out, [x, *m.parameters()], g))
    return step


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(shapes, fp32=False, autocast=False):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timed = device.type == "cuda"
    dtype = torch.float32 if fp32 or autocast or not timed else torch.bfloat16
    low = (torch.bfloat16 if timed else torch.float16) if autocast else None
    token_bytes, activation_bytes = dtype.itemsize, (low or dtype).itemsize
    bandwidth = measure_bandwidth(device) if timed else None
    if not timed:
        shapes = [(1, 5, 7, 24)]
    print("| shape | kernel | variant | kernel µs | × byte budget | whole step µs | max rel. diff to default |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        step = _problem(shape, device, dtype, low)
        want = step()
        M, C = shape[0] * shape[1] * shape[2], shape[3]
        name = "x".join(map(str, shape))
        if timed:
            default_times = kernel_table(step)[0]
        for module, kernel, variants in VARIANTS:
            budget_us = M * BUDGET[kernel](C, token_bytes, activation_bytes) / bandwidth * 1e6 if timed else None
            if timed:
                us = default_times[kernel]
                print(f"| {name} | {kernel} | default | {us:.1f} | {us / budget_us:.1f}× | "
                      f"{sum(default_times.values()):.1f} | 0 |", flush=True)
            for changes in variants:
                defaults = {key: getattr(module, key) for key in changes}
                label = ", ".join(f"{key}={value!r}" if not callable(value) else repr(value)
                                  for key, value in changes.items())
                try:
                    for key, value in changes.items():
                        setattr(module, key, value)
                    try:
                        diff = max(_rel(a, b) for a, b in zip(step(), want))
                    except Exception as err:  # e.g. more shared memory than the GPU has: report, go on
                        print(f"| {name} | {kernel} | {label} | FAILED | – | – | {type(err).__name__} |",
                              flush=True)
                        continue
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
    args = [a for a in sys.argv[1:] if a not in ("--fp32", "--autocast")]
    main([tuple(int(v) for v in s.split(",")) for s in args] or [(32, 56, 56, 128), (2, 200, 336, 128)],
         fp32="--fp32" in sys.argv[1:], autocast="--autocast" in sys.argv[1:])
