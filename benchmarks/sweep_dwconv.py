"""Raw launches of the merged 7x7 depthwise conv and its kernel gradient (GPU time only): the
Triton kernels, the CUDA extension's, and cuDNN's single 7x7 depthwise conv on the same tensor; then
the Triton kernels' tile sizes (section ``kernels``); the Triton LN-scaling backward's programs per
SM with the adapter's gradient epilogue that sums their partials (``ln``); the GELU backward's
programs, rows and warps (``gelu``); the graph caches' staging copies (``copies``); the CUDA
extension's conv and wgrad variants, graph-replayed and with L2 flushed (``cuda``); the forward's
fused tail with the up projection and residual by tile, warps and output block, against the tail, a
matmul and an add (``tailup``); the backward's fused tail (recompute, g W2, GELU and projector
backward) by tile, warps, channels a step and programs per SM, against its composite (``tailbwd``).

    python benchmarks/sweep_dwconv.py [cuda] [kernels] [ln] [gelu] [copies] [tailup] [tailbwd]   (default: all)
"""
import sys

import torch
import triton.testing

from mona_kernels.backend import _can_run
from mona_kernels.ops import cuda_ext
from mona_kernels.ops import ln_scale
from mona_kernels.ops.mona_adapter import _gelu_bwd_triton, _grad_epilogue, _tail_triton, up_block_n
from mona_kernels.ops.multiscale_dwconv import _conv_triton, _wgrad_triton

