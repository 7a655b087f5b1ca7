"""B4, the backward's last pass: every partial row summed, in a fixed order, into the sixteen
parameter gradients.

Reads one buffer holding three row-major regions of partial rows (B3's channel rows, B1's projector
rows, B3's tap rows) and writes the gradients flat, in the parameters' order, in the gradient dtype.
The merged kernel's gradient is split here: dw7 = dK / 3, dw5 = centre5(dK) / 3, dw3 = centre3(dK) / 3,
db3 = db5 = db7 = dbias_K / 3.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...ops.utils import cdiv
from .common import Kernel

BLOCK = 128  # gradient elements a program
ROWS = 16    # partial rows a step (32: 46 against 30 us at 32x56x56x128 on an H100)
WARPS = 4


@triton.jit(do_not_specialize=["C", "rows_channel", "rows_tail", "rows_tap"])
def reduce_grads_kernel(partial_ptr, grads_ptr, C, D, rows_channel, rows_tail, rows_tap,
                        BLOCK: tl.constexpr, ROWS: tl.constexpr):
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    # Offsets of the sixteen gradients in the flat output.
    o_w3 = 4 * C + D * C + D
    o_b3 = o_w3 + 9 * D
    o_w5 = o_b3 + D
    o_b5 = o_w5 + 25 * D
    o_w7 = o_b5 + D
    o_b7 = o_w7 + 49 * D
    o_wp = o_b7 + D
    o_w2 = o_wp + D * D + D
    total = o_w2 + C * D + C
    inside = e < total
    # Region 0: channel rows [w_ln, b_ln, gamma, gammax, W1, b1 | W2, b2]; 1: projector rows; 2: tap rows.
    len_channel = 4 * C + 2 * D * C + D + C
    len_tail = D * D + D
    region = tl.where((e < o_w3) | (e >= o_w2), 0, tl.where(e >= o_wp, 1, 2))
    k = e - tl.where(e >= o_b7, o_b7, tl.where(e >= o_w7, o_w7, tl.where(e >= o_b5, o_b5, tl.where(
        e >= o_w5, o_w5, tl.where(e >= o_b3, o_b3, o_w3)))))
    is_bias = (e >= o_b3) & (e < o_w5) | (e >= o_b5) & (e < o_w7) | (e >= o_b7)
    size = tl.where(e >= o_w7, 49, tl.where(e >= o_w5, 25, 9))  # the conv's taps
    width = tl.where(size == 49, 7, tl.where(size == 25, 5, 3))
    t = k % size
    centre = (7 - width) // 2  # where the conv's taps sit inside the 7x7 grid
    tap_col = tl.where(is_bias, 49 * D + k, ((t // width + centre) * 7 + (t % width + centre)) * D + k // size)
    col = tl.where(region == 0, tl.where(e < o_w3, e, e - o_w2 + o_w3), tl.where(region == 1, e - o_wp, tap_col))
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
    s = tl.where(region == 2, s / 3.0, s)
    tl.store(grads_ptr + e, s.to(grads_ptr.dtype.element_ty), mask=inside)


_reduce_grads = Kernel(reduce_grads_kernel)


def grads_size(C: int, d: int) -> int:
    """Elements of the sixteen parameter gradients together."""
    return 4 * C + 2 * d * C + d + 9 * d + 25 * d + 49 * d + 3 * d + d * d + d + C


def reduce_grads(partial, grads, C: int, d: int, rows_channel: int, rows_tail: int, rows_tap: int):
    _reduce_grads[(cdiv(grads.numel(), BLOCK),)](
        partial, grads, C, d, rows_channel, rows_tail, rows_tap, BLOCK=BLOCK, ROWS=ROWS, num_warps=WARPS)
