"""Where the host time of one adapter forward+backward goes, layer by layer, at a shape whose GPU work
is negligible.

    python benchmarks/host_cost.py [B,H,W,C] [backend]      (default 1,8,8,128 cuda)

Median wall time with a synchronise after each call, for: the module's forward (no grad), the
functional op, the backend's own entry point where it has one, a forward that records the autograd
graph, its backward alone, and forward+backward. Also the summed GPU kernel time of one
forward+backward (torch.profiler), so that wall minus GPU time is the host's share.
"""
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import mona_kernels as mk
from mona_kernels import reference
from mona_kernels.functional import _compute_dtype
from mona_kernels.ops import cuda_ext


def wall_us(fn, reps=300, setup=None):
    for _ in range(10):
        fn(setup()) if setup else fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        arg = setup() if setup else None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(arg) if setup else fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def gpu_us(fn):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def triton_graph_rows(fused, x, g):
    """The Triton path's graph-cache entry, piece by piece: staging, replays, copying results out."""
    from mona_kernels.ops import graphs
    entries = list(graphs.CACHE.entries.values())
    if not entries:
        return [("fused[triton]", "no graph-cache entry (cache off?)", float("nan"))]
    e = entries[-1]
    M, C = e.x.shape
    p = list(fused._params())
    xs = x.detach().reshape(M, C)
    gs = g.reshape(M, C)
    seed = torch.zeros(1, dtype=torch.int64)
    _, h1, mean, rstd = e.forward(xs, p, seed, True)
    return [
        ("fused[triton]", "entry.forward (stage, replay, copy out)", wall_us(lambda: e.forward(xs, p, seed, True))),
        ("fused[triton]", "entry.backward (stage, replay, copy out)",
         wall_us(lambda: e.backward(gs, xs, h1, mean, rstd, p, seed))),
        ("fused[triton]", "forward staging (_foreach_copy_ per dtype)", wall_us(lambda: e.stage_fwd([xs, *p]))),
        ("fused[triton]", "backward staging", wall_us(lambda: e.stage_bwd([gs, xs, h1, mean, rstd, *p]))),
        ("fused[triton]", "forward replay alone", wall_us(e.fwd.replay)),
        ("fused[triton]", "backward replay alone", wall_us(e.bwd.replay)),
        ("fused[triton]", "forward copy out (4 outputs)", wall_us(e.copy_fwd)),
        ("fused[triton]", "backward copy out (dx, flat gradients)", wall_us(e.copy_bwd)),
        ("fused[triton]", "4 forward outputs: clone each",
         wall_us(lambda: [t.clone() for t in (e.out, e.h1, e.mean, e.rstd)])),
    ]


def main():
    B, H, W, C = (tuple(map(int, sys.argv[1].split(","))) if len(sys.argv) > 1 else (1, 8, 8, 128))
    backend = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    torch.manual_seed(0)
    dtype = torch.bfloat16
    ref = reference.Mona(C).cuda().to(dtype)
    ref.dropout.p = 0.0
    fused = mk.Mona(C, dropout=0.0, backend=backend).cuda().to(dtype)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(B, H * W, C, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    rows = []
    for name, m in (("reference", ref), (f"fused[{backend}]", fused)):
        params = [x, *m.parameters()]

        def fwd_nograd(m=m):
            with torch.no_grad():
                m(x, (H, W))

        def fwd(m=m):
            return m(x, (H, W))

        def bwd(out, params=params):
            torch.autograd.grad(out, params, g)

        def both(m=m, params=params):
            torch.autograd.grad(m(x, (H, W)), params, g)

        rows.append((name, "module forward, no grad", wall_us(fwd_nograd)))
        rows.append((name, "module forward, recording", wall_us(fwd)))
        rows.append((name, "backward alone", wall_us(bwd, setup=fwd)))
        rows.append((name, "forward+backward", wall_us(both)))
        rows.append((name, "GPU kernel time of forward+backward", gpu_us(both)))
    if backend == "cuda":
        p = list(fused._params())
        conv = fused.adapter_conv
        args = (x.detach().reshape(B * H * W, C), (B, H, W), *p[:12], conv.projector.weight, conv.projector.bias,
                fused.project2.weight, fused.project2.bias, 1e-5, 0.0, 0, _compute_dtype(x))
        with torch.no_grad():
            rows.append(("fused[cuda]", "cuda_ext.mona_adapter, no grad", wall_us(lambda: cuda_ext.mona_adapter(*args))))
        lib = cuda_ext.load()
        raw = (args[0], B, H, W, *args[2:-1], None, args[-1])  # no device seed
        with torch.no_grad():
            rows.append(("fused[cuda]", "_C.mona_adapter, no grad", wall_us(lambda: lib.mona_adapter(*raw))))
    if backend == "triton":
        rows += triton_graph_rows(fused, x, g)
    small = torch.randn(16, device="cuda")
    rows.append(("torch", "one tiny torch.add", wall_us(lambda: small.add(1))))
    leaf = torch.randn(B, H * W, C, device="cuda", dtype=dtype, requires_grad=True)
    others = [torch.randn(4, device="cuda", requires_grad=True) for _ in range(16)]
    rows.append(("torch", "autograd floor: grad of x * 2 for 17 inputs",
                 wall_us(lambda: torch.autograd.grad(leaf * 2, [leaf, *others], g, allow_unused=True))))
    a = torch.randn(B * H * W, C, device="cuda", dtype=dtype)
    w = torch.randn(64, C, device="cuda", dtype=dtype)
    for lib in ("cublaslt", "cublas"):
        torch.backends.cuda.preferred_blas_library(lib)
        rows.append(("torch", f"one small mm, {lib}", wall_us(lambda: a @ w.t())))
        params = [x, *fused.parameters()]
        rows.append((f"fused[{backend}]", f"forward+backward, {lib}",
                     wall_us(lambda: torch.autograd.grad(fused(x, (H, W)), params, g))))
    torch.backends.cuda.preferred_blas_library("default")
    print(f"shape {B}x{H}x{W}x{C} bf16, host cost by layer (median wall us, synchronised)")
    print("| variant | what | us |")
    print("|---|---|---|")
    for name, what, us in rows:
        print(f"| {name} | {what} | {us:.1f} |")


if __name__ == "__main__":
    main()
