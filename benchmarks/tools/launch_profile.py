"""Host cost and launch count of one adapter forward+backward, and the registers/spills of every
compiled Triton kernel.

    python benchmarks/tools/launch_profile.py [B,H,W,C]      (default 1,8,8,128: GPU work is negligible,
                                                         so the wall time is the host's cost)

Prints, for the eager reference and each fused backend: GPU kernels launched per forward and per
forward+backward (torch.profiler), and the median wall time per forward and per forward+backward
with a synchronise after each call. Then lists n_regs / n_spills of the Triton kernels compiled.
"""
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import mona_kernels as mk
from mona_kernels import reference
from mona_kernels.backends import unavailable


def wall_ms(fn, reps=200):
    """Median wall time of ``fn`` in ms, synchronised before and after each call."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernels_per_call(fn):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def triton_kernel_info():
    """(kernel name, registers, spills) for every Triton kernel compiled in this process."""
    import triton
    rows = []
    modules = [f"mona_kernels.ops.{m}" for m in ("ln_scale", "multiscale_dwconv")]
    modules += [f"mona_kernels.backends.triton.{m}" for m in ("ln_down", "conv_up", "tail_bwd", "conv_ln_bwd",
                                                                 "param_grads", "reduce_grads")]
    for mod in modules:
        module = sys.modules.get(mod)
        if module is None:
            continue
        for name, fn in vars(module).items():
            if not isinstance(fn, triton.runtime.jit.JITFunction):
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                for compiled in caches[0].values():
                    rows.append((name, getattr(compiled, "n_regs", "?"), getattr(compiled, "n_spills", "?")))
    return rows


def main():
    B, H, W, C = (tuple(map(int, sys.argv[1].split(","))) if len(sys.argv) > 1 else (1, 8, 8, 128))
    torch.manual_seed(0)
    dtype = torch.bfloat16
    ref = reference.Mona(C).cuda().to(dtype)
    ref.dropout.p = 0.0
    models = {"reference": ref}
    for backend in ("triton", "cuda", "torch"):
        if unavailable(backend, torch.device("cuda")) is None:
            m = mk.Mona(C, dropout=0.0, backend=backend).cuda().to(dtype)
            m.load_state_dict(ref.state_dict())
            models[f"fused[{backend}]"] = m
    x = torch.randn(B, H * W, C, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    small = torch.randn(16, device="cuda")
    print(f"shape {B}x{H}x{W}x{C} bf16; one tiny torch.add costs {wall_ms(lambda: small.add(1)) * 1e3:.1f} us "
          "wall with a sync")
    print("| variant | kernels fwd | kernels fwd+bwd | wall fwd ms | wall fwd+bwd ms |")
    print("|---|---|---|---|---|")
    for name, m in models.items():
        params = [x, *m.parameters()]

        def fwd(m=m):
            with torch.no_grad():
                m(x, (H, W))

        def both(m=m, params=params):
            torch.autograd.grad(m(x, (H, W)), params, g)
        print(f"| {name} | {kernels_per_call(fwd)} | {kernels_per_call(both)} | {wall_ms(fwd):.3f} | "
              f"{wall_ms(both):.3f} |")
    if "fused[triton]" in models:
        import cProfile
        import pstats
        m = models["fused[triton]"]
        params = [x, *m.parameters()]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            torch.autograd.grad(m(x, (H, W)), params, g)
        torch.cuda.synchronize()
        prof.disable()
        print("\nhost profile of 50 fused[triton] forward+backward calls, by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
        print("\nthe same, by cumulative time:")
        pstats.Stats(prof).sort_stats("cumtime").print_stats(30)
    for name in ("fused[triton]", "fused[cuda]"):
        if name not in models:
            continue
        m = models[name]
        params = [x, *m.parameters()]
        torch.autograd.grad(m(x, (H, W)), params, g)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                torch.autograd.grad(m(x, (H, W)), params, g)
            torch.cuda.synchronize()
        print(f"\nhost time by torch op, {name}, 20 forward+backward calls:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
    from mona_kernels.backends.triton.launcher import Launcher
    print(f"\nTriton launches by path: {Launcher.stats}")
    print("\n| Triton kernel | registers | spills |")
    print("|---|---|---|")
    for name, regs, spills in triton_kernel_info():
        print(f"| {name} | {regs} | {spills} |")


if __name__ == "__main__":
    main()
