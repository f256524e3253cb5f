"""GEMM1 of the NVFP4 (W4A16) fused experts: gate/up projection with SiLU-and-mul fused.

For each tile of ``BLOCK_M`` aligned rows (one local expert ``e``) and each
``BLOCK_N`` intermediate columns ``n``, one program dequantizes the gate rows
``w13[e, n]`` and up rows ``w13[e, I + n]`` tile by tile in registers
(:func:`nvfp4_tile.dequant_words`), multiplies them with the bf16 hidden states on
the tensor cores into two fp32 accumulators over ``H``, applies the gate's and
up's global scales, and writes ``y = silu(gate) * up`` rounded to bf16 for those
columns at the aligned rows (``y [P, I]``, so GEMM2 reads it contiguously).

The programs also zero the fp32 GEMM2 workspace (a grid-stride share each,
before any early exit), as the FP8 GEMM1 does: GEMM2 accumulates into it with
atomics after this kernel on the stream.
"""

import os

import torch
import triton
import triton.language as tl

from ...runtime import workspace
from .align import AlignedRouting
from .nvfp4_tile import WEIGHT_SHIFT, dequant_words, mma
from .tiles import aligned_rows, tile_coords, zero_fill

ZERO_BLOCK = 1024


@triton.jit
def _gemm1_kernel(
    x_ptr, w_ptr, ws_ptr, wg_ptr, y_ptr,
    sorted_ptr, tile_expert_ptr, num_padded_ptr, topk_w_ptr,
    zero_ptr, zero_numel, num_pairs, H, I, top_k, max_tiles,
    stride_xm, stride_we, stride_wn, stride_wse, stride_wsn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, INTERPRET: tl.constexpr,
    EVEN_K: tl.constexpr, ZERO_BLOCK: tl.constexpr,
):
    zero_fill(zero_ptr, zero_numel, ZERO_BLOCK)
    pid_m, pid_n = tile_coords(tl.program_id(0), max_tiles, tl.cdiv(I, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows, pair, row_ok, expert, offs_n, n_ok = aligned_rows(pid_m, pid_n, sorted_ptr, tile_expert_ptr,
                                                            num_pairs, I, BLOCK_M, BLOCK_N)
    token = (pair // top_k).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)    # code words
    offs_s = tl.arange(0, BLOCK_K // 16)   # block scales

    x_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    wg_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_w[None, :]
    wu_ptrs = wg_ptrs + I * stride_wn
    sg_ptrs = ws_ptr + expert * stride_wse + offs_n[:, None] * stride_wsn + offs_s[None, :]
    su_ptrs = sg_ptrs + I * stride_wsn

    if SWAP_AB:
        acc_g = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros_like(acc_g)
    for kb in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            x_mask = row_ok[:, None]
            w_mask = n_ok[:, None]
            s_mask = n_ok[:, None]
        else:
            x_mask = row_ok[:, None] & (kb * BLOCK_K + offs_k < H)[None, :]
            w_mask = n_ok[:, None] & (kb * (BLOCK_K // 8) + offs_w < H // 8)[None, :]
            s_mask = n_ok[:, None] & (kb * (BLOCK_K // 16) + offs_s < H // 16)[None, :]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        wg = dequant_words(tl.load(wg_ptrs, mask=w_mask, other=0),
                           tl.load(sg_ptrs, mask=s_mask, other=0.0).to(tl.float32), INTERPRET)
        wu = dequant_words(tl.load(wu_ptrs, mask=w_mask, other=0),
                           tl.load(su_ptrs, mask=s_mask, other=0.0).to(tl.float32), INTERPRET)
        acc_g = mma(x, wg, acc_g, SWAP_AB, INTERPRET)
        acc_u = mma(x, wu, acc_u, SWAP_AB, INTERPRET)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K // 8
        wu_ptrs += BLOCK_K // 8
        sg_ptrs += BLOCK_K // 16
        su_ptrs += BLOCK_K // 16

    if SWAP_AB:
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    gate = acc_g * (tl.load(wg_ptr + expert * 2) * (2.0 ** WEIGHT_SHIFT))
    up = acc_u * (tl.load(wg_ptr + expert * 2 + 1) * (2.0 ** WEIGHT_SHIFT))
    if WEIGHT_ON_INPUT:
        # (w * x) @ W.T == w * (x @ W.T): scaling the fp32 sums avoids rounding w * x to bf16.
        router_w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
        gate = gate * router_w
        up = up * router_w
    y = gate * tl.sigmoid(gate) * up
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    # Explicit round-to-nearest-even (the GPU default; Triton's interpreter truncates otherwise).
    tl.store(y_ptrs, y.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=n_ok[None, :])


def gemm1_nvfp4(
    hidden: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w13_scale_2: torch.Tensor,
    routing: AlignedRouting, topk_weights: torch.Tensor, zero: torch.Tensor, *,
    num_pairs: int, top_k: int, weight_on_input: bool,
    BLOCK_N: int, BLOCK_K: int, GROUP_M: int, SWAP_AB: bool, num_warps: int, num_stages: int,
) -> torch.Tensor:
    """Launch GEMM1 + SiLU-and-mul over the aligned rows.

    Args:
        hidden: ``[T, H]`` bf16, unit column stride.
        w13, w13_scale, w13_scale_2: kernel layout (``NVFP4KernelWeights``):
            ``[E, 2I, H/8]`` int32, ``[E, 2I, H/16]`` e4m3, ``[E, 2]`` fp32, contiguous.
        routing: aligned rows; topk_weights ``[T, k]`` fp32 contiguous (read with ``weight_on_input``).
        zero: contiguous fp32 buffer this kernel zeroes (the GEMM2 workspace).
        BLOCK_K: a multiple of 16.

    Returns:
        ``y [P, I]`` bf16 with ``P = max_tiles * BLOCK_M``; rows of padding are garbage.
    """
    e, two_i, h_words = w13.shape
    inter, h = two_i // 2, h_words * 8
    assert BLOCK_K % 16 == 0 and hidden.stride(1) == 1
    y = workspace(routing.max_tiles * routing.block_m, inter, torch.bfloat16, hidden.device, "moe_intermediate")
    grid = (routing.max_tiles * triton.cdiv(inter, BLOCK_N),)
    _gemm1_kernel[grid](
        hidden, w13, w13_scale, w13_scale_2, y,
        routing.sorted_ids, routing.tile_expert, routing.num_padded, topk_weights,
        zero, zero.numel(), num_pairs, h, inter, top_k, routing.max_tiles,
        hidden.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), w13_scale.stride(1), y.stride(0),
        BLOCK_M=routing.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, SWAP_AB=SWAP_AB,
        WEIGHT_ON_INPUT=weight_on_input, INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
        EVEN_K=h % BLOCK_K == 0,
        ZERO_BLOCK=ZERO_BLOCK, num_warps=num_warps, num_stages=num_stages,
    )
    return y
