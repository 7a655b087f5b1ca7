"""A small odd-shaped adapter forward+backward on one backend, checked against the float64
reference, three times; meant to run under ``compute-sanitizer --tool memcheck``. Each shape runs in fp32,
in bf16, and in fp32 under bf16 autocast (the mixed-dtype LN kernels and casts).

    compute-sanitizer --tool memcheck python benchmarks/tools/memcheck_case.py cuda
"""
import sys

import torch

import mona_kernels as mk
from mona_kernels import reference


def main():
    backend = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    torch.manual_seed(0)
    worst = 0.0
    # 96 and 64 channels take the vectorised kernels; 30 and 10 the one-channel-per-thread ones; the
    # 37x61 map the shared-memory conv and wgrad tiles, with partial row, column and channel tiles;
    # the 66x66 map (a 32-pixel tile for every SM of an H200) the Triton forward's fused up projection,
    # 520 channels in 5 blocks, the last partial
    shapes = ((2, 13, 11, 96, 64), (1, 9, 5, 30, 10), (1, 37, 61, 32, 40), (1, 66, 66, 520, 16))
    modes = ((torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16))  # (dtype, autocast)
    for (B, H, W, C, d), (dtype, amp) in [(s, m) for s in shapes for m in modes]:
        ref = reference.Mona(C, bottleneck=d).cuda().double()
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        ref.dropout.p = 0.0
        fused = mk.Mona(C, bottleneck=d, dropout=0.0, backend=backend).cuda().to(dtype)
        fused.load_state_dict(ref.state_dict())
        for call in range(3):
            x = torch.randn(B, H * W, C, device="cuda", dtype=torch.float64, requires_grad=True)
            g = torch.randn_like(x)
            xf = x.detach().to(dtype).requires_grad_()
            out_ref = ref(x, (H, W))
            grads_ref = torch.autograd.grad(out_ref, [x, *ref.parameters()], g)
            with torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None):
                out = fused(xf, (H, W))
            grads = torch.autograd.grad(out, [xf, *fused.parameters()], g.to(dtype))
            errs = [((a.double() - b).norm() / b.norm()).item()
                    for a, b in zip([out, *grads], [out_ref, *grads_ref])]
            tol = 1e-4 if dtype == torch.float32 and amp is None else 3e-2
            label = f"{dtype} under {amp} autocast" if amp is not None else str(dtype)
            print(f"{backend} {B}x{H}x{W}x{C} d={d} {label} call {call + 1}: worst relative error {max(errs):.2e} "
                  f"(tolerance {tol})")
            assert max(errs) < tol, errs
            worst = max(worst, max(errs))
    torch.cuda.synchronize()
    print(f"memcheck case passed on {backend}")


if __name__ == "__main__":
    main()
