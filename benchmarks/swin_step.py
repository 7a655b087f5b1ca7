"""End-to-end: one training step of a timm Swin-B (random init, frozen backbone, adapters and head
trained, bf16 autocast) with reference Mona adapters, fused adapters, and a zero-cost adapter (a
single learned scale that keeps the gradient path). Checks the fused adapter gradients against the
reference first.

    python benchmarks/swin_step.py [--batch 32] [--steps 20] [--rounds 5] [--graph] [--backends triton,cuda]
                                   [--no-check]
                                   [--compile [VARIANT ...]] [--compile-modes default reduce-overhead]
    python benchmarks/swin_step.py --multiscale [--ms-size 800,1333] [--ms-steps 20] [--ms-passes 3]

The eager step is bound by this host's Python and launch speed, which drifts within a run; so the
variants are timed in turn, ``--rounds`` times, and each is reported by its median over the rounds,
and its ratio to the zero-cost step by the median of the rounds' ratios (with their range).

``--graph`` also times the whole step (forward, backward, AdamW with ``capturable=True``) captured
once in a CUDA graph and replayed: the GPU time of a step, without the host's.

``--multiscale`` times detection-style training instead: the Swin-B backbone alone (features, no
head) at B = 2, each step at a new random image size around ``--ms-size`` (multiples of 32, as
detectors pad them), ``--ms-steps`` sizes, run ``--ms-passes`` times over the same sizes; wall time
per step of each pass, eager, every variant in turn within a pass. The first pass includes what the
first sight of each size costs (kernel compiles, cuDNN's choices, allocator growth).
"""
import argparse
import copy
import random
import time

import torch
import torch.nn as nn
import timm

import mona_kernels as mk
from mona_kernels.backends import unavailable
from mona_kernels.integrations import add_mona, freeze_all_but_adapters
from mona_kernels.benchmark import side_stream


class ZeroCostAdapter(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(C))

    def forward(self, x, hw_shapes=None):
        return x * self.scale


def blocks_of(model):
    return [b for b in model.modules() if hasattr(b, "my_module_1")]


def install(model, adapters):
    for blk, (a1, a2) in zip(blocks_of(model), adapters):
        blk.my_module_1, blk.my_module_2 = a1, a2


def train_step(loss_fn, opt, device_type="cuda"):
    """One training step: ``loss_fn()`` under bf16 autocast, backward, optimiser step."""
    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_fn(model, x, y, opt):
    return train_step(lambda: nn.functional.cross_entropy(model(x), y), opt)


