"""Same-run A/B of the eager graph caches against the direct path, per backend and shape: eager module
forward and forward+backward in bf16, the cache on (8 entries) and off timed in turn over several
rounds, and the peak memory of three forward+backward calls from an empty cache.

    python benchmarks/ab_graphs.py [B,H,W,C ...]      (default: the SPEC §2 shapes)

A ratio below 1 means the direct path is faster. Run 77 found none on the lent H200 (fwd+bwd
1.7-2.5x slower direct at every SPEC shape, even where the GPU's work is largest), so the caches
take every size.
"""
import statistics
import sys

import torch

import mona_kernels as mk
from mona_kernels.benchmark import SPEC_SHAPES, _peak_mb, _time_ms
from mona_kernels.ops import cuda_ext, graphs

ROUNDS = 3
REPS = 200  # ms of timing per measurement


def _cache(backend):
    return cuda_ext.graph_cache if backend == "cuda" else graphs.graph_cache


def main():
    shapes = [tuple(int(v) for v in s.split(",")) for s in sys.argv[1:]] or SPEC_SHAPES
    device = torch.device("cuda")
    print("| shape | backend | fwd cached / direct ms | ratio | fwd+bwd cached / direct ms | ratio (rounds) "
          "| peak MB cached / direct |")
    print("|---|---|---|---|---|---|---|")
    for B, H, W, C in shapes:
        for backend in ("cuda", "triton"):
            cache = _cache(backend)
            previous = cache()
            torch.manual_seed(0)
            m = mk.Mona(C, backend=backend).to(device).bfloat16().train()
            params = list(m.parameters())
            xs = [torch.randn(B, H * W, C, device=device, dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3)]
            gs = [torch.randn_like(x) for x in xs]
            state = {"i": 0}

            def fwd():
                state["i"] = (state["i"] + 1) % 3
                with torch.no_grad():
                    return m(xs[state["i"]], (H, W))

            def step():  # gradients returned, not accumulated into .grad (no extra adds)
                i = state["i"] = (state["i"] + 1) % 3
                return torch.autograd.grad(m(xs[i], (H, W)), [xs[i], *params], gs[i])

            times = {}
            for _ in range(ROUNDS):
                for name, capacity in (("cached", previous or 8), ("direct", 0)):
                    cache(0)
                    cache(capacity)
                    times.setdefault(("fwd", name), []).append(_time_ms(fwd, device, REPS))
                    times.setdefault(("both", name), []).append(_time_ms(step, device, REPS))
            def three_calls():
                for _ in range(3):
                    step()  # each call's gradients are dropped before the next

            peaks = {}
            for name, capacity in (("cached", previous or 8), ("direct", 0)):
                cache(0)
                cache(capacity)
                peaks[name] = _peak_mb(three_calls, device)
            cache(0)
            cache(previous)
            med = {k: statistics.median(v) for k, v in times.items()}
            ratios = [d / c for c, d in zip(times[("both", "cached")], times[("both", "direct")])]
            print(f"| {B}x{H}x{W}x{C} | {backend} | {med[('fwd', 'cached')]:.3f} / {med[('fwd', 'direct')]:.3f} "
                  f"| {med[('fwd', 'direct')] / med[('fwd', 'cached')]:.3f} "
                  f"| {med[('both', 'cached')]:.3f} / {med[('both', 'direct')]:.3f} "
                  f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
                  f"| {peaks['cached']:.0f} / {peaks['direct']:.0f} |", flush=True)
            del m, params, xs, gs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