SHAPES = [(2, 200, 336, 64), (32, 56, 56, 64), (32, 28, 28, 64), (32, 14, 14, 64)]
CONV_TILES = [(16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 4), (128, 8)]
# (M, C) of the LN-scaling backward at SPEC §2 shapes and Swin-B stage 2
LN_SHAPES = [(134400, 128), (100352, 128), (25088, 256), (6272, 512), (4096, 768)]
LN_PER_SM = [1, 2, 4, 8]
WGRAD_TILES = [(8, 4), (16, 4), (16, 8), (32, 8), (32, 16)]
TAIL_TILES = [(32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]
# GELU backward (with the projector's input gradient): programs per SM, rows per step, warps
GELU_BWD_TILES = [(4, 64, 4), (8, 32, 4), (2, 64, 4), (4, 128, 8), (16, 16, 2)]


def us(fn):
    """Median microseconds of ``fn`` replayed from a CUDA graph: GPU time alone. Timed eagerly, the
    small maps measure this host's launch cost instead (run 53: 88-99 us for an LN backward and
    epilogue that take 21-46 us of GPU time at 6272x512)."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def us_cold(fn):
    """Median microseconds of ``fn`` with L2 flushed before each call (``triton.testing.do_bench``),
    as a memory-bound kernel meets its inputs inside the adapter. Graph replays of ``us`` keep inputs
    of up to ~50 MB in L2: run 59 timed the GELU backward at 62 us that way, 135 us in the adapter
    (flushed, run 60 still timed 66 us: L2 is not the whole difference)."""
    return triton.testing.do_bench(fn, return_mode="median") * 1e3


def conv_case(B, H, W, d):
    """Random bf16 input h and gradient g (B, H, W, d), merged kernel K and bias, and cuDNN's 7x7
    depthwise conv in channels-last bf16 with h and g as its NCHW views."""
    h = torch.randn(B, H, W, d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(h)
    K = torch.randn(49, d, device="cuda")
    bias = torch.randn(d, device="cuda")
    conv = torch.nn.Conv2d(d, d, 7, padding=3, groups=d).cuda().bfloat16().to(memory_format=torch.channels_last)
    return h, g, K, bias, conv, h.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)


def main():
    torch.manual_seed(0)
    has_cuda_ext = _can_run("cuda", torch.device("cuda")) is None
    # CUDA variants: conv 0 (4 rows a thread, 3 blocks an SM; the default), 1 (8 rows, 2), 2 (4 rows, 4), 3 (6 rows, 2);
    # wgrad 0 (4 channels a thread), 1 (2 channels)
    print("| shape | floor fwd us | cuDNN 7x7 fwd | cuDNN wgrad | triton conv | triton wgrad | cuda conv v0 | v1 | v2 | v3 "
          "| cuda conv flip | cuda wgrad v0 | v1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    tiles, tails, convs = [], [], []
    for B, H, W, d in SHAPES:
        h, g, K, bias, conv, hc, gc = conv_case(B, H, W, d)
        floor = 2 * h.numel() * 2 / 4.25e12 * 1e6
        row = [f"{B}x{H}x{W}x{d}", f"{floor:.1f}", us(lambda: conv(hc)),
               us(lambda: torch.nn.grad.conv2d_weight(hc, conv.weight.shape, gc, padding=3, groups=d)),
               us(lambda: _conv_triton(h, K, bias)), us(lambda: _wgrad_triton(h, g))]
        if has_cuda_ext:
            row += [us(lambda: cuda_ext.dwconv7_fwd(h, K, bias, False, v)) for v in range(4)]
            row += [us(lambda: cuda_ext.dwconv7_fwd(g, K, None, True))]
            row += [us(lambda: cuda_ext.dwconv7_wgrad(h, g, v)) for v in range(2)]
        print("| " + " | ".join(v if isinstance(v, str) else f"{v:.1f}" for v in row) + " |")
        tiles.append((f"{B}x{H}x{W}x{d}", [us(lambda: _wgrad_triton(h, g, p, w, reduce=False))
                                           for p, w in WGRAD_TILES]))
        convs.append((f"{B}x{H}x{W}x{d}", [us(lambda: _conv_triton(g, K, None, p, w, flip=True))
                                           for p, w in CONV_TILES]))
        wp, bp, seed = torch.randn(d, d, device="cuda") / 8, torch.randn(d, device="cuda"), torch.tensor([1])
        h1 = h.view(-1, d)
        tails.append((f"{B}x{H}x{W}x{d}", [us(lambda: _tail_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, store,
                                                                   t, w))
                                           for store in (False, True) for t, w in TAIL_TILES]))
    print("\nTriton conv, flipped, no bias (the input gradient) by pixel tile and warps, us")
    print("| shape | " + " | ".join(f"{p} px / {w} warps" for p, w in CONV_TILES) + " |")
    print("|---|" + "---|" * len(CONV_TILES))
    for shape, times in convs:
        print(f"| {shape} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("\nTriton wgrad (partials only: the adapter's epilogue sums them) by pixel tile and warps, us")
    print("| shape | " + " | ".join(f"{p} px / {w} warps" for p, w in WGRAD_TILES) + " |")
    print("|---|" + "---|" * len(WGRAD_TILES))
    for shape, times in tiles:
        print(f"| {shape} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("\nTriton fused tail (conv, projector, GELU; forward writes a' only, backward also h2 and h3) by "
          "pixel tile and warps, us")
    print("| shape | " + " | ".join(f"{kind} {t} px / {w} warps" for kind in ("fwd", "bwd") for t, w in TAIL_TILES)
          + " |")
    print("|---|" + "---|" * (2 * len(TAIL_TILES)))
    for shape, times in tails:
        print(f"| {shape} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


# (B, H, W, C) of Swin-B's four stages at batch 32 (d = 64); (pixel tile, warps, output block)
UP_SHAPES = [(32, 56, 56, 128), (32, 28, 28, 256), (32, 14, 14, 512), (32, 7, 7, 1024)]
UP_TILES = [(32, 4, 32), (32, 4, 64), (32, 4, 128), (32, 8, 64), (32, 8, 128), (64, 4, 64), (64, 8, 128)]
UP_STAGES = [1, 2, 3, 4]


def _up_case(B, H, W, C, d):
    """Random inputs of the forward's tail at one shape: h1 (bf16), the merged kernel and bias, the
    projector and the up projection (bf16)."""
    M = B * H * W
    h1 = torch.randn(M, d, device="cuda", dtype=torch.bfloat16)
    K, bias = torch.randn(49, d, device="cuda") / 7, torch.randn(d, device="cuda")
    wp, bp = (torch.randn(d, d, device="cuda") / 8).bfloat16(), torch.randn(d, device="cuda").bfloat16()
    w2, b2 = (torch.randn(C, d, device="cuda") / 8).bfloat16(), torch.randn(C, device="cuda").bfloat16()
    return h1, K, bias, wp, bp, w2, b2


def tailup_sweep():
    """The forward after the down projection: the fused tail writing out = x + a' W2^T + b2, by pixel
    tile, warps and output channels a step, against the tail writing a' followed by cuBLAS's
    projection and PyTorch's add. x in fp32 (autocast, as Swin-B trains) and bf16; h1 in bf16."""
    import torch.nn.functional as F
    print("\nForward tail + up projection + residual, graph-replayed us (d = 64, h1 bf16)")
    print("| shape | x | tail, mm, add | " + " | ".join(f"{t} px / {w} warps / {n} ch" for t, w, n in UP_TILES)
          + " |")
    print("|---|---|---|" + "---|" * len(UP_TILES))
    d = 64
    seed = torch.tensor([1])
    for B, H, W, C in UP_SHAPES:
        h1, K, bias, wp, bp, w2, b2 = _up_case(B, H, W, C, d)
        for xdt in (torch.float32, torch.bfloat16):
            x = torch.randn(B * H * W, C, device="cuda", dtype=xdt)

            def composite():
                _, _, a = _tail_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, False)
                return x + F.linear(a, w2, b2)
            row = [us(composite)]
            row += [us(lambda: _tail_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, False, t, w, up=(x, w2, b2),
                                            block_n=n)) for t, w, n in UP_TILES]
            name = "fp32" if xdt == torch.float32 else "bf16"
            print(f"| {B}x{H}x{W}x{C} | {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |", flush=True)
    print("\nThe same, the adapter's tile, warps and output block, by software-pipelining stages, us")
    print("| shape | x | " + " | ".join(f"{n} stages" for n in UP_STAGES) + " |")
    print("|---|---|" + "---|" * len(UP_STAGES))
    for B, H, W, C in UP_SHAPES:
        h1, K, bias, wp, bp, w2, b2 = _up_case(B, H, W, C, d)
        x = torch.randn(B * H * W, C, device="cuda")
        row = [us(lambda: _tail_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, False, up=(x, w2, b2),
                                       block_n=up_block_n(C), num_stages=st)) for st in UP_STAGES]
        print(f"| {B}x{H}x{W}x{C} | fp32 | " + " | ".join(f"{v:.1f}" for v in row) + " |", flush=True)