def graphed_step(model, x, y, params):
    """The training step captured in one CUDA graph (after warm-up on a side stream); returns its replay."""
    opt = torch.optim.AdamW(params, lr=1e-4, capturable=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    # one side stream per device: a new one per variant would keep another cuBLAS workspace
    side = side_stream(torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_steps(step, steps):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def adapter_grads(model, x, y, autocast=True):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = nn.functional.cross_entropy(model(x), y)
    names = [n for n, p in model.named_parameters() if p.requires_grad and "my_module_" in n]
    params = dict(model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))


def multiscale(args):
    """Wall time per step of each pass over the same random detection-size images, per variant."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    try:  # timm takes other image sizes than its configured one only when told
        model = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0,
                                  strict_img_size=False, dynamic_mask=True).to(device)
    except TypeError as e:
        raise SystemExit(f"--multiscale needs a timm whose Swin takes strict_img_size and dynamic_mask: {e}")
    add_mona(model, fused=False, dropout=0.0)
    freeze_all_but_adapters(model, keep=())
    reference = [(b.my_module_1, b.my_module_2) for b in blocks_of(model)]
    backends = [b for b in args.backends.split(",") if unavailable(b, device) is None]
    variants = [("reference", reference)]
    for b in backends:
        variants.append((f"fused[{b}]", [tuple(mk.convert(copy.deepcopy(m), backend=b)[0] for m in pair)
                                         for pair in reference]))
    variants.append(("zero-cost", [tuple(ZeroCostAdapter(m.gamma.shape[0]).to(device) for m in pair)
                                   for pair in reference]))
    H0, W0 = args.ms_size
    rng = random.Random(0)
    def near(n):  # within 15% of n, a multiple of 32
        return 32 * max(1, round(n * rng.uniform(0.85, 1.15) / 32))
    sizes = [(near(H0), near(W0)) for _ in range(args.ms_steps)]
    images = {hw: torch.randn(2, 3, *hw, device=device) for hw in set(sizes)}
    opts = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    ms = {label: [] for label, _ in variants}
    for _ in range(args.ms_passes):
        for label, adapters in variants:
            install(model, adapters)
            if label not in opts:
                opts[label] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            sync()
            start = time.perf_counter()
            for hw in sizes:
                train_step(lambda: model.forward_features(images[hw]).float().square().mean(), opts[label],
                           device.type)()
            sync()
            ms[label].append((time.perf_counter() - start) / len(sizes) * 1e3)
        # a line a pass, so that a run cut short still says what it measured
        print(f"pass {len(ms['zero-cost'])}: " + ", ".join(f"{label} {ms[label][-1]:.1f} ms" for label, _ in variants),
              flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\nSwin-B backbone, B=2, {len(sizes)} random sizes around {H0}x{W0} "
          f"({min(sizes)}..{max(sizes)}), bf16 autocast, frozen backbone, {name}; wall ms a step, eager")
    passes = " | ".join(f"pass {k + 1}" for k in range(args.ms_passes))
    print(f"| adapter | {passes} | " + " | ".join(f"pass {k + 1} vs zero-cost" for k in range(args.ms_passes)) + " |")
    print("|---|" + "---|" * (2 * args.ms_passes))
    for label, _ in variants:
        times = " | ".join(f"{t:.1f}" for t in ms[label])
        ratios = " | ".join(f"{t / z:.2f}x" for t, z in zip(ms[label], ms["zero-cost"]))
        print(f"| {label} | {times} | {ratios} |", flush=True)


def check(model, x, y, reference, fused, backends, set_backend):
    """Prints how far the fused adapters' gradients lie from the float64 reference's."""
    # Parity of the implementation in float64, where rounding cannot hide a bug. Then how far each
    # fp32 and bf16-autocast run lies from that float64 truth: 24 random-init blocks amplify rounding,
    # so the fused and the reference adapters are compared by their distance to the truth.
    # eval() turns off the backbone's stochastic depth, which would draw a new mask for every call;
    # gradients still flow. The training steps below run in train mode.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model.eval()
    m64 = copy.deepcopy(model).double()
    truth = adapter_grads(m64, x.double(), y, autocast=False)
    install(m64, [tuple(mk.convert(copy.deepcopy(m))[0].double() for m in pair) for pair in reference])
    fused_fp64 = adapter_grads(m64, x.double(), y, autocast=False)
    del m64
    ref_fp32 = adapter_grads(model, x, y, autocast=False)
    ref_bf16 = adapter_grads(model, x, y)
    install(model, fused)
    fused_grads = {}
    for b in backends:
        set_backend(b)
        fused_grads[b] = adapter_grads(model, x, y, autocast=False), adapter_grads(model, x, y)
    model.train()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def errors(grads):
        errs = sorted(((grads[n].double() - g).norm() / g.norm().clamp_min(1e-300)).item() for n, g in truth.items())
        return f"median {errs[len(errs) // 2]:.3g}, worst {errs[-1]:.3g}"
    print(f"adapter gradients over {len(truth)} tensors, relative to the float64 reference:")
    print(f"  fused float64          {errors(fused_fp64)}")
    print(f"  reference fp32         {errors(ref_fp32)}")
    for b, (fp32, _) in fused_grads.items():
        print(f"  fused[{b}] fp32 {' ' * (6 - len(b))}   {errors(fp32)}")
    print(f"  reference bf16 amp     {errors(ref_bf16)}")
    for b, (_, bf16) in fused_grads.items():
        print(f"  fused[{b}] bf16 amp {' ' * (6 - len(b))}{errors(bf16)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="eager timings of every variant, in turn")
    ap.add_argument("--compile", nargs="*", metavar="VARIANT",
                    help="also time torch.compile of each variant, or of the ones named (reference, "
                         "fused[triton], fused[cuda], zero-cost); compiling one Swin-B takes minutes")
    ap.add_argument("--compile-modes", nargs="+", default=["default"], choices=["default", "reduce-overhead"],
                    help="torch.compile modes for --compile (reduce-overhead graphs the compiled step with "
                         "PyTorch's own CUDA-graph trees)")
    ap.add_argument("--graph", action="store_true", help="also time each variant's step replayed from a CUDA graph")
    ap.add_argument("--no-check", action="store_true", help="time only: skip the float64 gradient check (a minute)")
    ap.add_argument("--backends", default="triton,cuda", help="fused backends to check and time (comma-separated)")
    ap.add_argument("--multiscale", action="store_true",
                    help="time detection-style steps at a new random image size each step instead")
    ap.add_argument("--ms-size", type=lambda s: tuple(int(v) for v in s.split(",")), default=(800, 1333),
                    metavar="H,W", help="the image size the random sizes are drawn around (within 15%%)")
    ap.add_argument("--ms-steps", type=int, default=20, help="random sizes, a step each")
    ap.add_argument("--ms-passes", type=int, default=3, help="passes over the same sizes")
    args = ap.parse_args()
    if args.multiscale:
        return multiscale(args)
    torch.manual_seed(0)
    model = timm.create_model("swin_base_patch4_window7_224", pretrained=False).cuda()
    add_mona(model, fused=False, dropout=0.0)
    with torch.no_grad():  # adapters away from their near-identity init, so every path carries gradient
        for blk in blocks_of(model):
            for m in (blk.my_module_1, blk.my_module_2):
                m.gamma.normal_(0, 0.1)
                for p in (m.project2.weight, m.adapter_conv.projector.weight):
                    p.normal_(0, 0.02)
    freeze_all_but_adapters(model, keep=("head",))
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (args.batch,), device="cuda")

    reference = [(b.my_module_1, b.my_module_2) for b in blocks_of(model)]
    fused = [tuple(mk.convert(copy.deepcopy(m))[0] for m in pair) for pair in reference]
    zero = [tuple(ZeroCostAdapter(m.gamma.shape[0]).cuda() for m in pair) for pair in reference]

    backends = [b for b in args.backends.split(",") if unavailable(b, x.device) is None]

    def set_backend(name):
        for pair in fused:
            for m in pair:
                m.backend = name
    if not args.no_check:
        check(model, x, y, reference, fused, backends, set_backend)

    rows = []
    variants = [("reference", reference, None)] + [(f"fused[{b}]", fused, b) for b in backends]
    variants.append(("zero-cost", zero, None))

    def use(adapters, b):
        if b is not None:
            set_backend(b)
        install(model, adapters)

    opts, eager = {}, {label: [] for label, _, _ in variants}
    for _ in range(args.rounds):
        for label, adapters, b in variants:
            use(adapters, b)
            if label not in opts:  # the head and this variant's adapters
                opts[label] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            eager[label].append(time_steps(step_fn(model, x, y, opts[label]), args.steps))
    for label, adapters, b in variants:
        ms = sorted(t for t, _ in eager[label])
        ratios = sorted(t / z for (t, _), (z, _) in zip(eager[label], eager["zero-cost"]))
        rows.append((label, "eager", ms[len(ms) // 2], max(gb for _, gb in eager[label]),
                     (ratios[len(ratios) // 2], ratios[0], ratios[-1])))
        if args.graph:
            use(adapters, b)
            ms, gb = time_steps(graphed_step(model, x, y, [p for p in model.parameters() if p.requires_grad]),
                                args.steps)
            rows.append((label, "CUDA graph", ms, gb, None))
    title = (f"Swin-B training step, B={args.batch}, 224x224, bf16 autocast, frozen backbone, "
             f"{torch.cuda.get_device_name()}; eager: median of {args.rounds} rounds of {args.steps} steps")
    print_table(rows, title)
    if args.compile is not None:  # last and printed apart: compiling four Swin-Bs can take longer than the rest
        compiled_rows = []
        for mode in args.compile_modes:
            for label, adapters, b in variants:
                if args.compile and label not in args.compile:
                    continue
                use(adapters, b)
                torch._dynamo.reset()
                compiled = torch.compile(model, mode=None if mode == "default" else mode)
                ms, gb = time_steps(step_fn(compiled, x, y, opts[label]), args.steps)
                compiled_rows.append((label, f"compiled ({mode})", ms, gb, None))
                print(f"{label} compiled ({mode}): {ms:.1f} ms a step", flush=True)
        print_table(compiled_rows, title + ", torch.compile")


def print_table(rows, title):
    """A markdown table of ``(label, mode, ms, peak GB, eager spread)`` rows, each against the zero-cost
    row of its mode (NaN where that row was not timed)."""
    zero_ms = {mode: ms for label, mode, ms, _, _ in rows if label == "zero-cost"}
    print(f"\n{title}")
    print("| adapter | mode | step ms | vs zero-cost | rounds' range | peak GB |\n|---|---|---|---|---|---|")
    for label, mode, ms, gb, spread in rows:
        ratio = spread[0] if spread else ms / zero_ms.get(mode, float("nan"))
        span = f"{spread[1]:.2f}-{spread[2]:.2f}x" if spread else "-"
        print(f"| {label} | {mode} | {ms:.1f} | {ratio:.2f}x | {span} | {gb:.2f} |", flush=True)


if __name__ == "__main__":
    main()
