"""Same-run A/B of the CUDA extension's conv and wgrad variants inside the adapter: fused[cuda]
forward+backward (bf16, dropout 0) captured in a CUDA graph once per (conv, wgrad) setting and
replayed in turn over several rounds (GPU time), with each setting's gradients checked against the
first setting's.

    python benchmarks/ab_conv.py [B,H,W,C ...]      (default: SPEC §2 shapes)
"""
import statistics
import sys

import torch
import triton.testing

import mona_kernels as mk
from mona_kernels.benchmark import SPEC_SHAPES, capture_graph
from mona_kernels.ops import cuda_ext

# (conv variant, wgrad variant; -2: chosen by the map size, the default); the first is the baseline
SETTINGS = [(0, 0), (-2, -2), (4, -2), (7, -2)]
ROUNDS = 5


def main():
    shapes = [tuple(int(v) for v in s.split(",")) for s in sys.argv[1:]] or SPEC_SHAPES
    cache = cuda_ext.graph_cache(0)  # the direct path, captured here as a whole
    before = cuda_ext.dwconv7_defaults()
    names = [f"c{c}/w{w}" for c, w in SETTINGS]
    print("| shape | " + " | ".join(f"{n} ms" for n in names) + " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:])
          + " | worst grad diff |")
    print("|---|" + "---|" * (2 * len(names)) + "")
    try:
        for B, H, W, C in shapes:
            torch.manual_seed(0)
            m = mk.Mona(C, dropout=0.0, backend="cuda").cuda().bfloat16().train()
            x = torch.randn(B, H * W, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn_like(x)
            inputs = [x, *m.parameters()]
            graphs, results = {}, {}
            for s in SETTINGS:
                cuda_ext.dwconv7_defaults(*s)
                graphs[s], results[s] = capture_graph(lambda: torch.autograd.grad(m(x, (H, W)), inputs, g))
                graphs[s].replay()
                torch.cuda.synchronize()
                results[s] = [t.float().clone() for t in results[s]]
            base = results[SETTINGS[0]]
            worst = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
                        for s in SETTINGS[1:] for a, b in zip(results[s], base))
            times = {s: [] for s in SETTINGS}
            for _ in range(ROUNDS):
                for s in SETTINGS:
                    times[s].append(triton.testing.do_bench(graphs[s].replay, return_mode="median"))
            med = {s: statistics.median(t) for s, t in times.items()}
            ratios = [statistics.median([b / a for a, b in zip(times[SETTINGS[0]], times[s])]) for s in SETTINGS[1:]]
            print(f"| {B}x{H}x{W}x{C} | " + " | ".join(f"{med[s]:.3f}" for s in SETTINGS) + " | "
                  + " | ".join(f"{r:.3f}" for r in ratios) + f" | {worst:.1e} |", flush=True)
            del graphs, results
    finally:
        cuda_ext.dwconv7_defaults(*before)
        cuda_ext.graph_cache(cache)


if __name__ == "__main__":
    main()
