"""GPU check of the six-kernel Triton plan: parity, compile, per-kernel time, against the reference."""
import os, sys, time, json, collections
import torch, triton
sys.path.insert(0, "tests")
from conftest import randomize_, rel_err
import mona_kernels as mk
from mona_kernels import reference
from triton.testing import do_bench, do_bench_cudagraph

OUT = os.environ.get("OUT", "/tmp")
dev = "cuda"
lines = []
def log(*a):
    s = " ".join(str(v) for v in a); print(s, flush=True); lines.append(s)

def parity(shape, d, dtype, autocast=False, compile_=False, p=0.0):
    B, H, W, C = shape
    torch.manual_seed(1)
    m = randomize_(mk.Mona(C, bottleneck=d, dropout=p, backend="triton")).to(dev)
    ref = reference.Mona(C, bottleneck=d, dropout=p).to(dev).double(); ref.load_state_dict(m.state_dict())
    if not autocast: m = m.to(dtype)
    x = torch.randn(B, H * W, C, device=dev, dtype=torch.float32 if autocast else dtype, requires_grad=True)
    fn = torch.compile(m, fullgraph=True) if compile_ else m
    with torch.autocast("cuda", dtype=dtype, enabled=autocast):
        o = fn(x, (H, W))
    xr = x.detach().double().requires_grad_()
    r = ref(xr, (H, W))
    g = torch.randn_like(r)
    gs = torch.autograd.grad(o, [x, *m.parameters()], g.to(o.dtype))
    grs = torch.autograd.grad(r, [xr, *ref.parameters()], g)
    errs = [rel_err(o, r)] + [rel_err(a, b) for a, b in zip(gs, grs)]
    return max(errs), errs

def main():
    log("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for shape, d in (((2, 13, 17, 96), 64), ((1, 9, 1, 200), 16), ((3, 1, 11, 130), 96), ((2, 7, 6, 64), 128)):
            try:
                e, errs = parity(shape, d, dtype)
                log("parity", dtype, shape, d, f"{e:.2e}")
            except Exception as err:
                log("parity FAIL", dtype, shape, d, repr(err)[:400])
    for dtype in (torch.bfloat16, torch.float16):
        try:
            e, _ = parity((2, 13, 17, 96), 64, dtype, autocast=True); log("autocast", dtype, f"{e:.2e}")
        except Exception as err:
            log("autocast FAIL", dtype, repr(err)[:400])
    try:
        e, _ = parity((2, 13, 17, 96), 64, torch.float32, compile_=True); log("compiled fp32", f"{e:.2e}")
        e, _ = parity((2, 13, 17, 96), 64, torch.bfloat16, autocast=True, compile_=True); log("compiled autocast", f"{e:.2e}")
    except Exception as err:
        log("compile FAIL", repr(err)[:1500])
    # timings
    x = torch.empty(256 * 2**20, device=dev, dtype=torch.uint8); y = torch.empty_like(x)
    bw = 2 * x.numel() / (do_bench(lambda: y.copy_(x), rep=200) * 1e-3)
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    shapes = [(32, 56, 56, 128), (32, 14, 14, 512), (2, 200, 336, 128), (2, 100, 168, 256), (2, 50, 84, 512),
              (4, 128, 128, 192), (4, 32, 32, 768)]
    rows = []
    for B, H, W, C in shapes:
        torch.manual_seed(0)
        m = randomize_(mk.Mona(C, bottleneck=64, backend="triton")).to(dev).to(torch.bfloat16)
        ref = reference.Mona(C, bottleneck=64).to(dev).to(torch.bfloat16); ref.load_state_dict(m.state_dict())
        x = torch.randn(B, H * W, C, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        params = list(m.parameters())
        def fb(mod):
            def f():
                o = mod(x, (H, W))
                torch.autograd.grad(o, [x, *params] if mod is m else [x, *ref.parameters()], g)
            return f
        def fw(mod):
            def f():
                with torch.no_grad():
                    mod(x, (H, W))
            return f
        floor_fb = 5 * B * H * W * C * 2 / bw * 1e3
        floor_f = 2 * B * H * W * C * 2 / bw * 1e3
        r = dict(shape=(B, H, W, C))
        r["ref_fb"] = do_bench(fb(ref), rep=200)
        r["fused_fb"] = do_bench(fb(m), rep=200)
        r["fused_f"] = do_bench(fw(m), rep=200)
        try:
            r["graph_fb"] = do_bench_cudagraph(fb(m), rep=200)
            r["graph_f"] = do_bench_cudagraph(fw(m), rep=200)
        except Exception as err:
            log("graph FAIL", repr(err)[:300]); r["graph_fb"] = r["graph_f"] = float("nan")
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        fb(ref)(); r["ref_peak"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        fb(m)(); r["fused_peak"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        # per-kernel times
        from torch.profiler import profile, ProfilerActivity
        fb(m)(); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): fb(m)()
            torch.cuda.synchronize()
        per = collections.defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per[ev.name[:40]] += ev.device_time / 5 / 1e3
        r["kernels"] = {k: round(v * 1e3, 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
        r["floor_fb"], r["floor_f"] = floor_fb, floor_f
        rows.append(r)
        log(r["shape"], "ref_fb %.3f fused_fb %.3f graph_fb %.3f (x floor %.1f) fused_f %.3f graph_f %.3f (x floor %.1f) peak %.0f/%.0f MiB" % (
            r["ref_fb"], r["fused_fb"], r["graph_fb"], r["graph_fb"] / floor_fb, r["fused_f"], r["graph_f"], r["graph_f"] / floor_f,
            r["fused_peak"], r["ref_peak"]))
        log("   us:", r["kernels"])
    json.dump(rows, open(os.path.join(OUT, "plan_check.json"), "w"), indent=1, default=str)
    open(os.path.join(OUT, "plan_check.txt"), "w").write("\n".join(lines))

main()
