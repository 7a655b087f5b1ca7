"""Benchmark the fused Mona against the eager and compiled reference: ``python -m mona_kernels.benchmark``.

For each shape (by default where the adapter runs in Swin-B and Swin-L training) it checks the fused outputs and gradients against the
reference, then times forward, backward and forward+backward (median of CUDA-event timings,
rotating input sets so that the cache does not flatter), reports peak memory and the fraction of
the HBM floor (bytes that must move over a copy bandwidth it measures itself), prints a table and
writes a CSV and a PNG plot. Without a GPU it runs the CPU path, says so, and still prints its table.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
import traceback

import torch

from . import reference
from .modules import Mona
from .ops.multiscale_dwconv import multiscale_dwconv

# Swin-B classification at 224 (stages 1 and 3), COCO detection with Swin-B (stages 1 to 3), ADE20K
# segmentation with Swin-L at 512 (stages 1 and 3).
GPU_SHAPES = [(32, 56, 56, 128), (32, 14, 14, 512), (2, 200, 336, 128), (2, 100, 168, 256),
              (2, 50, 84, 512), (4, 128, 128, 192), (4, 32, 32, 768)]
CPU_SHAPES = [(2, 14, 14, 128), (2, 28, 28, 128)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INPUT_SETS = 3
ROUNDS = {"cuda": 1, "cpu": 5}  # interleaved rounds of the adapter's eager timings


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device, reps: int) -> float:
    """Median milliseconds of ``fn``; CUDA events on the GPU, the wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start) * 1e3 < reps:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, 200)
    return 2 * n / (ms * 1e-3)


def _randn(shape, device, dtype):
    """Normal samples drawn on the CPU: the CUDA generator stays untouched by the benchmark, so a
    failed CUDA-graph capture (which can leave it in capture state) does not stop later cases."""
    return torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype)


def _rotating(fn_of_index):
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % INPUT_SETS
        return fn_of_index(state["i"])
    return run


