"""GEMM1 of the NVFP4 (W4A16) fused experts: gate/up projection with SiLU-and-mul fused.

Rows come from the aligned tiles of ``align`` or, on the swap-AB decode path, from the leader
pair of each expert (``GATHER``: no alignment launch, the hidden states read in natural order and
put in the dot order in registers, no permutation launch either; ``y`` rows are the pairs).
For each tile of ``BLOCK_M`` aligned rows (one local expert ``e``) and each
``BLOCK_N`` stored intermediate columns ``n``, one program dequantizes the gate rows
``w13[e, n]`` stacked on the up rows ``w13[e, Ip + n]`` (one ``2 BLOCK_N``-row tile) one
256-K group at a time in registers (:func:`nvfp4_tile.dequant_group`), multiplies them
with the permuted bf16 hidden states on the tensor cores (weights as wgmma's register
operand, the tokens on the N side) into one fp32
accumulator over ``Hp``, applies the gate's and up's global scales, and writes
``y = silu(gate) * up`` rounded to bf16 at the aligned rows (``y [P, Ip]``, columns in the layout's
stored order, which is GEMM2's dot order).

The programs also zero the fp32 GEMM2 workspace (a grid-stride share each,
before any early exit), as the FP8 GEMM1 does: GEMM2 accumulates into it with
atomics after this kernel on the stream.
"""

from typing import Tuple, Union

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from ...runtime import workspace
from ..interpret import INTERPRETING
from .align import AlignedRouting, GatheredPairs, row_source_args
from .nvfp4_layout import K_GROUP, weight_geometry
from .nvfp4_tile import WEIGHT_RESCALE, dot_order, load_group, mma, row_offsets
from .tiles import (
    MAX_GATHER_PAIRS,
    aligned_rows,
    chunk_pairs,
    expert_members,
    gather_scan_width,
    register_cap,
    tile_coords,
    zero_fill,
)

ZERO_BLOCK = 1024


@triton.jit
def _gemm1_rows(
    x_ptr,
    w_ptr,
    ws_ptr,
    wg_ptr,
    y_ptr,
    topk_w_ptr,
    rows,
    pair,
    row_ok,
    token,
    expert,
    pid_n,
    H,
    IP,
    num_groups,
    stride_xm,
    stride_we,
    stride_wb,
    stride_wr,
    stride_wg,
    stride_wse,
    stride_wsb,
    stride_wsr,
    stride_wsg,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    GATHER: tl.constexpr,
    INTERPRET: tl.constexpr,
    UNROLL: tl.constexpr,
    EVEN_K: tl.constexpr,
    MMA_ISSUE: tl.constexpr,
):
    """One tile: ``BLOCK_M`` rows (``pair``, of ``token``) of local ``expert`` times the gate and
    up rows of column block ``pid_n``; writes ``silu(gate) * up`` at ``y[rows]`` (``row_ok`` rows
    only with ``GATHER``, whose ``x`` is ``hidden`` in natural order, permuted to the dot order in
    registers). ``EVEN_K``: every iteration's ``UNROLL`` groups lie inside ``x``'s ``H``
    columns and the ``num_groups`` groups, so the loads need no K masks."""
    offs_k = tl.arange(0, 256)
    offs_w = tl.arange(0, 16)
    # One weight tile of 2 * BLOCK_N rows: the gate rows of the block, then its up rows.
    offs_r = tl.arange(0, 2 * BLOCK_N)
    is_gate = offs_r < BLOCK_N
    w_rows = pid_n * BLOCK_N + tl.where(is_gate, offs_r, IP + offs_r - BLOCK_N)

    x_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + row_offsets(w_rows, stride_wb, stride_wr)[:, None] + offs_w[None, :]
    s_ptrs = ws_ptr + expert * stride_wse + row_offsets(w_rows, stride_wsb, stride_wsr)[:, None] + offs_w[None, :]

    acc = tl.zeros([2 * BLOCK_N, BLOCK_M], dtype=tl.float32)
    # Without it the loop's zero-trip path re-defines the accumulator and ptxas
    # serializes every wgmma (C7515); Hp >= 256 always.
    tl.assume(num_groups > 0)
    # UNROLL groups an iteration: the pipeline's barriers, waits and address work are paid once
    # for them, and ptxas keeps each group's weight fragments apart (no warpgroup fence between
    # the MMAs when the registers allow it).
    for g0 in range(0, num_groups, UNROLL):
        for u in tl.static_range(UNROLL):
            g = g0 + u
            if EVEN_K:
                x_mask = row_ok[:, None]
            elif GATHER:
                # hidden in natural order has H columns
                x_mask = row_ok[:, None] & (g * 256 + offs_k < H)[None, :]
            else:
                # a group past the last (num_groups not a multiple of UNROLL) loads nothing
                x_mask = row_ok[:, None] & (g < num_groups)
            x = tl.load(x_ptrs + u * 256, mask=x_mask, other=0.0)
            if GATHER:
                # hidden in natural order, loaded contiguously and put in the dot order
                x = dot_order(x)
            w = load_group(
                w_ptrs + u * stride_wg, s_ptrs + u * stride_wsg, g < num_groups, UNROLL > 1 and not EVEN_K, INTERPRET
            )
            acc = mma(w, x, acc, MMA_ISSUE, INTERPRET)
        x_ptrs += UNROLL * 256
        w_ptrs += UNROLL * stride_wg
        s_ptrs += UNROLL * stride_wsg

    global_scale = tl.where(is_gate, tl.load(wg_ptr + expert * 2), tl.load(wg_ptr + expert * 2 + 1))
    acc = tl.trans(acc * (global_scale * WEIGHT_RESCALE)[:, None])  # [BLOCK_M, 2 * BLOCK_N]
    gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
    if WEIGHT_ON_INPUT:
        # (w * x) @ W.T == w * (x @ W.T): scaling the fp32 sums avoids rounding w * x to bf16.
        router_w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
        gate = gate * router_w
        up = up * router_w
    y = gate * tl.sigmoid(gate) * up
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    # Explicit round-to-nearest-even (the GPU default; Triton's interpreter truncates otherwise).
    # Aligned padding rows are written too (zeros: their x is masked), gathered rows only if real.
    y = y.to(tl.bfloat16, fp_downcast_rounding="rtne")
    if GATHER:
        tl.store(y_ptrs, y, mask=row_ok[:, None])
    else:
        tl.store(y_ptrs, y)


