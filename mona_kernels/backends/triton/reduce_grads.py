"""B4, the backward's last pass: every partial row summed, in a fixed order, into the sixteen
parameter gradients.

Reads one buffer holding three row-major regions of partial rows (B3's channel rows, B1's projector
rows, B3's tap rows) and writes the gradients flat, in the parameters' order, in the gradient dtype.
Programs walk the partial rows' own columns, so every step's loads are contiguous, and each column's
sum is stored where its gradient lives. The merged kernel's gradient is split here: a tap column's sum
goes to dw7 / 3 and, inside the 5x5 and 3x3 centres, to dw5 / 3 and dw3 / 3; the bias column's to
db3 = db5 = db7.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...ops.utils import cdiv
from .common import Kernel

BLOCK = 128  # partial-row columns a program
ROWS = 16    # partial rows a step (32: 46 against 30 us at 32x56x56x128 on an H100)
WARPS = 4


@triton.jit(do_not_specialize=["C", "rows_channel", "rows_tail", "rows_tap"])
def reduce_grads_kernel(partial_ptr, grads_ptr, C, D, rows_channel, rows_tail, rows_tap,
                        BLOCK: tl.constexpr, ROWS: tl.constexpr):
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # a column of the three regions side by side
    # Offsets of the sixteen gradients in the flat output.
    o_w3 = 4 * C + D * C + D
    o_b3 = o_w3 + 9 * D
    o_w5 = o_b3 + D
    o_b5 = o_w5 + 25 * D
    o_w7 = o_b5 + D
    o_b7 = o_w7 + 49 * D
    o_wp = o_b7 + D
    o_w2 = o_wp + D * D + D
    # Region 0: channel rows [w_ln, b_ln, gamma, gammax, W1, b1 | W2, b2]; 1: projector rows [Wp, bp];
    # 2: tap rows, taps-major (49 taps of D, then the bias).
    len_channel = 4 * C + 2 * D * C + D + C
    len_tail = D * D + D
    region = tl.where(f < len_channel, 0, tl.where(f < len_channel + len_tail, 1, 2))
    col = f - tl.where(region == 0, 0, tl.where(region == 1, len_channel, len_channel + len_tail))
    inside = f < len_channel + len_tail + 50 * D
    base = tl.where(region == 0, 0, tl.where(region == 1, rows_channel * len_channel,
                                             rows_channel * len_channel + rows_tail * len_tail)).to(tl.int64)
    row_len = tl.where(region == 0, len_channel, tl.where(region == 1, len_tail, 50 * D)).to(tl.int64)
    n_rows = tl.where(region == 0, rows_channel, tl.where(region == 1, rows_tail, rows_tap))
    acc = tl.zeros([ROWS, BLOCK], dtype=ACC)
    # up to this block's own rows: a block inside B3's channel or tap rows skips B1's longer list
    for r0 in range(0, tl.max(tl.where(inside, n_rows, 0), axis=0), ROWS):
        r = r0 + tl.arange(0, ROWS)
        mask = (r[:, None] < n_rows[None, :]) & inside[None, :]
        acc += tl.load(partial_ptr + base[None, :] + r.to(tl.int64)[:, None] * row_len[None, :] + col[None, :],
                       mask=mask, other=0.0)
    s = tl.sum(acc, axis=0)
    # where each column's sum lives: one place for the channel and projector columns, up to three
    # (dw7, dw5, dw3 or their biases) for a tap column
    tap = region == 2
    t = col // D
    c = col - t * D
    u = t // 7
    v = t - u * 7
    is_bias = t == 49
    e = tl.where(region == 0, tl.where(col < o_w3, col, col - o_w3 + o_w2),
                 tl.where(region == 1, o_wp + col, tl.where(is_bias, o_b7 + c, o_w7 + c * 49 + t)))
    s = tl.where(tap, s / 3.0, s).to(grads_ptr.dtype.element_ty)
    tl.store(grads_ptr + e, s, mask=inside)
    in5 = tap & (is_bias | ((u >= 1) & (u <= 5) & (v >= 1) & (v <= 5)))
    tl.store(grads_ptr + tl.where(is_bias, o_b5 + c, o_w5 + c * 25 + (u - 1) * 5 + (v - 1)), s, mask=inside & in5)
    in3 = tap & (is_bias | ((u >= 2) & (u <= 4) & (v >= 2) & (v <= 4)))
    tl.store(grads_ptr + tl.where(is_bias, o_b3 + c, o_w3 + c * 9 + (u - 2) * 3 + (v - 2)), s, mask=inside & in3)


_reduce_grads = Kernel(reduce_grads_kernel)


def grads_size(C: int, d: int) -> int:
    """Elements of the sixteen parameter gradients together."""
    return 4 * C + 2 * d * C + d + 9 * d + 25 * d + 49 * d + 3 * d + d * d + d + C


def row_lengths(C: int, d: int) -> tuple[int, int, int]:
    """Lengths of a channel row (B3), a projector row (B1) and a tap row (B3) of partial sums."""
    return 4 * C + 2 * d * C + d + C, d * d + d, 50 * d


def reduce_grads(partial, grads, C: int, d: int, rows_channel: int, rows_tail: int, rows_tap: int):
    _reduce_grads[(cdiv(sum(row_lengths(C, d)), BLOCK),)](
        partial, grads, C, d, rows_channel, rows_tail, rows_tap, BLOCK=BLOCK, ROWS=ROWS, num_warps=WARPS)
