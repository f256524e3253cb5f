"""GEMM2 of the NVFP4 (W4A16) fused experts: down projection with the router-weighted top-k combine fused.

Rows come from the aligned tiles or, on the swap-AB decode path, from each expert's leader pair
(``GATHER``, as GEMM1; program ``p * ceil(H / BLOCK_N) + n`` of pair ``p``).
For each tile of ``BLOCK_M`` aligned rows (one local expert ``e``), each
``BLOCK_N`` output columns and each of ``SPLIT_K`` slices of the 256-K groups of
``Ip``, one program dequantizes ``w2[e, n]`` in registers (weights as wgmma's
register operand), computes ``z = y @ w2[e, n].T`` on the tensor cores (bf16 in, fp32
out; ``y``'s columns are already in the groups' dot order), applies the global scale
and the rows' router weights (unless applied on the input) and ATOMICALLY ADDS the
rows into the fp32 workspace ``acc [T, H]`` at their tokens, exactly like the FP8
GEMM2: ``acc`` is zeroed by GEMM1 and cast to bf16 by :func:`combine.cast_out`.
"""

from typing import Union

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..interpret import INTERPRETING
from .align import AlignedRouting, GatheredPairs, row_source_args
from .nvfp4_layout import K_GROUP, weight_geometry
from .nvfp4_tile import WEIGHT_RESCALE, load_group, mma, row_offsets
from .tiles import (
    MAX_GATHER_PAIRS,
    aligned_rows,
    chunk_pairs,
    expert_members,
    gather_scan_width,
    register_cap,
    tile_coords,
)


