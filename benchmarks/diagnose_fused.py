"""Compile time and run time of the fused adapter kernels against the composite Triton path
(LN-scaling kernel + cuBLAS + depthwise kernel + PyTorch elementwise), printed as measured.

    python benchmarks/diagnose_fused.py
"""
import time

import torch
import triton.testing

import mona_kernels as mk
from mona_kernels.ops import mona_adapter as ma
from mona_kernels.reference import Mona as RefMona

FUSED = (ma._head_triton, ma._tail_triton, ma._recompute_triton)
COMPOSITE = (ma._head_composite, ma._tail_composite, ma._recompute_composite)


def use(fns):
    ma.HEAD["triton"], ma.TAIL["triton"], ma.RECOMPUTE["triton"] = fns


def main():
    for B, H, W, C in [(2, 200, 336, 128), (32, 56, 56, 128)]:
        torch.manual_seed(0)
        ref = RefMona(C, dropout=0.0).cuda().bfloat16()
        fused = mk.Mona(C, dropout=0.0).cuda().bfloat16()
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(B, H * W, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        ps = [x, *fused.parameters()]
        for label, fns in (("fused", FUSED), ("composite", COMPOSITE)):
            use(fns)
            t0 = time.perf_counter()
            torch.autograd.grad(fused(x, (H, W)), ps, g)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            fwd = triton.testing.do_bench(lambda: fused(x, (H, W)), warmup=10, rep=50, return_mode="median")
            both = triton.testing.do_bench(lambda: torch.autograd.grad(fused(x, (H, W)), ps, g), warmup=10, rep=50,
                                           return_mode="median")
            print(f"{B}x{H}x{W}x{C} {label:9s} first call {first:6.1f} s  fwd {fwd:.3f} ms  fwd+bwd {both:.3f} ms",
                  flush=True)
        fwd = triton.testing.do_bench(lambda: ref(x, (H, W)), warmup=10, rep=50, return_mode="median")
        both = triton.testing.do_bench(lambda: torch.autograd.grad(ref(x, (H, W)), [x, *ref.parameters()], g),
                                       warmup=10, rep=50, return_mode="median")
        print(f"{B}x{H}x{W}x{C} reference fwd {fwd:.3f} ms  fwd+bwd {both:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