@triton.jit
def _gemm1_kernel(
    x_ptr,
    w_ptr,
    ws_ptr,
    wg_ptr,
    y_ptr,
    rows_ptr,
    tile_expert_ptr,
    num_padded_ptr,
    topk_w_ptr,
    zero_ptr,
    zero_numel,
    num_pairs,
    expert_offset,
    num_experts,
    H,
    IP,
    num_groups,
    top_k,
    max_tiles,
    stride_xm,
    stride_we,
    stride_wb,
    stride_wr,
    stride_wg,
    stride_wse,
    stride_wsb,
    stride_wsr,
    stride_wsg,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    GATHER: tl.constexpr,
    PAIRS: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
    ZERO_BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
    EVEN_K: tl.constexpr,
    MMA_ISSUE: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # GEMM2 may start its prologue; it waits before reading y
    zero_fill(zero_ptr, zero_numel, ZERO_BLOCK)
    if GATHER:
        # rows_ptr: the [T * k] ids; program (p, n) computes if pair p leads its expert.
        leader, expert, members, rank, count = expert_members(
            rows_ptr, tl.program_id(0), num_pairs, expert_offset, num_experts, PAIRS
        )
        if not leader:
            return
        for chunk in range(0, tl.cdiv(count, BLOCK_M)):
            pair, ok = chunk_pairs(members, rank, count, chunk, PAIRS, BLOCK_M)
            token = (pair // top_k).to(tl.int64)
            _gemm1_rows(
                x_ptr, w_ptr, ws_ptr, wg_ptr, y_ptr, topk_w_ptr,
                pair, pair, ok, token, expert, tl.program_id(1), H, IP, num_groups,
                stride_xm, stride_we, stride_wb, stride_wr, stride_wg, stride_wse, stride_wsb, stride_wsr, stride_wsg,
                stride_ym,
                BLOCK_M, BLOCK_N, WEIGHT_ON_INPUT, GATHER, INTERPRET, UNROLL, EVEN_K, MMA_ISSUE,
            )  # fmt: skip
    else:
        # rows_ptr: the aligned rows' pairs (align.AlignedRouting.sorted_ids).
        pid_m, pid_n = tile_coords(tl.program_id(0), max_tiles, IP // BLOCK_N, GROUP_M)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        rows, pair, row_ok, expert, _, _ = aligned_rows(
            pid_m, pid_n, rows_ptr, tile_expert_ptr, num_pairs, IP, BLOCK_M, BLOCK_N
        )
        token = (pair // top_k).to(tl.int64)
        _gemm1_rows(
            x_ptr, w_ptr, ws_ptr, wg_ptr, y_ptr, topk_w_ptr,
            rows, pair, row_ok, token, expert, pid_n, H, IP, num_groups,
            stride_xm, stride_we, stride_wb, stride_wr, stride_wg, stride_wse, stride_wsb, stride_wsr, stride_wsg,
            stride_ym,
            BLOCK_M, BLOCK_N, WEIGHT_ON_INPUT, GATHER, INTERPRET, UNROLL, EVEN_K, MMA_ISSUE,
        )  # fmt: skip


def gemm1_nvfp4(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_scale_2: torch.Tensor,
    routing: Union[AlignedRouting, GatheredPairs],
    topk_weights: torch.Tensor,
    zero: torch.Tensor,
    *,
    num_pairs: int,
    top_k: int,
    weight_on_input: bool,
    BLOCK_N: int,
    GROUP_M: int,
    num_warps: int,
    num_stages: int,
    pdl: bool = False,
    unroll: int = 1,
    maxnreg: int = 0,
    mma_issue: str = "pieces",
) -> torch.Tensor:
    """Launch GEMM1 + SiLU-and-mul.

    Args:
        x: aligned routing: ``[T, Hp]`` bf16 from :func:`nvfp4_act.permute_activations`;
            gathered pairs: the hidden states ``[T, H]`` bf16 as they are (unit column stride).
        w13, w13_scale, w13_scale_2: kernel layout (``NVFP4KernelWeights``): words
            ``[E, 2Ip/32, Hp/256, 32, 32]`` int32 and scale codes ``[E, 2Ip/32, Hp/256, 32, 16]``
            uint8 (row-blocked), or the same in rows (``[E, 2Ip, Hp/8]``, ``[E, 2Ip, Hp/16]``:
            ``nvfp4_layout.rows_of_blocks``); ``[E, 2]`` fp32.
        routing: the aligned rows, or the gathered pairs (at most ``MAX_GATHER_PAIRS``).
        topk_weights: ``[T, k]`` fp32 contiguous (read with ``weight_on_input``).
        zero: contiguous fp32 buffer this kernel zeroes (the GEMM2 workspace).
        BLOCK_N: divides 256 (the weight tile has ``2 BLOCK_N`` rows: ``BLOCK_N = 32`` fills one
            64-row wgmma).
        pdl: the programs signal a programmatic dependent launch of GEMM2 as they start.
        unroll: 256-K groups an iteration of the main loop (a power of two).
        maxnreg: register cap a thread (0: the compiler's choice; the gathered path's default is
            ``GATHER_MAXNREG``).
        mma_issue: how a group's 16 warpgroup MMAs are issued (:func:`nvfp4_tile.mma`).

    Returns:
        ``y [P, Ip]`` bf16, columns in stored order: aligned, ``P = max_tiles * block_m`` (padding
        rows hold zeros); gathered, ``P = T * k`` at the pairs' rows (rows of pairs without a local
        expert are not written).
    """
    geo = weight_geometry(w13, w13_scale)
    e, ip, hp = geo.experts, geo.rows // 2, geo.groups * K_GROUP
    assert K_GROUP % BLOCK_N == 0 and x.stride(1) == 1
    gather = isinstance(routing, GatheredPairs)
    grid: Tuple[int, ...]
    if isinstance(routing, GatheredPairs):
        assert num_pairs <= MAX_GATHER_PAIRS and x.shape[1] <= hp
        rows, grid = num_pairs, (num_pairs, ip // BLOCK_N)
    else:
        assert x.shape[1] == hp
        rows, grid = routing.max_tiles * routing.block_m, (routing.max_tiles * (ip // BLOCK_N),)
    rows_ptr, tile_expert, num_padded, expert_offset, num_experts, max_tiles = row_source_args(routing, e)
    y = workspace(rows, ip, torch.bfloat16, x.device, "moe_intermediate")
    _gemm1_kernel[grid](
        x,
        w13,
        w13_scale,
        w13_scale_2,
        y,
        rows_ptr,
        tile_expert,
        num_padded,
        topk_weights,
        zero,
        zero.numel(),
        num_pairs,
        expert_offset,
        num_experts,
        x.shape[1],
        ip,
        hp // K_GROUP,
        top_k,
        max_tiles,
        x.stride(0),
        *geo.words,
        *geo.scales,
        y.stride(0),
        BLOCK_M=routing.block_m,
        BLOCK_N=BLOCK_N,
        GROUP_M=GROUP_M,
        WEIGHT_ON_INPUT=weight_on_input,
        GATHER=gather,
        PAIRS=gather_scan_width(num_pairs) if gather else 1,
        PDL=pdl,
        INTERPRET=INTERPRETING,
        ZERO_BLOCK=ZERO_BLOCK,
        UNROLL=unroll,
        MMA_ISSUE=mma_issue,
        EVEN_K=x.shape[1] % K_GROUP == 0 and (hp // K_GROUP) % unroll == 0,
        num_warps=num_warps,
        num_stages=num_stages,
        **register_cap(maxnreg, gather),
    )
    return y