# The backward's fused tail: pixels per tile, warps, gradient channels a step, programs per SM.
BWD_TILES = [(32, 4, 64, 4), (32, 4, 64, 2), (32, 4, 64, 8), (32, 4, 128, 4), (32, 8, 64, 4), (32, 8, 128, 4),
             (64, 8, 64, 4)]
BWD_SHAPES = [(2, 200, 336, 128), *UP_SHAPES]


def tailbwd_sweep():
    """The backward from the upstream gradient to the projector's input: the fused kernel (recompute,
    da' = g W2, GELU and projector backward) by tile, warps, channels a step and programs per SM,
    against the tail writing h2, h3 and a', cuBLAS's g W2 and the GELU backward. g and W2 in bf16
    (the adapter casts g first under autocast); each setting's dh2 against the composite's."""
    from mona_kernels.ops.mona_adapter import _tail_bwd_triton
    print("\nBackward tail: graph-replayed us (d = 64, bf16); worst |dh2 - composite| / max |composite|")
    print("| shape | composite | " + " | ".join(f"{t} px / {w} warps / {n} ch / {k} per SM" for t, w, n, k in BWD_TILES)
          + " | worst rel. diff |")
    print("|---|---|" + "---|" * len(BWD_TILES) + "---|")
    d = 64
    seed = torch.tensor([1])
    for B, H, W, C in BWD_SHAPES:
        h1, K, bias, wp, bp, w2, _ = _up_case(B, H, W, C, d)
        g = torch.randn(B * H * W, C, device="cuda", dtype=torch.bfloat16)

        def composite():
            h2, h3, a = _tail_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, True)
            return _gelu_bwd_triton(g @ w2, h3, seed, 0.0, wp, reduce=False)[2]
        row = [us(composite)]
        want = composite().float()
        worst = 0.0
        for t, w, n, k in BWD_TILES:
            def fused():
                return _tail_bwd_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, g, w2, reduce=False, tile=t,
                                        num_warps=w, block_n=n, per_sm=k)[3]
            row.append(us(fused))
            worst = max(worst, ((fused().float() - want).abs().max() / want.abs().max()).item())
        print(f"| {B}x{H}x{W}x{C} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {worst:.1e} |", flush=True)


