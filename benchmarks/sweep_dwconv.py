"""Raw launches of the merged 7x7 depthwise conv and its kernel gradient (GPU time only): the
Triton kernels, the CUDA extension's, and cuDNN's single 7x7 depthwise conv on the same tensor; then
the Triton kernels' tile sizes, and the Triton LN-scaling backward's programs per SM with the
adapter's gradient epilogue that sums their partials.

    python benchmarks/sweep_dwconv.py
"""
import torch
import triton.testing

from mona_kernels.backend import _can_run
from mona_kernels.ops import cuda_ext
from mona_kernels.ops import ln_scale
import sys

from mona_kernels.ops.mona_adapter import _gelu_bwd_triton, _grad_epilogue, _tail_rows_triton, _tail_triton
from mona_kernels.ops.multiscale_dwconv import _conv_rows_triton, _conv_triton, _wgrad_triton

SHAPES = [(2, 200, 336, 64), (32, 56, 56, 64), (32, 28, 28, 64), (32, 14, 14, 64)]
CONV_TILES = [(16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 4), (128, 8)]
# (M, C) of the LN-scaling backward at SPEC §2 shapes and Swin-B stage 2
LN_SHAPES = [(134400, 128), (100352, 128), (25088, 256), (6272, 512), (4096, 768)]
LN_PER_SM = [1, 2, 4, 8]
WGRAD_TILES = [(8, 4), (16, 4), (16, 8), (32, 8), (32, 16)]
TAIL_TILES = [(32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]
# Row-blocked tiles (output rows, columns, warps) of the conv and the tail
ROW_CONV_TILES = [(1, 16, 2), (2, 16, 2), (2, 16, 4), (4, 16, 4), (4, 16, 8), (2, 32, 4), (4, 32, 8)]
ROW_TAIL_TILES = [(2, 16, 2), (2, 16, 4), (4, 16, 4), (4, 16, 8), (2, 32, 4), (4, 32, 8)]
# GELU backward (with the projector's input gradient): programs per SM, rows per step, warps
GELU_BWD_TILES = [(4, 64, 4), (8, 64, 4), (16, 64, 4), (4, 128, 8), (8, 32, 4), (16, 32, 4), (32, 32, 2)]


def us(fn):
    """Median microseconds of ``fn`` replayed from a CUDA graph: GPU time alone. Timed eagerly, the
    small maps measure this host's launch cost instead (run 53: 88-99 us for an LN backward and
    epilogue that take 21-46 us of GPU time at 6272x512)."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


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
        h = torch.randn(B, H, W, d, device="cuda", dtype=torch.bfloat16)
        g = torch.randn_like(h)
        K = torch.randn(49, d, device="cuda")
        bias = torch.randn(d, device="cuda")
        conv = torch.nn.Conv2d(d, d, 7, padding=3, groups=d).cuda().bfloat16().to(memory_format=torch.channels_last)
        hc, gc = h.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
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
    ln_sweep()


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


def row_sweep():
    """The row-blocked conv and tail against the shipped one-row tiles, and the GELU backward's
    programs per SM and rows per step."""
    torch.manual_seed(0)
    conv_rows, tail_rows, gelu_rows = [], [], []
    for B, H, W, d in SHAPES:
        shape = f"{B}x{H}x{W}x{d}"
        h = torch.randn(B, H, W, d, device="cuda", dtype=torch.bfloat16)
        g = torch.randn_like(h)
        K = torch.randn(49, d, device="cuda")
        bias = torch.randn(d, device="cuda")
        ref = _conv_triton(g, K, None, flip=True)
        times = [us(lambda: _conv_triton(g, K, None, flip=True))]
        for r, tw, w in ROW_CONV_TILES:
            out = _conv_rows_triton(g, K, None, r, tw, w, flip=True)
            err = (out.float() - ref.float()).abs().max().item()
            assert err < 0.1, (shape, r, tw, w, err)
            times.append(us(lambda: _conv_rows_triton(g, K, None, r, tw, w, flip=True)))
        conv_rows.append((shape, times))
        print("conv", shape, [f"{t:.1f}" for t in times], flush=True)
        wp, bp, seed = torch.randn(d, d, device="cuda") / 8, torch.randn(d, device="cuda"), torch.tensor([1])
        h1 = h.view(-1, d)
        times = []
        for store in (False, True):
            ref = _tail_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, store)
            times.append(us(lambda: _tail_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, store)))
            for r, tw, w in ROW_TAIL_TILES:
                out = _tail_rows_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, store, r, tw, w)
                err = max((o.float() - q.float()).abs().max().item() for o, q in zip(out, ref))
                assert err < 0.1, (shape, store, r, tw, w, err)
                times.append(us(lambda: _tail_rows_triton(h1, (B, H, W), K, bias, wp, bp, seed, 0.0, store,
                                                          r, tw, w)))
        tail_rows.append((shape, times))
        print("tail", shape, [f"{t:.1f}" for t in times], flush=True)
        h3, da, seed = h1.clone(), g.view(-1, d), seed.cuda()
        gelu_rows.append((shape, [us(lambda: _gelu_bwd_triton(da, h3, seed, 0.1, wp, False, s, r, w))
                                  for s, r, w in GELU_BWD_TILES]))
        print("gelu", shape, [f"{t:.1f}" for t in gelu_rows[-1][1]], flush=True)
    print("\nTriton conv, flipped, no bias: shipped one-row tiles against row-blocked tiles "
          "(rows x columns / warps), us")
    print("| shape | shipped | " + " | ".join(f"{r}x{tw}/{w}" for r, tw, w in ROW_CONV_TILES)
          + " |")
    print("|---|---|" + "---|" * len(ROW_CONV_TILES))
    for shape, times in conv_rows:
        print(f"| {shape} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("\nTriton fused tail, forward (a' only) then backward (h2, h3 too): shipped 32 px / 4 warps against "
          "row-blocked tiles, us")
    cols = [f"{r}x{tw}/{w}" for r, tw, w in ROW_TAIL_TILES]
    print("| shape | " + " | ".join(f"{k} {c}" for k in ("fwd", "bwd") for c in ["shipped"] + cols) + " |")
    print("|---|" + "---|" * (2 * len(cols) + 2))
    for shape, times in tail_rows:
        print(f"| {shape} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("\nTriton GELU backward with the projector (dropout 0.1, partials) by programs per SM / rows per step / "
          "warps, us")
    print("| shape | " + " | ".join(f"{s}/{r}/{w}" for s, r, w in GELU_BWD_TILES) + " |")
    print("|---|" + "---|" * len(GELU_BWD_TILES))
    for shape, times in gelu_rows:
        print(f"| {shape} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    if "--rows" in sys.argv[1:]:
        row_sweep()
    else:
        main()
