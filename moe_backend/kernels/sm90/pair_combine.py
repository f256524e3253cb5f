"""Router-weighted combine of per-pair expert outputs, in slot order (deterministic, no atomics).

``out[t] = sum_j w[t, j] * rows[row_of_pair[t * k + j]]`` summed in fp32 in slot order ``j``,
rounded to bf16 once; pairs with row -1 (no local expert) contribute nothing, so a token without
a local expert gets 0.
"""

import torch
import triton
import triton.language as tl

from .fp8_tile import to_bf16

BLOCK = 1024


@triton.jit
def _weighted_sum_kernel(
    rows_ptr, row_of_pair_ptr, weight_ptr, out_ptr, H, top_k, stride_rm, stride_om, BLOCK: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(top_k):
        row = tl.load(row_of_pair_ptr + t * top_k + j).to(tl.int64)
        w = tl.load(weight_ptr + t * top_k + j)
        y = tl.load(rows_ptr + row * stride_rm + cols, mask=mask & (row >= 0), other=0.0).to(tl.float32)
        acc += w * y
    tl.store(out_ptr + t * stride_om + cols, to_bf16(acc), mask=mask)


def weighted_sum_pairs(
    rows: torch.Tensor, row_of_pair: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``rows [P, H]`` bf16 (row stride free, unit column stride), ``row_of_pair [T * k]`` int32,
    ``topk_weights [T, k]`` fp32 contiguous, ``out [T, H]`` bf16 (unit column stride); T > 0.
    Returns ``out``."""
    t, h = out.shape
    assert rows.stride(1) == 1 and out.stride(1) == 1 and topk_weights.is_contiguous()
    grid = (t, triton.cdiv(h, BLOCK))
    _weighted_sum_kernel[grid](
        rows,
        row_of_pair,
        topk_weights,
        out,
        h,
        topk_weights.shape[1],
        rows.stride(0),
        out.stride(0),
        BLOCK=BLOCK,
        num_warps=4,
    )
    return out