def ln_sweep():
    """The LN-scaling backward (with the residual) and the gradient epilogue that sums its partials,
    by backward programs per SM: more programs fill the GPU, fewer leave less to sum."""
    print("\nTriton LN-scaling backward + gradient epilogue by programs per SM, us")
    print("| M x C | " + " | ".join(f"{s} per SM" for s in LN_PER_SM) + " |")
    print("|---|" + "---|" * len(LN_PER_SM))
    d = 64
    for M, C in LN_SHAPES:
        x, dy, res = (torch.randn(M, C, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        w, b, gamma, gammax = (torch.randn(C, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        _, mean, rstd = ln_scale._fwd_triton(x, w, b, gamma, gammax, 1e-6)
        wg, bp, b1 = (torch.randn(1, 50, d, device="cuda"), torch.randn(1, d, device="cuda"),
                      torch.randn(d, device="cuda"))
        flat = torch.empty(5 * C + 2 * C * d + d * d + 90 * d, device="cuda", dtype=torch.bfloat16)

        def run(per_sm):
            _, part = ln_scale._bwd_triton(dy, x, w, b, gamma, gammax, mean, rstd, res, reduce=False, per_sm=per_sm)
            _grad_epilogue(part, wg, bp, b1, flat, d)
        print(f"| {M}x{C} | " + " | ".join(f"{us(lambda: run(s)):.1f}" for s in LN_PER_SM) + " |")


def gelu_sweep():
    """The GELU backward (with the projector's input gradient, dropout 0.1, partials left unsummed)
    by programs per SM, rows per loop step and warps, L2 flushed before each call (at the small maps
    the times include host launch cost); the first column is the shipped setting."""
    torch.manual_seed(0)
    print("\nTriton GELU backward with the projector (dropout 0.1, partials) by programs per SM / rows per step / "
          "warps, us")
    print("| shape | " + " | ".join(f"{s}/{r}/{w}" for s, r, w in GELU_BWD_TILES) + " |")
    print("|---|" + "---|" * len(GELU_BWD_TILES))
    for B, H, W, d in SHAPES:
        h3, da = (torch.randn(B * H * W, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        wp, seed = torch.randn(d, d, device="cuda") / 8, torch.tensor([1], device="cuda")
        times = [us_cold(lambda: _gelu_bwd_triton(da, h3, seed, 0.1, wp, False, s, r, w))
                 for s, r, w in GELU_BWD_TILES]
        print(f"| {B}x{H}x{W}x{d} | " + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)


def copy_sweep():
    """The graph caches' staging and copy-out at the adapter's sizes: one foreach launch for every
    tensor of a dtype (what ``graphs.Staging`` and ``graphs.CopyOut`` launch) against a plain copy per
    large tensor, GPU and host together (eager, as the caches run them)."""
    print("\nStaging and copy-out, eager, us: foreach over (x, 16 small tensors) / x.copy_ + foreach over the "
          "small / foreach_mul(out, h1) / out.clone + h1.clone")
    print("| M x C | x MB | foreach copy | copy_ + foreach | foreach_mul | clone |")
    print("|---|---|---|---|---|---|")
    for M, C in LN_SHAPES:
        d = 64
        x, out = (torch.randn(M, C, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        h1 = torch.randn(M, d, device="cuda", dtype=torch.bfloat16)
        small = [torch.randn(C, device="cuda", dtype=torch.bfloat16) for _ in range(16)]
        xs, ss = torch.empty_like(x), [torch.empty_like(t) for t in small]

        def foreach():
            torch._foreach_copy_([xs, *ss], [x, *small])

        def split():
            xs.copy_(x)
            torch._foreach_copy_(ss, small)
        times = [triton.testing.do_bench(f, return_mode="median") * 1e3 for f in
                 (foreach, split, lambda: torch._foreach_mul([out, h1], 1.0), lambda: (out.clone(), h1.clone()))]
        print(f"| {M}x{C} | {x.numel() * 2 / 1e6:.1f} | " + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)


# CUDA conv variants: 0 the register rows; 4-6 the shared-memory tiles (rows x columns a block,
# rows x columns a thread): 8x16 / 2x8, 8x16 / 4x4, 8x32 / 2x8 (run 68 also measured 8x16 / 2x16,
# 8x32 / 2x16 and 8x16 / 4x8: slower, since removed); 7-8 are 4 and 6 with 64 registers a thread. wgrad: 0 the sliding window, 2-3 the
# shared-memory tiles 8x16 and 4x32.
CUDA_CONVS = [0, 4, 5, 6, 7, 8]
CUDA_WGRADS = [0, 2, 3]


def cuda_sweep():
    """The CUDA extension's conv (plain and flipped) and wgrad variants against cuDNN and the Triton
    kernels, each timed twice: replayed from a CUDA graph (inputs stay in L2) and with L2 flushed."""
    torch.manual_seed(0)
    if _can_run("cuda", torch.device("cuda")) is not None:
        print("cuda section: the CUDA extension is unavailable")
        return
    cols = (["cuDNN 7x7", "triton conv"] + [f"cuda conv v{v}" for v in CUDA_CONVS] + ["cuda flip v0", "cuda flip v4"]
            + ["triton wgrad"] + [f"cuda wgrad v{v}" for v in CUDA_WGRADS])
    print("\nCUDA conv and wgrad variants, us: graph-replayed / L2 flushed")
    print("| shape | floor fwd | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for B, H, W, d in SHAPES:
        h, g, K, bias, conv, hc, _ = conv_case(B, H, W, d)
        fns = ([lambda: conv(hc), lambda: _conv_triton(h, K, bias)]
               + [lambda v=v: cuda_ext.dwconv7_fwd(h, K, bias, False, v) for v in CUDA_CONVS]
               + [lambda v=v: cuda_ext.dwconv7_fwd(g, K, None, True, v) for v in (0, 4)]
               + [lambda: _wgrad_triton(h, g)] + [lambda v=v: cuda_ext.dwconv7_wgrad(h, g, v) for v in CUDA_WGRADS])
        floor = 2 * h.numel() * 2 / 4.25e12 * 1e6
        cells = [f"{us(f):.1f} / {us_cold(f):.1f}" for f in fns]
        print(f"| {B}x{H}x{W}x{d} | {floor:.1f} | " + " | ".join(cells) + " |", flush=True)


SECTIONS = {"cuda": cuda_sweep, "kernels": main, "ln": ln_sweep, "gelu": gelu_sweep, "copies": copy_sweep,
            "tailup": tailup_sweep, "tailbwd": tailbwd_sweep}

if __name__ == "__main__":
    unknown = [name for name in sys.argv[1:] if name not in SECTIONS]
    if unknown:
        sys.exit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    for name in sys.argv[1:] or SECTIONS:
        SECTIONS[name]()
