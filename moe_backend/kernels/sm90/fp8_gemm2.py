"""GEMM2 of the FP8 fused experts: down projection with the router-weighted top-k combine fused.

For each tile of ``BLOCK_M`` aligned rows (one local expert ``e``), each
``BLOCK_N`` output columns and each of ``SPLIT_K`` slices of ``I``, one program
computes ``z = y @ w2[e, n].T`` in fp32 and scales the rows by their router
weight (unless it was applied on the input). Two ways to combine the top-k:

* ``ATOMIC`` (default): atomically add ``z`` into the fp32 workspace ``acc [T, H]``
  at the rows' tokens, where the k experts and the K slices meet; ``acc`` must be
  zero beforehand (GEMM1 zeroes it) and :func:`combine.cast_out` rounds it to bf16.
  The summation order is not fixed: the last fp32 bits can differ between runs.
* otherwise: store ``z`` as bf16 at its aligned row of ``acc [P, H]``;
  :func:`combine.sum_pairs` then adds each token's k rows in a fixed order
  (deterministic; each expert's output is rounded to bf16 before the sum, and
  no atomics or zeroing are needed, which pays at large T). ``SPLIT_K`` must be 1.

``VLLM_ORDER`` (0: off): the K blocks scaled in vLLM's order (1: ``(dot * a_scale) *
w_scale``, 2: ``(dot * w_scale) * a_scale``), as the ``vllm_triton`` numerics need; the
rest (router weight in fp32, one bf16 rounding per pair) is what vLLM's kernel does already.

The input ``y`` is e4m3 with per-row per-128 scales (or a static scale) from
GEMM1's epilogue, or fp32 (``QUANT_ON_LOAD``, decode) quantized here with the
same numerics as it is loaded.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ...quant.fp8 import BLOCK as SCALE_BLOCK
from .align import AlignedRouting
from .fp8_tile import quantize_tile, scale_block, to_bf16
from .tiles import aligned_rows, tile_coords


@triton.jit
def _gemm2_kernel(
    y_ptr,
    y_scale_ptr,
    w_ptr,
    w_scale_ptr,
    acc_ptr,
    sorted_ptr,
    tile_expert_ptr,
    num_padded_ptr,
    topk_w_ptr,
    y_static_ptr,
    num_pairs,
    H,
    I,
    top_k,
    max_tiles,
    k_blocks_per_split,
    stride_ym,
    stride_ysm,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_accm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    QUANT_ON_LOAD: tl.constexpr,
    Y_STATIC: tl.constexpr,
    BLOCK_SCALED: tl.constexpr,
    UE8M0: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    VLLM_ORDER: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), max_tiles, tl.cdiv(H, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    kb_start = tl.program_id(1) * k_blocks_per_split
    kb_end = tl.minimum(kb_start + k_blocks_per_split, tl.cdiv(I, BLOCK_K))
    rows, pair, row_ok, expert, offs_n, n_ok = aligned_rows(
        pid_m, pid_n, sorted_ptr, tile_expert_ptr, num_pairs, H, BLOCK_M, BLOCK_N
    )
    offs_k = kb_start * BLOCK_K + tl.arange(0, BLOCK_K)

    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    if BLOCK_SCALED:
        ws_ptr = w_scale_ptr + expert * stride_wse + (pid_n * BLOCK_N // BLOCK_K) * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        if EVEN_K:
            y_mask = rows[:, None] >= 0  # all rows exist (aligned buffer)
            w_mask = n_ok[None, :]
        else:
            k_ok = kb * BLOCK_K + tl.arange(0, BLOCK_K) < I
            y_mask = k_ok[None, :]
            w_mask = n_ok[None, :] & k_ok[:, None]
        if QUANT_ON_LOAD:
            a, a_s = quantize_tile(tl.load(y_ptrs, mask=y_mask, other=0.0), y_static_ptr, Y_STATIC, UE8M0)
        else:
            a = tl.load(y_ptrs, mask=y_mask, other=0.0)
            if Y_STATIC:
                a_s = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(y_static_ptr)
            else:
                a_s = tl.load(y_scale_ptr + rows.to(tl.int64) * stride_ysm + kb)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if BLOCK_SCALED:
            acc += scale_block(tl.dot(a, w), a_s, tl.load(ws_ptr + kb), VLLM_ORDER)
        elif Y_STATIC:
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)  # fp32 promotion: see GEMM1
        else:
            acc += tl.dot(a, w) * a_s[:, None]
        y_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if not BLOCK_SCALED:
        post = tl.load(w_scale_ptr + expert)
        if Y_STATIC:
            post = post * tl.load(y_static_ptr)
        acc = acc * post
    if not WEIGHT_ON_INPUT:
        acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
    if ATOMIC:
        token = (pair // top_k).to(tl.int64)
        out_ptrs = acc_ptr + token[:, None] * stride_accm + offs_n[None, :]
        tl.atomic_add(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :], sem="relaxed")
    else:
        out_ptrs = acc_ptr + rows[:, None].to(tl.int64) * stride_accm + offs_n[None, :]
        tl.store(out_ptrs, to_bf16(acc), mask=n_ok[None, :])


def gemm2_fp8(
    y: torch.Tensor,
    y_scale: Optional[torch.Tensor],
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    routing: AlignedRouting,
    topk_weights: torch.Tensor,
    acc: torch.Tensor,
    *,
    num_pairs: int,
    top_k: int,
    block_scaled: bool,
    quant_on_load: bool,
    a2_static: Optional[torch.Tensor],
    ue8m0: bool,
    weight_on_input: bool,
    atomic: bool,
    vllm_order: int,
    BLOCK_N: int,
    BLOCK_K: int,
    SPLIT_K: int,
    GROUP_M: int,
    num_warps: int,
    num_stages: int,
) -> None:
    """Launch GEMM2 + weighting: ``acc[t] += w[t, j] * (y_row @ w2[e].T)`` (``atomic``),
    else ``acc[row] = bf16(w[t, j] * (y_row @ w2[e].T))``.

    Args:
        y, y_scale: GEMM1's output, ``[P, I]`` e4m3 with ``[P, ceil(I/128)]`` fp32 scales
            (None when static), or ``[P, I]`` fp32 with ``quant_on_load``.
        w2, w2_scale: ``[E, H, I]`` e4m3; ``[E, H/128, I/128]`` (block) or ``[E]`` fp32.
        routing: the aligned rows GEMM1 used; topk_weights ``[T, k]`` fp32 contiguous.
        acc: ``atomic``: ``[T, H]`` fp32 workspace, zeroed; else ``[P, H]`` bf16; unit column stride.
        a2_static: ``[1]`` fp32 static scale of ``y``, or None for dynamic.
        vllm_order: vLLM's scaling order 1 or 2, 0 off (block scales, pre-quantized ``y``, no atomics).
    """
    e, h, inter = w2.shape
    assert a2_static is not None or BLOCK_K == SCALE_BLOCK
    assert not block_scaled or (BLOCK_K == SCALE_BLOCK and SCALE_BLOCK % BLOCK_N == 0)
    assert topk_weights.is_contiguous() and acc.stride(1) == 1 and (atomic or SPLIT_K == 1)
    assert not vllm_order or (block_scaled and not quant_on_load and not atomic)
    k_blocks = triton.cdiv(inter, BLOCK_K)
    per_split = triton.cdiv(k_blocks, SPLIT_K)
    dummy = w2_scale
    ys = y_scale if y_scale is not None else dummy
    grid = (routing.max_tiles * triton.cdiv(h, BLOCK_N), triton.cdiv(k_blocks, per_split))
    _gemm2_kernel[grid](
        y,
        ys,
        w2,
        w2_scale,
        acc,
        routing.sorted_ids,
        routing.tile_expert,
        routing.num_padded,
        topk_weights,
        a2_static if a2_static is not None else dummy,
        num_pairs,
        h,
        inter,
        top_k,
        routing.max_tiles,
        per_split,
        y.stride(0),
        ys.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2_scale.stride(0),
        w2_scale.stride(1) if block_scaled else 0,
        acc.stride(0),
        BLOCK_M=routing.block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        GROUP_M=GROUP_M,
        QUANT_ON_LOAD=quant_on_load,
        Y_STATIC=a2_static is not None,
        BLOCK_SCALED=block_scaled,
        UE8M0=ue8m0,
        WEIGHT_ON_INPUT=weight_on_input,
        EVEN_K=inter % BLOCK_K == 0,
        ATOMIC=atomic,
        VLLM_ORDER=vllm_order,
        num_warps=num_warps,
        num_stages=num_stages,
    )
