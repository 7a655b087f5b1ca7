"""Compiles every kernel of the Triton plan ahead of time for one GPU architecture, with the launch
options its launcher picks, and prints each one's shared memory as JSON (run without
TRITON_INTERPRET; no GPU needed). Used by tests/test_triton_plan.py."""
import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mona_kernels.backends.triton import common, conv_ln_bwd, conv_up, ln_down, param_grads, reduce_grads, tail_bwd

TRITON_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64"}
INTS = {"M", "C", "D", "H", "W", "n_tiles", "tokens", "n_cblk", "n_channel", "n_splits", "n_dblk", "rows_channel",
        "rows_tail", "rows_tap", "partial_off", "channel_off", "tap_off", "n_rows"}
FLOATS = {"eps", "p", "scale", "scale_lo"}
# Pointers that hold tokens (x's dtype), bottleneck activations (the compute dtype) or fp32/fp64 sums (and
# the merged conv kernel).
TOKENS = {"x_ptr", "g_ptr", "out_ptr", "dx_ptr"}
ACTIVATIONS = {"h1_ptr", "h2_ptr", "dh2_ptr", "a_ptr", "dh1_ptr"}
SUMS = {"mean_ptr", "rstd_ptr", "partial_ptr", "channel_ptr", "tap_ptr", "k_ptr"}


def signature(fn, xdt, cdt, constexprs):
    acc = torch.float64 if cdt == torch.float64 else torch.float32
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name == "seed_ptr":
            sig[name] = "*i64"
        elif name in TOKENS:
            sig[name] = TRITON_TYPES[xdt]
        elif name in ACTIVATIONS:
            sig[name] = TRITON_TYPES[cdt]
        else:  # parameters and partial sums
            sig[name] = TRITON_TYPES[acc] if name in SUMS or name == "grads_ptr" else "*fp32"
    return sig


def main(arch, widths):
    target = GPUTarget("cuda", arch, 32)
    result = {}
    for xdt, cdt in [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                     (torch.float64, torch.float64)]:
        for d in widths:
            fp64 = cdt == torch.float64
            # ln_down and conv_ln_bwd take fewer tokens a program over WIDE_C channels: both compiles
            wide = common.WIDE_C
            kernels = [(ln_down.ln_down_kernel, ln_down.meta(xdt, cdt, d, wide), {}, f" C={wide}"),
                       (ln_down.ln_down_kernel, ln_down.meta(xdt, cdt, d, 2 * wide), {}, f" C={2 * wide}"),
                       (conv_up.conv_up_kernel, conv_up.meta(xdt, cdt, d), {"HAS_DROPOUT": True, "FP64": fp64}, ""),
                       (tail_bwd.tail_bwd_kernel, tail_bwd.meta(xdt, cdt, d), {"HAS_DROPOUT": True, "FP64": fp64}, ""),
                       (conv_ln_bwd.conv_ln_bwd_kernel, conv_ln_bwd.meta(xdt, cdt, d, wide), {}, f" C={wide}"),
                       (conv_ln_bwd.conv_ln_bwd_kernel, conv_ln_bwd.meta(xdt, cdt, d, 2 * wide), {},
                        f" C={2 * wide}"),
                       (param_grads.param_grads_kernel, param_grads.meta(xdt, cdt, d), {}, ""),
                       (reduce_grads.reduce_grads_kernel, {"BLOCK": reduce_grads.BLOCK, "ROWS": reduce_grads.ROWS,
                                                           "num_warps": reduce_grads.WARPS}, {}, "")]
            for fn, meta, flags, label in kernels:
                options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
                constexprs = {**meta, **flags}
                sig = signature(fn, xdt, cdt, constexprs)
                # as a launch specialises them: tensors 16-byte aligned, C and d multiples of 16 where
                # the kernel does not exempt them (every width the benchmark runs is)
                exempt = {p.name for p in fn.params if p.do_not_specialize}
                attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(sig.items())
                         if kind.startswith("*") or (name in ("C", "D") and name not in exempt)}
                src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=target, options=options)
                result[f"{fn.__name__}{label} x={xdt} compute={cdt} d={d}"] = compiled.metadata.shared
    print(json.dumps(result))


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(d) for d in sys.argv[2:]] or [64])