_side_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device: int) -> torch.cuda.Stream:
    """The stream captures warm up on, one per device for the process: PyTorch keeps a cuBLAS
    workspace (32 MiB on Hopper) for each stream a GEMM has run on, so a new stream per capture
    would leave one behind each time and count in later peaks."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def capture_graph(fn, warmup: int = 3):
    """``(graph, result)``: ``fn`` run ``warmup`` times on a side stream (as CUDA-graph capture
    requires), then captured once; ``result`` is what the captured call returned (its tensors are
    the graph's static outputs, rewritten by every replay).

    Example (a fused adapter step; with dropout on, only the Triton backend captures)::

        x = torch.randn(2, 64, 128, device="cuda", requires_grad=True)
        mona = mona_kernels.Mona(128, dropout=0.0).cuda()
        graph, grads = capture_graph(lambda: torch.autograd.grad(mona(x, (8, 8)).sum(), [x]))
        graph.replay()  # grads now hold the gradients for x's current contents
    """
    side = side_stream(torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    torch.cuda.synchronize()
    return graph, result


def _graph_ms(fn, device, reps: int) -> float:
    """Median milliseconds of ``fn`` captured once in a CUDA graph and replayed: the GPU time alone,
    without the host's per-launch cost (what ``torch.compile(mode="reduce-overhead")`` or a graphed
    training loop sees). NaN where capture is impossible (the CPU, or an op that cannot be captured)."""
    if device.type != "cuda":
        return float("nan")
    try:
        graph, _ = capture_graph(fn)
    except RuntimeError:
        print(f"CUDA graph capture failed:\n{traceback.format_exc(limit=8)}", file=sys.stderr)
        torch.cuda.synchronize()
        return float("nan")
    ms = _time_ms(graph.replay, device, reps)
    del graph
    return ms


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _graphed_pair(fn, grads_of, sets, device, reps, graphs):
    """``(forward, forward+backward)`` milliseconds replayed from CUDA graphs, the forward without
    autograd as inference runs it; NaN without ``graphs``. Each list of input sets in ``sets`` gets
    a copy of its set 0 to capture on, a fresh leaf where it needs gradients: the adapter's capture
    fails on a leaf already used on the default stream, whose gradient accumulation stays there.
    The caller must also hold no autograd graph over the parameters (compute reference outputs
    without autograd, or detach them): it pins their accumulation nodes to the default stream too."""
    if not graphs:
        return float("nan"), float("nan")
    for inputs in sets:
        first = inputs[0]
        inputs.append(first.detach().clone().requires_grad_() if first.requires_grad else first)
    i = len(sets[0]) - 1
    return _graph_ms(_no_grad(lambda: fn(i)), device, reps), _graph_ms(lambda: grads_of(i), device, reps)


def _peak_mb(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _saved_mb(fn, device) -> float:
    """Memory a forward leaves allocated for its backward, beyond the output it returns: what each
    adapter of a network holds from its forward until its backward runs (about x, h1 and two
    floats per token; x is the caller's tensor and is not counted)."""
    if device.type != "cuda":
        return float("nan")
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    saved = torch.cuda.memory_allocated(device) - base - out.numel() * out.element_size()
    del out
    return saved / 2**20


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def bench_adapter(shape, dtype, device, reps, variants, backends, graphs=False):
    """Rows of timings for one (B, H, W, C) shape."""
    # The backward alone is timed by replaying one retained autograd graph; a compiled backward that
    # donates its saved buffers refuses retain_graph, so the compiled reference is built without.
    import torch._functorch.config as functorch_config  # a submodule `import torch` does not load
    with functorch_config.patch(donated_buffer=False):
        return _bench_adapter(shape, dtype, device, reps, variants, backends, graphs)


def _bench_adapter(shape, dtype, device, reps, variants, backends, graphs):
    B, H, W, C = shape
    torch.manual_seed(0)
    ref = reference.Mona(C).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(_randn(p.shape, p.device, p.dtype) * 0.5 / (p[0].numel() ** 0.5 if p.dim() > 1 else 1))
    ref.dropout.p = 0.0
    xs = [_randn((B, H * W, C), device, dtype).requires_grad_() for _ in range(INPUT_SETS)]
    gs = [_randn((B, H * W, C), device, dtype) for _ in range(INPUT_SETS)]
    hw = (H, W)
    models = {"reference": ref}
    if "compiled" in variants and device.type == "cuda":
        models["compiled"] = torch.compile(ref)
    for backend in backends:
        fused = Mona(C, dropout=0.0, backend=backend).to(device=device, dtype=dtype)
        fused.load_state_dict(ref.state_dict())
        models[f"fused[{backend}]"] = fused
    params = list(ref.parameters())

    out_ref = ref(xs[0], hw)
    grads_ref = torch.autograd.grad(out_ref, [xs[0], *params], gs[0])
    # Keep no autograd graph alive: a live graph pins the leaves' gradient-accumulation nodes to the
    # stream they were made on, and CUDA-graph capture on another stream then fails.
    out_ref = out_ref.detach()
    def fwd_bwd_of(model):
        mparams = list(model.parameters())
        return lambda i: torch.autograd.grad(model(xs[i], hw), [xs[i], *mparams], gs[i])

    # The eager timings run in interleaved rounds, each variant once a round, and keep each one's
    # median: the host's speed drifts, and on the CPU the drift is as large as the differences.
    timed = {name: {"fwd_ms": _rotating(lambda i, m=model: m(xs[i], hw)),
                    "eval_fwd_ms": _no_grad(_rotating(lambda i, m=model: m(xs[i], hw))),
                    "fwd_bwd_ms": _rotating(fwd_bwd_of(model))} for name, model in models.items()}
    times = {name: {key: [] for key in fns} for name, fns in timed.items()}
    for _ in range(ROUNDS[device.type]):
        for name, fns in timed.items():
            for key, fn in fns.items():
                times[name][key].append(_time_ms(fn, device, reps))
    rows = []
    for name, model in models.items():
        mparams = list(model.parameters())
        out = model(xs[0], hw)
        grads = torch.autograd.grad(out, [xs[0], *mparams], gs[0])
        err_out = _rel(out, out_ref)
        err_grad = max(_rel(a, b) for a, b in zip(grads, grads_ref))
        del out, grads
        fwd_bwd = fwd_bwd_of(model)
        outs = [model(x, hw) for x in xs[:INPUT_SETS]]  # not the graph timings' extra leaves
        bwd = _time_ms(_rotating(lambda i: torch.autograd.grad(outs[i], [xs[i], *mparams], gs[i],
                                                               retain_graph=True)), device, reps)
        outs.clear()  # free the three retained graphs before measuring peak memory
        saved = _saved_mb(lambda: model(xs[0], hw), device)
        # Peak over three forward+backward calls, the same three for every variant.

        def three_calls():
            for _ in range(3):
                fwd_bwd(0)  # each call's gradients are dropped before the next
        peak = _peak_mb(three_calls, device)
        graphed_fwd, graphed = _graphed_pair(lambda i: model(xs[i], hw), fwd_bwd, [xs, gs], device, reps,
                                             graphs and name != "compiled")
        medians = {key: sorted(v)[len(v) // 2] for key, v in times[name].items()}
        rows.append(dict(op="adapter", variant=name, shape="x".join(map(str, shape)), bwd_ms=bwd,
                         graph_fwd_ms=graphed_fwd, graph_fwd_bwd_ms=graphed, peak_mb=peak, saved_mb=saved,
                         err_out=err_out, err_grad=err_grad, **medians))
    return rows


def bench_dwconv(shape, dtype, device, reps, backends, d=64, graphs=False):
    """The fused multi-scale op against three separate convs and cuDNN's single 7x7 depthwise conv; with
    ``graphs`` also each one's forward and forward+backward replayed from a CUDA graph (GPU time)."""
    B, H, W, _ = shape
    torch.manual_seed(0)
    conv = reference.MonaOp(d).to(device=device, dtype=dtype)
    ws = [conv.conv1.weight, conv.conv1.bias, conv.conv2.weight, conv.conv2.bias, conv.conv3.weight, conv.conv3.bias]
    hs = [_randn((B, H, W, d), device, dtype).requires_grad_() for _ in range(INPUT_SETS)]
    gs = [_randn((B, H, W, d), device, dtype) for _ in range(INPUT_SETS)]
    hs_nhwc = [h.detach().permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
               for h in hs]
    single = torch.nn.Conv2d(d, d, 7, padding=3, groups=d).to(device=device, dtype=dtype,
                                                                 memory_format=torch.channels_last)
    fns = {"reference": lambda i: reference.multiscale_dwconv_ref(hs[i], *ws),
           "single_7x7_conv": lambda i: single(hs_nhwc[i])}
    for backend in backends:
        fns[f"fused[{backend}]"] = (lambda b: lambda i: multiscale_dwconv(hs[i], *ws, backend=b))(backend)
    with torch.no_grad():  # no live autograd graph: it would pin the weights' gradient-accumulation
        out_ref = fns["reference"](0)  # nodes to the default stream, and capture elsewhere then fails
    rows = []
    for name, fn in fns.items():
        inputs = (lambda i: [hs_nhwc[i], *single.parameters()]) if name.startswith("single") \
            else (lambda i: [hs[i], *ws])
        grads_of = (lambda i: torch.autograd.grad(fn(i), inputs(i), gs[i].permute(0, 3, 1, 2))) \
            if name.startswith("single") else (lambda i: torch.autograd.grad(fn(i), inputs(i), gs[i]))
        with torch.no_grad():
            err = float("nan") if name.startswith("single") else _rel(fn(0), out_ref)
        fwd = _time_ms(_rotating(fn), device, reps)
        both = _time_ms(_rotating(grads_of), device, reps)
        graphed_fwd, graphed = _graphed_pair(fn, grads_of, [hs, hs_nhwc, gs], device, reps, graphs)
        rows.append(dict(op="multiscale_dwconv", variant=name, shape=f"{B}x{H}x{W}x{d}", fwd_ms=fwd,
                         bwd_ms=both - fwd, fwd_bwd_ms=both, graph_fwd_ms=graphed_fwd, graph_fwd_bwd_ms=graphed,
                         peak_mb=float("nan"), saved_mb=float("nan"), err_out=err,
                         err_grad=float("nan")))
    return rows


def bench_ln_scale(shape, dtype, device, reps, backends, graphs=False):
    from .ops.ln_scale import ln_scale
    B, H, W, C = shape
    torch.manual_seed(0)
    xs = [_randn((B, H * W, C), device, dtype).requires_grad_() for _ in range(INPUT_SETS)]
    gs = [_randn((B, H * W, C), device, dtype) for _ in range(INPUT_SETS)]
    params = [_randn((C,), device, dtype).requires_grad_() for _ in range(4)]
    fns = {"reference": lambda i: reference.ln_scale_ref(xs[i], *params)}
    for backend in backends:
        fns[f"fused[{backend}]"] = (lambda b: lambda i: ln_scale(xs[i], *params, backend=b))(backend)
    with torch.no_grad():
        out_ref = fns["reference"](0)
    rows = []
    for name, fn in fns.items():
        def grads_of(i, fn=fn):
            return torch.autograd.grad(fn(i), [xs[i], *params], gs[i])
        fwd = _time_ms(_rotating(fn), device, reps)
        both = _time_ms(_rotating(grads_of), device, reps)
        graphed_fwd, graphed = _graphed_pair(fn, grads_of, [xs, gs], device, reps, graphs)
        rows.append(dict(op="ln_scale", variant=name, shape="x".join(map(str, shape)), fwd_ms=fwd,
                         bwd_ms=both - fwd, fwd_bwd_ms=both, graph_fwd_ms=graphed_fwd, graph_fwd_bwd_ms=graphed,
                         peak_mb=float("nan"), saved_mb=float("nan"), err_out=_rel(fn(0), out_ref),
                         err_grad=float("nan")))
    return rows


def _add_ratios(rows, bandwidth, elem_bytes):
    for r in rows:
        ref = next(x for x in rows if x["op"] == r["op"] and x["shape"] == r["shape"] and x["variant"] == "reference")
        r["speedup_fwd"] = ref["fwd_ms"] / r["fwd_ms"]
        r["speedup_eval_fwd"] = ref.get("eval_fwd_ms", float("nan")) / r.get("eval_fwd_ms", float("nan"))
        r["speedup_fwd_bwd"] = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        r["speedup_graph_fwd"] = ref["graph_fwd_ms"] / r["graph_fwd_ms"]
        r["speedup_graph"] = ref["graph_fwd_bwd_ms"] / r["graph_fwd_bwd_ms"]
        n = 1
        for s in r["shape"].split("x"):
            n *= int(s)
        r["floor_fwd_ms"] = 2 * n * elem_bytes / bandwidth * 1e3
        r["floor_fwd_bwd_ms"] = 5 * n * elem_bytes / bandwidth * 1e3
        r["floor_x_graph"] = r["graph_fwd_bwd_ms"] / r["floor_fwd_bwd_ms"]


# (column, heading) of the printed table; a column no row has a value for is left out.
COLUMNS = [("op", "op"), ("shape", "B x H x W x C"), ("variant", "variant"), ("eval_fwd_ms", "no-grad fwd ms"),
           ("speedup_eval_fwd", "no-grad fwd speed-up"), ("fwd_ms", "fwd ms"),
           ("fwd_bwd_ms", "fwd+bwd ms"), ("speedup_fwd_bwd", "fwd+bwd speed-up"), ("graph_fwd_ms", "graph fwd ms"),
           ("graph_fwd_bwd_ms", "graph fwd+bwd ms"), ("speedup_graph", "graph speed-up"),
           ("floor_x_graph", "graph fwd+bwd / floor"), ("peak_mb", "peak MB"), ("err_out", "err out"),
           ("err_grad", "err grad")]


def _has_value(v) -> bool:
    return not (isinstance(v, float) and v != v)


def _print_table(rows, header):
    cols = [(c, h) for c, h in COLUMNS if any(_has_value(r.get(c, float("nan"))) for r in rows)]
    print(header)
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c, _ in cols:
            v = r.get(c, float("nan"))
            cells.append("–" if not _has_value(v) else f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def _plot(rows, path, title):
    """Speed-up over the reference per shape and variant (forward+backward; replayed from CUDA graphs
    where measured), on a linear axis with a line at 1."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install mona_kernels[plot]): no plot written", file=sys.stderr)
        return None
    adapter = [r for r in rows if r["op"] == "adapter" and r["variant"] != "reference"]
    if not adapter:
        return None
    key = "speedup_graph" if all(_has_value(r["speedup_graph"]) for r in adapter) else "speedup_fwd_bwd"
    shapes = list(dict.fromkeys(r["shape"] for r in adapter))
    variants = list(dict.fromkeys(r["variant"] for r in adapter))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(variants)
    for k, v in enumerate(variants):
        ys = [next((r[key] for r in adapter if r["shape"] == s and r["variant"] == v), 0) for s in shapes]
        ax.bar([i + k * width for i in range(len(shapes))], ys, width, label=v)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=20, fontsize=8)
    ax.set_ylabel("speed-up over the reference (x)")
    ax.legend()
    ax.set_title(f"Mona adapter forward+backward{' (CUDA graphs)' if key == 'speedup_graph' else ''}: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", help="B,H,W,C shapes (default on a GPU: "
                    + " ".join(",".join(map(str, s)) for s in GPU_SHAPES) + "; on the CPU: "
                    + " ".join(",".join(map(str, s)) for s in CPU_SHAPES) + ")")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--ops", nargs="*", default=["adapter", "multiscale_dwconv", "ln_scale"],
                    choices=["adapter", "multiscale_dwconv", "ln_scale"])
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    ap.add_argument("--graphs", action="store_true",
                    help="also time forward and forward+backward replayed from CUDA graphs (GPU time alone)")
    ap.add_argument("--backends", nargs="*", choices=["triton", "cuda", "torch"],
                    help="fused backends to time (default: every one that runs here)")
    ap.add_argument("--reps", type=int, default=200, help="milliseconds of timed repeats per case")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the CSV and the plot")
    args = ap.parse_args(argv)

    from .backends import unavailable
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        print("No GPU found: timing the CPU path on small shapes (not representative of GPU speed).")
        dtype = torch.float32
        shapes = [tuple(map(int, s.split(","))) for s in args.shapes] if args.shapes else CPU_SHAPES
    else:
        shapes = [tuple(map(int, s.split(","))) for s in args.shapes] if args.shapes else GPU_SHAPES
    backends = [b for b in (args.backends or ("triton", "cuda", "torch")) if unavailable(b, device) is None]
    if device.type == "cpu":
        backends = ["torch"]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bandwidth = measure_bandwidth(device)
    print(f"device: {gpu}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; dtype {dtype}; backends {backends}")

    rows = []
    jobs = [(op, s) for op in args.ops for s in shapes]
    for k, (op, shape) in enumerate(jobs, 1):
        print(f"[{k}/{len(jobs)}] {op} {shape}", file=sys.stderr, flush=True)
        if op == "adapter":
            variants = () if args.no_compile else ("compiled",)
            rows += bench_adapter(shape, dtype, device, args.reps, variants, backends, args.graphs)
        elif op == "multiscale_dwconv":
            rows += bench_dwconv(shape, dtype, device, args.reps, backends, graphs=args.graphs)
        else:
            rows += bench_ln_scale(shape, dtype, device, args.reps, backends, graphs=args.graphs)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    _add_ratios(rows, bandwidth, torch.finfo(dtype).bits // 8)

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    with open(os.path.join(args.out, "benchmark.csv"), "w", newline="") as f:
        # every op's columns, in the order they first appear: ops time different things (the adapter
        # alone has an eval-mode forward), so the first row's keys are not all of them
        columns = list(dict.fromkeys(key for r in rows for key in r))
        w = csv.DictWriter(f, fieldnames=["date", "gpu", "dtype"] + columns, restval="")
        w.writeheader()
        for r in rows:
            w.writerow(dict(date=stamp, gpu=gpu, dtype=str(dtype), **r))
    title = f"{gpu}, {str(dtype).replace('torch.', '')}, {stamp}"
    plot = _plot(rows, os.path.join(args.out, "benchmark.png"), title)
    _print_table(rows, f"\n{title}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"\nwrote {os.path.join(args.out, 'benchmark.csv')}" + (f" and {plot}" if plot else ""))
    return rows


if __name__ == "__main__":
    main()
