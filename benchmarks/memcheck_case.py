"""A small odd-shaped adapter forward+backward on one backend, checked against the float64
reference; meant to run under ``compute-sanitizer --tool memcheck``.

    compute-sanitizer --tool memcheck python benchmarks/memcheck_case.py cuda
"""
import sys

import torch

import mona_kernels as mk
from mona_kernels import reference


def main():
    backend = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    torch.manual_seed(0)
    B, H, W, C = 2, 13, 11, 96
    ref = reference.Mona(C).cuda().double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ref.dropout.p = 0.0
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        fused = mk.Mona(C, dropout=0.0, backend=backend).cuda().to(dtype)
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(B, H * W, C, device="cuda", dtype=torch.float64, requires_grad=True)
        g = torch.randn_like(x)
        xf = x.detach().to(dtype).requires_grad_()
        out_ref = ref(x, (H, W))
        grads_ref = torch.autograd.grad(out_ref, [x, *ref.parameters()], g)
        out = fused(xf, (H, W))
        grads = torch.autograd.grad(out, [xf, *fused.parameters()], g.to(dtype))
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip([out, *grads], [out_ref, *grads_ref])]
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        print(f"{backend} {dtype}: worst relative error {max(errs):.2e} (tolerance {tol})")
        assert max(errs) < tol, errs
        worst = max(worst, max(errs))
    torch.cuda.synchronize()
    print(f"memcheck case passed on {backend}")


if __name__ == "__main__":
    main()