@triton.jit
def _gemm2_rows(
    y_ptr,
    w_ptr,
    ws_ptr,
    wg_ptr,
    acc_ptr,
    topk_w_ptr,
    rows,
    pair,
    row_ok,
    expert,
    offs_n,
    n_ok,
    kb_start,
    kb_end,
    top_k,
    stride_ym,
    stride_we,
    stride_wb,
    stride_wr,
    stride_wg,
    stride_wse,
    stride_wsb,
    stride_wsr,
    stride_wsg,
    stride_accm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    GATHER: tl.constexpr,
    INTERPRET: tl.constexpr,
    UNROLL: tl.constexpr,
    EVEN_K: tl.constexpr,
    MMA_ISSUE: tl.constexpr,
):
    """One tile: ``y[rows]`` (``BLOCK_M`` rows of ``pair``) over K groups ``[kb_start, kb_end)``
    times ``w2[expert, offs_n]``, router-weighted and added atomically at the pairs' tokens
    (``EVEN_K``: every split's group count is a multiple of ``UNROLL``, so no K masks)."""
    offs_k = tl.arange(0, 256)
    offs_w = tl.arange(0, 16)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + (kb_start * 256 + offs_k)[None, :]
    w_rows = row_offsets(offs_n, stride_wb, stride_wr) + kb_start * stride_wg
    s_rows = row_offsets(offs_n, stride_wsb, stride_wsr) + kb_start * stride_wsg
    w_ptrs = w_ptr + expert * stride_we + w_rows[:, None] + offs_w[None, :]
    s_ptrs = ws_ptr + expert * stride_wse + s_rows[:, None] + offs_w[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # Every split holds a group (the launcher sizes the splits); see GEMM1 on why this matters.
    tl.assume(kb_end > kb_start)
    # UNROLL groups an iteration, as GEMM1's.
    for g0 in range(kb_start, kb_end, UNROLL):
        for u in tl.static_range(UNROLL):
            g = g0 + u
            if EVEN_K:
                in_k = n_ok[:, None]
                if GATHER:
                    y = tl.load(y_ptrs + u * 256, mask=row_ok[:, None], other=0.0)
                else:
                    # Every aligned row of y exists (padding rows hold zeros and are dropped at the store).
                    y = tl.load(y_ptrs + u * 256)
            else:
                # a group past this split's last (its count not a multiple of UNROLL) loads nothing
                in_k = n_ok[:, None] & (g < kb_end)
                y = tl.load(y_ptrs + u * 256, mask=row_ok[:, None] & (g < kb_end), other=0.0)
            w = load_group(w_ptrs + u * stride_wg, s_ptrs + u * stride_wsg, in_k, True, INTERPRET)
            acc = mma(w, y, acc, MMA_ISSUE, INTERPRET)
        y_ptrs += UNROLL * 256
        w_ptrs += UNROLL * stride_wg
        s_ptrs += UNROLL * stride_wsg

    acc = tl.trans(acc) * (tl.load(wg_ptr + expert) * WEIGHT_RESCALE)
    if not WEIGHT_ON_INPUT:
        acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
    token = (pair // top_k).to(tl.int64)
    out_ptrs = acc_ptr + token[:, None] * stride_accm + offs_n[None, :]
    tl.atomic_add(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :], sem="relaxed")


@triton.jit
def _gemm2_kernel(
    y_ptr,
    w_ptr,
    ws_ptr,
    wg_ptr,
    acc_ptr,
    rows_ptr,
    tile_expert_ptr,
    num_padded_ptr,
    topk_w_ptr,
    num_pairs,
    expert_offset,
    num_experts,
    H,
    num_groups,
    top_k,
    max_tiles,
    groups_per_split,
    stride_ym,
    stride_we,
    stride_wb,
    stride_wr,
    stride_wg,
    stride_wse,
    stride_wsb,
    stride_wsr,
    stride_wsg,
    stride_accm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    GATHER: tl.constexpr,
    PAIRS: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
    UNROLL: tl.constexpr,
    EVEN_K: tl.constexpr,
    MMA_ISSUE: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # the cast may start; it waits for this grid before reading acc
    kb_start = tl.program_id(1) * groups_per_split
    kb_end = tl.minimum(kb_start + groups_per_split, num_groups)
    if GATHER:
        # rows_ptr: the [T * k] ids; program (p, n, split) computes if pair p leads its expert.
        leader, expert, members, rank, count = expert_members(
            rows_ptr, tl.program_id(0) // tl.cdiv(H, BLOCK_N), num_pairs, expert_offset, num_experts, PAIRS
        )
        if not leader:
            return
        offs_n = (tl.program_id(0) % tl.cdiv(H, BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
        if PDL:
            gdc_wait()  # GEMM1's y and zeroed acc
        for chunk in range(0, tl.cdiv(count, BLOCK_M)):
            pair, ok = chunk_pairs(members, rank, count, chunk, PAIRS, BLOCK_M)
            _gemm2_rows(
                y_ptr, w_ptr, ws_ptr, wg_ptr, acc_ptr, topk_w_ptr,
                pair, pair, ok, expert, offs_n, offs_n < H, kb_start, kb_end, top_k,
                stride_ym, stride_we, stride_wb, stride_wr, stride_wg, stride_wse, stride_wsb, stride_wsr, stride_wsg,
                stride_accm,
                BLOCK_M, BLOCK_N, WEIGHT_ON_INPUT, GATHER, INTERPRET, UNROLL, EVEN_K, MMA_ISSUE,
            )  # fmt: skip
    else:
        # rows_ptr: the aligned rows' pairs (align.AlignedRouting.sorted_ids).
        pid_m, pid_n = tile_coords(tl.program_id(0), max_tiles, tl.cdiv(H, BLOCK_N), GROUP_M)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        rows, pair, row_ok, expert, offs_n, n_ok = aligned_rows(
            pid_m, pid_n, rows_ptr, tile_expert_ptr, num_pairs, H, BLOCK_M, BLOCK_N
        )
        if PDL:
            gdc_wait()
        _gemm2_rows(
            y_ptr, w_ptr, ws_ptr, wg_ptr, acc_ptr, topk_w_ptr,
            rows, pair, row_ok, expert, offs_n, n_ok, kb_start, kb_end, top_k,
            stride_ym, stride_we, stride_wb, stride_wr, stride_wg, stride_wse, stride_wsb, stride_wsr, stride_wsg,
            stride_accm,
            BLOCK_M, BLOCK_N, WEIGHT_ON_INPUT, GATHER, INTERPRET, UNROLL, EVEN_K, MMA_ISSUE,
        )  # fmt: skip


def gemm2_nvfp4(
    y: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_scale_2: torch.Tensor,
    routing: Union[AlignedRouting, GatheredPairs],
    topk_weights: torch.Tensor,
    acc: torch.Tensor,
    *,
    num_pairs: int,
    top_k: int,
    weight_on_input: bool,
    BLOCK_N: int,
    SPLIT_K: int,
    GROUP_M: int,
    num_warps: int,
    num_stages: int,
    pdl: bool = False,
    unroll: int = 1,
    maxnreg: int = 0,
    mma_issue: str = "pieces",
) -> None:
    """Launch GEMM2 + weighted combine: ``acc[t] += w[t, j] * (y_row @ w2[e].T)``.

    Args:
        y: GEMM1's output ``[P, Ip]`` bf16 (stored column order) at the rows ``routing`` gives
            (aligned rows, or the pairs themselves).
        w2, w2_scale, w2_scale_2: kernel layout (``NVFP4KernelWeights``): words
            ``[E, Hb/32, Ip/256, 32, 32]`` int32 and scale codes ``[E, Hb/32, Ip/256, 32, 16]`` uint8
            (row-blocked, ``Hb`` >= H), or the same in rows (``[E, H, Ip/8]``, ``[E, H, Ip/16]``:
            ``nvfp4_layout.rows_of_blocks``); ``[E]`` fp32. ``acc``'s width is H.
        routing: what GEMM1 used; topk_weights ``[T, k]`` fp32 contiguous.
        acc: ``[T, H]`` fp32 workspace, zeroed, unit column stride.
        pdl: launch as a programmatic dependent launch of GEMM1 (the programs wait for it before
            reading ``y``; on a GPU only), and signal the cast's.
        unroll: 256-K groups an iteration of the main loop (a power of two).
        maxnreg: register cap a thread (0: the compiler's choice; the gathered path's default is
            ``GATHER_MAXNREG``).
        mma_issue: how a group's 16 warpgroup MMAs are issued (:func:`nvfp4_tile.mma`).
    """
    geo = weight_geometry(w2, w2_scale)
    # the blocked form's padding rows (to whole 32-row blocks) are never read: acc's width is H
    e, h, groups = geo.experts, acc.shape[1], geo.groups
    assert h <= geo.rows
    assert acc.stride(1) == 1 and topk_weights.is_contiguous() and y.shape[1] == groups * K_GROUP
    per_split = triton.cdiv(groups, SPLIT_K)
    splits = triton.cdiv(groups, per_split)
    gather = isinstance(routing, GatheredPairs)
    if isinstance(routing, GatheredPairs):
        assert num_pairs <= MAX_GATHER_PAIRS
        grid = (num_pairs * triton.cdiv(h, BLOCK_N), splits)
    else:
        grid = (routing.max_tiles * triton.cdiv(h, BLOCK_N), splits)
    rows_ptr, tile_expert, num_padded, expert_offset, num_experts, max_tiles = row_source_args(routing, e)
    _gemm2_kernel[grid](
        y,
        w2,
        w2_scale,
        w2_scale_2,
        acc,
        rows_ptr,
        tile_expert,
        num_padded,
        topk_weights,
        num_pairs,
        expert_offset,
        num_experts,
        h,
        groups,
        top_k,
        max_tiles,
        per_split,
        y.stride(0),
        *geo.words,
        *geo.scales,
        acc.stride(0),
        BLOCK_M=routing.block_m,
        BLOCK_N=BLOCK_N,
        GROUP_M=GROUP_M,
        WEIGHT_ON_INPUT=weight_on_input,
        GATHER=gather,
        PAIRS=gather_scan_width(num_pairs) if gather else 1,
        PDL=pdl,
        INTERPRET=INTERPRETING,
        UNROLL=unroll,
        MMA_ISSUE=mma_issue,
        EVEN_K=per_split % unroll == 0 and groups % unroll == 0,
        num_warps=num_warps,
        num_stages=num_stages,
        **({"launch_pdl": True} if pdl else {}),
        **register_cap(maxnreg, gather),
    )
