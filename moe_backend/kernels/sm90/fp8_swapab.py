"""Swap-AB decode GEMMs of the FP8 fused experts: no alignment step, weights on the MMA's M side.

At decode a local expert sees a handful of (token, slot) pairs, so the layer is a stream of
the active experts' weights. These kernels put ``2 * BLOCK_N`` (GEMM1) or ``BLOCK_N`` (GEMM2)
weight rows on the MMA's M side (wgmma's 64-row operand) and up to ``BLOCK_T`` pairs of one
expert on its narrow N side, and they need no alignment launch: every program ``(p, n)``
reads the ``T * k`` ids (``PAIRS`` of them, padded) and only the *leader* of an expert, the
first pair ``p`` with that id, computes; it gathers the expert's pairs in order,
``BLOCK_T`` at a time (an expert with more pairs loops). Programs of other pairs, of -1 ids
and of ids outside ``[local_expert_offset, + E)`` return at once.

* GEMM1: ``gate``/``up`` rows ``n .. n + BLOCK_N`` stacked in one tile; the bf16 hidden
  states are quantized to e4m3 as they are loaded (per pair per 128 channels, or the static
  scale; scaled by the router weight first with ``WEIGHT_ON_INPUT``); writes
  ``y = silu(gate) * up`` in fp32 at row ``p`` of ``y [T * k, I]``. It also zeroes the fp32
  combine accumulator (a grid-stride share per program, before any exit), and with the fused
  cast the bf16 output and GEMM2's arrival counters.
* GEMM2: ``y`` quantized on load with the same numerics, ``N_TILES`` consecutive tiles of
  ``w2`` rows ``h .. h + BLOCK_N`` a program, ``SPLIT_K`` slices of ``I``; the router-weighted
  result is added atomically into ``acc [T, H]`` fp32; ``combine.cast_out`` rounds it to bf16,
  or (``FUSED_CAST``) the program that adds a (token, tile)'s last contribution does, counted
  in an int32 ``arrivals [T, H / BLOCK_N]`` (no cast launch).
  With ``PREFETCH`` it first asks L2 for its rows' first K blocks (``prefetch.global.L2``),
  before its programmatic-dependent-launch wait on GEMM1. GEMM1 can do the same beside
  ``act_quant`` (``PREFETCH1``).

Numerics equal the ``decode`` path of ``fp8_moe`` (fp32 intermediate, same quantization and
scale order); only the fp32 summation order inside the MMA differs.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ...quant.fp8 import BLOCK as SCALE_BLOCK
from ...runtime import workspace
from ..interpret import INTERPRETING
from .act_quant import act_quant_fp8
from .fp8_tile import quantize_tile, to_bf16
from .tiles import (
    GATHER_MAXNREG,
    MAX_GATHER_PAIRS as MAX_PAIRS,
    chunk_pairs,
    expert_members,
    gather_scan_width,
    local_expert_members,
    zero_fill,
)

ZERO_BLOCK = tl.constexpr(1024)
#: The 128 x 128 weight scale block, as a constant the kernels can read.
W_SCALE_BLOCK = tl.constexpr(SCALE_BLOCK)
#: Values ``PREFETCH1`` and ``PREFETCH2`` may take: K blocks of each weight row that a GEMM1 or GEMM2
#: program asks L2 for before it waits on its input (a power of two: one 128-byte line a block,
#: ``tl.arange`` over them).
PREFETCH_BLOCKS = (0, 1, 2, 4, 8, 16)
#: Values ``UNROLL1`` and ``UNROLL2`` may take: K blocks a GEMM1 or GEMM2 pipeline iteration handles.
UNROLL_BLOCKS = (1, 2, 4)


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte line holding each address of ``ptrs`` (any shape): a hint with no
    value, so that a load issued later finds the line in L2."""
    tl.inline_asm_elementwise(
        "mov.u32 $0, 0;\nprefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def load_operand(
    ptrs,
    mask,
    scale_ptrs,
    ok,
    static_ptr,
    router_w,
    QUANT_ON_LOAD: tl.constexpr,
    STATIC: tl.constexpr,
    UE8M0: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One K block of the pairs' operand, ``(q [BLOCK_T, BLOCK_K] e4m3, s [BLOCK_T] fp32)``.

    ``QUANT_ON_LOAD``: ``ptrs`` address a bf16 / fp32 tile, quantized here (scaled by ``router_w
    [BLOCK_T]`` first with ``WEIGHT_ON_INPUT``); else an e4m3 tile with its per-row scales at
    ``scale_ptrs [BLOCK_T]`` (masked by ``ok``), or the ``STATIC`` scale at ``static_ptr``.
    """
    if QUANT_ON_LOAD:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if WEIGHT_ON_INPUT:
            x = x * router_w[:, None]
        q, s = quantize_tile(x, static_ptr, STATIC, UE8M0)
    else:
        q = tl.load(ptrs, mask=mask, other=0.0)
        if STATIC:
            s = tl.zeros([BLOCK_T], dtype=tl.float32) + tl.load(static_ptr)
        else:
            s = tl.load(scale_ptrs, mask=ok, other=0.0)
    return q, s


@triton.jit
def k_block_masks(kb, kb_end, K, offs_k, ok, rows_ok, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Masks of K block ``kb`` of an unrolled loop over blocks ``[.., kb_end)`` of ``K``:
    ``(operand [T, BLOCK_K], weight [R, BLOCK_K], operand scales [T], block in range)`` from the
    pairs' ``ok [T]`` and the weight rows' ``rows_ok [R]``. ``EVEN_K``: every block is whole and in
    range (no K mask)."""
    in_range = kb < kb_end
    if EVEN_K:
        a_mask = ok[:, None]
        w_mask = rows_ok[:, None]
        scale_ok = ok
    else:
        k_ok = (kb * BLOCK_K + offs_k < K) & in_range
        a_mask = ok[:, None] & k_ok[None, :]
        w_mask = rows_ok[:, None] & k_ok[None, :]
        scale_ok = ok & in_range
    return a_mask, w_mask, scale_ok, in_range


@triton.jit
def accumulate(acc, w, q, s, w_s, BLOCK_SCALED: tl.constexpr, STATIC: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc [N, T] += w [N, K] @ q [T, K]^T`` in fp32 with the K block's scales: block scales
    ``w_s`` (``[N, 1]`` or a scalar) times the pairs' ``s [T]``; a static activation scale keeps the
    MMA's own accumulator, promoted to fp32 every K block (Hopper's FP8 MMA accumulates ~14-bit
    mantissas); dynamic per-tensor: times ``s``."""
    if BLOCK_SCALED:
        acc += tl.dot(w, tl.trans(q)) * (s[None, :] * w_s)
    elif STATIC:
        acc = tl.dot(w, tl.trans(q), acc, max_num_imprecise_acc=BLOCK_K)
    else:
        acc += tl.dot(w, tl.trans(q)) * s[None, :]
    return acc


@triton.jit
def tensor_scaled(acc, w_scale_ptr, expert, static_ptr, BLOCK_SCALED: tl.constexpr, STATIC: tl.constexpr):
    """Per-tensor weights: ``acc`` times the expert's weight scale (and the static activation scale)."""
    if not BLOCK_SCALED:
        post = tl.load(w_scale_ptr + expert)
        if STATIC:
            post = post * tl.load(static_ptr)
        acc = acc * post
    return acc


@triton.jit
def down_slice(
    y,
    pair,
    ok,
    token,
    expert,
    k0,
    w_ptr,
    w_scale_ptr,
    acc_ptr,
    topk_w_ptr,
    y_static_ptr,
    H,
    I,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_accm,
    Y_STATIC: tl.constexpr,
    BLOCK_SCALED: tl.constexpr,
    UE8M0: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    STAGES: tl.constexpr,
    EVEN: tl.constexpr,
):
    """GEMM2 on one K block of ``I``, inside GEMM1's program (``FUSED_DOWN``): ``acc[token] +=
    w_pair * w2[expert][:, k0 : k0 + G] @ e4m3(y)`` for every row of ``H``, added atomically.

    ``y [G, BLOCK_T]`` fp32: the program's columns ``k0 ..`` of the intermediate (``G`` divides
    the 128-wide scale block), quantized here exactly as GEMM1's epilogue quantizes it for GEMM2
    (one scale per pair per ``G`` columns, or the static one); then each ``[BLOCK_H, G]`` tile of
    ``w2`` times it is scaled as GEMM2 scales a K block (``accumulate``, ``tensor_scaled``, the
    router weight), so only the fp32 order of the top-k and K-block sums differs from the two
    launches. ``pair``, ``ok``, ``token [BLOCK_T]``; ``EVEN``: ``H`` a multiple of ``BLOCK_H``
    and ``I`` of ``G`` (no masks on the weight tiles).
    """
    G: tl.constexpr = y.shape[0]
    BLOCK_T: tl.constexpr = y.shape[1]
    q, ys = quantize_tile(tl.trans(y), y_static_ptr, Y_STATIC, UE8M0)
    offs_k = k0 + tl.arange(0, G)
    rows = tl.arange(0, BLOCK_H)
    router_w = tl.load(topk_w_ptr + pair, mask=ok, other=0.0)
    w_ptrs = w_ptr + expert * stride_we + rows[:, None] * stride_wn + offs_k[None, :]
    ws_ptrs = w_scale_ptr + expert * stride_wse + (k0 // W_SCALE_BLOCK) + (rows // W_SCALE_BLOCK) * stride_wsn
    acc_ptrs = acc_ptr + token[None, :] * stride_accm + rows[:, None]
    for h0 in tl.range(0, H, BLOCK_H, num_stages=STAGES):
        h_ok = h0 + rows < H
        if EVEN:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=h_ok[:, None] & (offs_k < I)[None, :], other=0.0)
        ws = 1.0
        if BLOCK_SCALED:
            ws = tl.load(ws_ptrs + (h0 // W_SCALE_BLOCK) * stride_wsn, mask=h_ok, other=0.0)[:, None]
        part = accumulate(tl.zeros([BLOCK_H, BLOCK_T], dtype=tl.float32), w, q, ys, ws, BLOCK_SCALED, Y_STATIC, G)
        part = tensor_scaled(part, w_scale_ptr, expert, y_static_ptr, BLOCK_SCALED, Y_STATIC)
        if not WEIGHT_ON_INPUT:
            part = part * router_w[None, :]
        tl.atomic_add(acc_ptrs, part, mask=ok[None, :] & h_ok[:, None], sem="relaxed")
        w_ptrs += BLOCK_H * stride_wn
        acc_ptrs += BLOCK_H


@triton.jit
def _gemm1_kernel(
    x_ptr,
    x_scale_ptr,
    w_ptr,
    w_scale_ptr,
    y_ptr,
    y_scale_ptr,
    ids_ptr,
    topk_w_ptr,
    a_static_ptr,
    y_static_ptr,
    zero_ptr,
    zero_numel,
    result_ptr,
    result_numel,
    arrivals_ptr,
    arrivals_numel,
    ready_ptr,
    w2_ptr,
    w2_scale_ptr,
    acc_ptr,
    num_pairs,
    expert_offset,
    num_experts,
    H,
    I,
    top_k,
    stride_xm,
    stride_xsm,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_ym,
    stride_ysm,
    stride_w2e,
    stride_w2n,
    stride_w2se,
    stride_w2sn,
    stride_accm,
    PAIRS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QUANT_ON_LOAD: tl.constexpr,
    A_STATIC: tl.constexpr,
    QUANT_OUT: tl.constexpr,
    Y_STATIC: tl.constexpr,
    BLOCK_SCALED: tl.constexpr,
    UE8M0: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    WAIT_INPUT: tl.constexpr,
    READY: tl.constexpr,
    BY_EXPERT: tl.constexpr,
    UNROLL: tl.constexpr,
    EXPERT_MAJOR: tl.constexpr,
    DOWN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOWN_STAGES: tl.constexpr,
    EVEN_DOWN: tl.constexpr,
    DOWN_PREFETCH: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # GEMM2 (or the cast) may start its prologue; it waits before reading
    zero_fill(zero_ptr, zero_numel, ZERO_BLOCK)
    # The fused cast: tokens without a local pair get no contribution, so their rows stay 0.
    zero_fill(result_ptr, result_numel, ZERO_BLOCK)
    zero_fill(arrivals_ptr, arrivals_numel, ZERO_BLOCK)
    # EXPERT_MAJOR: an expert's tiles are consecutive programs (with READY they finish together).
    _, pid_n, leader, expert, members, rank, count = program_expert(
        ids_ptr, num_pairs, expert_offset, num_experts, PAIRS, EXPERT_MAJOR, BY_EXPERT
    )
    if READY:
        # every program counts its zeroing share done: GEMM2 waits for all shares before its
        # first atomic add
        publish(ready_ptr + num_experts)
    if not leader:
        return
    offs_r = tl.arange(0, 2 * BLOCK_N)
    is_gate = offs_r < BLOCK_N
    cols = pid_n * BLOCK_N + tl.where(is_gate, offs_r, offs_r - BLOCK_N)
    col_ok = cols < I
    w_rows = tl.where(is_gate, cols, I + cols)
    offs_k = tl.arange(0, BLOCK_K)
    if PREFETCH > 0:
        # As GEMM2's prefetch: the first PREFETCH K blocks of the tile's gate and up rows, asked
        # of L2 while act_quant still runs (WAIT_INPUT), clamped inside the tensor.
        k_cols = tl.minimum(tl.arange(0, PREFETCH) * BLOCK_K, H - 1)
        prefetch_l2(w_ptr + expert * stride_we + tl.minimum(w_rows, 2 * I - 1)[:, None] * stride_wn + k_cols[None, :])
    if WAIT_INPUT:
        gdc_wait()  # act_quant's codes and scales are complete and visible past this point
    if BLOCK_SCALED:
        ws_ptr = w_scale_ptr + expert * stride_wse
        wsg_ptr = ws_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_wsn
        wsu_ptr = ws_ptr + ((I + pid_n * BLOCK_N) // BLOCK_K) * stride_wsn
    for chunk in range(0, tl.cdiv(count, BLOCK_T)):
        pair, ok = chunk_pairs(members, rank, count, chunk, PAIRS, BLOCK_T)
        token = (pair // top_k).to(tl.int64)
        x_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + expert * stride_we + w_rows[:, None] * stride_wn + offs_k[None, :]
        router_w = 0.0
        if WEIGHT_ON_INPUT:
            router_w = tl.load(topk_w_ptr + pair, mask=ok, other=0.0)
        acc = tl.zeros([2 * BLOCK_N, BLOCK_T], dtype=tl.float32)
        # UNROLL K blocks an iteration, as GEMM2's.
        for kb0 in range(0, tl.cdiv(H, BLOCK_K), UNROLL):
            if DOWN_PREFETCH > 0:
                # The down loop's first tiles, asked of L2 one iteration before the last: they
                # arrive while this loop drains and its epilogue runs (each w2 row's slice is one
                # 128-byte line; rows past H re-ask a line inside the tensor).
                if kb0 == (tl.cdiv(H, BLOCK_K) - 1) // UNROLL * UNROLL - UNROLL:
                    rows2 = tl.minimum(tl.arange(0, DOWN_PREFETCH * BLOCK_H), H - 1)
                    prefetch_l2(w2_ptr + expert * stride_w2e + rows2 * stride_w2n + pid_n * BLOCK_N)
            for u in tl.static_range(UNROLL):
                kb = kb0 + u
                x_mask, w_mask, scale_ok, kb_in = k_block_masks(
                    kb, tl.cdiv(H, BLOCK_K), H, offs_k, ok, col_ok, EVEN_K, BLOCK_K
                )
                xq, xs = load_operand(
                    x_ptrs + u * BLOCK_K,
                    x_mask,
                    x_scale_ptr + token * stride_xsm + kb,
                    scale_ok,
                    a_static_ptr,
                    router_w,
                    QUANT_ON_LOAD,
                    A_STATIC,
                    UE8M0,
                    WEIGHT_ON_INPUT,
                    BLOCK_T,
                )
                w = tl.load(w_ptrs + u * BLOCK_K, mask=w_mask, other=0.0)
                ws = 1.0
                if BLOCK_SCALED:
                    if EVEN_K:
                        ws = tl.where(is_gate, tl.load(wsg_ptr + kb), tl.load(wsu_ptr + kb))[:, None]
                    else:
                        ws = tl.where(
                            is_gate,
                            tl.load(wsg_ptr + kb, mask=kb_in, other=0.0),
                            tl.load(wsu_ptr + kb, mask=kb_in, other=0.0),
                        )[:, None]
                acc = accumulate(acc, w, xq, xs, ws, BLOCK_SCALED, A_STATIC, BLOCK_K)
            x_ptrs += UNROLL * BLOCK_K
            w_ptrs += UNROLL * BLOCK_K
        acc = tensor_scaled(acc, w_scale_ptr, expert, a_static_ptr, BLOCK_SCALED, A_STATIC)
        gate, up = tl.split(tl.permute(tl.reshape(acc, [2, BLOCK_N, BLOCK_T]), [1, 2, 0]))
        y = gate * tl.sigmoid(gate) * up
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        y = tl.where((offs_n < I)[:, None], y, 0.0)
        y_ptrs = y_ptr + pair[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
        if DOWN:
            down_slice(
                y,
                pair,
                ok,
                (pair // top_k).to(tl.int64),
                expert,
                pid_n * BLOCK_N,
                w2_ptr,
                w2_scale_ptr,
                acc_ptr,
                topk_w_ptr,
                y_static_ptr,
                H,
                I,
                stride_w2e,
                stride_w2n,
                stride_w2se,
                stride_w2sn,
                stride_accm,
                Y_STATIC,
                BLOCK_SCALED,
                UE8M0,
                WEIGHT_ON_INPUT,
                BLOCK_H,
                DOWN_STAGES,
                EVEN_DOWN,
            )
        elif QUANT_OUT:  # per pair per 128 columns (BLOCK_N == 128: one tile is one group)
            q, ys = quantize_tile(tl.trans(y), y_static_ptr, Y_STATIC, UE8M0)
            tl.store(y_ptrs, tl.trans(q), mask=ok[None, :] & (offs_n < I)[:, None])
            if not Y_STATIC:
                tl.store(y_scale_ptr + pair.to(tl.int64) * stride_ysm + pid_n, ys, mask=ok)
        else:
            tl.store(y_ptrs, y, mask=ok[None, :] & (offs_n < I)[:, None])
    if READY:
        publish(ready_ptr + expert)  # this tile of the expert's y (and its scales) is stored


@triton.jit
def program_expert(
    ids_ptr,
    num_pairs,
    expert_offset,
    num_experts,
    PAIRS: tl.constexpr,
    EXPERT_MAJOR: tl.constexpr,
    BY_EXPERT: tl.constexpr,
):
    """This program's slot and tile, and the expert it may lead, in either GEMM's grid.

    The grid is ``(slot, tile, ...)``, or ``(tile, slot, ...)`` with ``EXPERT_MAJOR`` (a slot's
    tiles then run as consecutive programs). A slot is a pair (:func:`tiles.expert_members`: only
    the expert's first pair leads) or, with ``BY_EXPERT``, a local expert
    (:func:`tiles.local_expert_members`). Returns ``(slot, tile, leader, expert, members, rank,
    count)``.
    """
    if EXPERT_MAJOR:
        slot = tl.program_id(1)
        tile = tl.program_id(0)
    else:
        slot = tl.program_id(0)
        tile = tl.program_id(1)
    if BY_EXPERT:
        leader, expert, members, rank, count = local_expert_members(ids_ptr, slot, num_pairs, expert_offset, PAIRS)
    else:
        leader, expert, members, rank, count = expert_members(
            ids_ptr, slot, num_pairs, expert_offset, num_experts, PAIRS
        )
    return slot, tile, leader, expert, members, rank, count


@triton.jit
def publish(counter_ptr):
    """Count one in the int32 at ``counter_ptr`` after every thread of the program is done:
    a CTA barrier, then one gpu-scope release increment, which (cumulative) publishes all the
    program's earlier stores to a program that acquires the count (:func:`wait_count`)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def wait_count(counter_ptr, target):
    """Spin until the int32 at ``counter_ptr`` reaches ``target`` (gpu-scope acquire), then a CTA
    barrier, so that every thread's later loads see what the counted programs published.

    L1 is not coherent with other SMs' stores, so those loads (which may go through L1) must not
    find a line this SM cached before the count completed: each pair's rows of ``y`` and its
    scales start on a 128-byte line of their own (:func:`swapab_fp8`), and only programs of the
    pair's expert, after this wait, read them."""
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def token_arrivals(
    ids_ptr, token, ok, expert_offset, num_experts, top_k, TOPK_PAD: tl.constexpr, BLOCK_T: tl.constexpr
):
    """Arrival bookkeeping of a chunk's pairs for the fused cast (``[BLOCK_T]`` each, int32).

    Returns ``(expected, batch, first)``: ``expected`` the contributions a token's output row
    receives per output tile and K slice (its local pairs: ids in ``[expert_offset, + E)``;
    -1 and other ranks' ids add nothing); ``batch`` how many of this chunk's pairs belong to the
    column's token (several only when a token names one expert twice); ``first`` the column
    that reports them (the token's first column in the chunk; not-``ok`` columns never report).
    """
    slots = tl.arange(0, TOPK_PAD)
    tok_ids = tl.load(
        ids_ptr + token[:, None] * top_k + slots[None, :], mask=ok[:, None] & (slots < top_k)[None, :], other=-1
    )
    local = tok_ids - expert_offset
    expected = tl.sum(((tok_ids >= 0) & (local >= 0) & (local < num_experts)).to(tl.int32), 1)
    same = (token[:, None] == token[None, :]) & ok[:, None] & ok[None, :]
    cols = tl.arange(0, BLOCK_T)
    batch = tl.sum(same.to(tl.int32), 1)
    earlier = tl.sum((same & (cols[None, :] < cols[:, None])).to(tl.int32), 1)
    return expected, batch, ok & (earlier == 0)


@triton.jit
def fused_cast(acc_ptrs, out_ptrs, n_ok, arrival_ptrs, tile_ok, expected, batch, first):
    """After this program added all its tiles into ``acc``: count one ``[BLOCK_N, BLOCK_T]``
    tile's contributions in, and where this program brought a token's last one, write that
    token's finished row segment ``acc -> out`` in bf16 (the ``cast`` launch, per tile).

    ``acc_ptrs`` / ``out_ptrs`` ``[BLOCK_N, BLOCK_T]``, ``n_ok [BLOCK_N]`` the rows inside H,
    ``arrival_ptrs [BLOCK_T]`` each column's int32 counter of (token, tile), ``tile_ok`` whether
    the tile exists (a program's masked tail has no counter), ``expected / batch / first`` from
    :func:`token_arrivals` (``expected`` already times the K slices).

    Memory ordering: the program's atomic adds are spread over all of its threads, the
    counter increments over the few threads holding ``first`` columns. The barrier orders every
    thread's adds before the increments (CTA-scope synchronization); the increments are
    gpu-scope release (``acq_rel``), and release is cumulative, so they publish the whole
    program's adds. The counters' read-modify-writes form one release sequence per (token,
    tile), so the program whose increment brings the count to ``expected`` acquires every
    earlier program's adds; the second barrier carries that acquire to all of its threads, which
    then read ``acc`` at L2 (``.cg``: the adds were performed there, L1 is not coherent).
    Exactly one program sees the final count, so each output element is written once.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(arrival_ptrs, batch, mask=first & tile_ok, sem="acq_rel", scope="gpu")
    last = first & tile_ok & (arrived + batch == expected)
    tl.debug_barrier()
    mask = last[None, :] & n_ok[:, None]
    total = tl.load(acc_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(out_ptrs, to_bf16(total), mask=mask)


@triton.jit
def _gemm2_kernel(
    y_ptr,
    y_scale_ptr,
    w_ptr,
    w_scale_ptr,
    acc_ptr,
    result_ptr,
    arrivals_ptr,
    ready_ptr,
    ready_tiles,
    ready_shares,
    ids_ptr,
    topk_w_ptr,
    y_static_ptr,
    num_pairs,
    expert_offset,
    num_experts,
    H,
    I,
    top_k,
    k_blocks_per_split,
    num_tiles,
    stride_ym,
    stride_ysm,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_accm,
    stride_rm,
    stride_arm,
    PAIRS: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    N_TILES: tl.constexpr,
    FUSED_CAST: tl.constexpr,
    QUANT_ON_LOAD: tl.constexpr,
    Y_STATIC: tl.constexpr,
    BLOCK_SCALED: tl.constexpr,
    UE8M0: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    READY: tl.constexpr,
    BY_EXPERT: tl.constexpr,
    UNROLL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
    p, pid_tiles, leader, expert, members, rank, count = program_expert(
        ids_ptr, num_pairs, expert_offset, num_experts, PAIRS, READY, BY_EXPERT
    )
    if READY:
        # No program waits on all of GEMM1 but the first, after its own work: the grid then
        # completes after GEMM1 does (the cast reads the rows GEMM1 zeroed).
        first_program = (pid_tiles == 0) & (p == 0) & (tl.program_id(2) == 0)
    if not leader:
        if READY:
            if PDL:
                if first_program:
                    gdc_wait()
        return
    kb_start = tl.program_id(2) * k_blocks_per_split
    kb_end = tl.minimum(kb_start + k_blocks_per_split, tl.cdiv(I, BLOCK_K))
    offs_k = tl.arange(0, BLOCK_K)
    if PREFETCH > 0:
        # The first PREFETCH K blocks of each row of this program's first tile, asked of L2 while
        # GEMM1's last programs still run (PDL): the weight stream starts before the wait. Rows
        # past H and blocks past I re-ask a line inside the tensor instead (a hint, no mask).
        rows = tl.minimum(pid_tiles * N_TILES * BLOCK_N + tl.arange(0, BLOCK_N), H - 1)
        cols = tl.minimum(kb_start * BLOCK_K + tl.arange(0, PREFETCH) * BLOCK_K, I - 1)
        prefetch_l2(w_ptr + expert * stride_we + rows[:, None] * stride_wn + cols[None, :])
    if READY:
        # every GEMM1 program's share of acc zeroed, and this expert's y tiles all stored
        wait_count(ready_ptr + num_experts, ready_shares)
        wait_count(ready_ptr + expert, ready_tiles)
    elif PDL:
        gdc_wait()  # GEMM1 (y, the zeroed acc, arrivals and result) is complete and visible past this point
    # One loop over (chunk, tile) around the K loop: a two-level nest, which Triton's
    # FuseNestedLoops flattens (``flatten``) into one software-pipelined loop over (chunk, tile,
    # K block), so the weight loads of the next tile are in flight during a tile's epilogue.
    # (A three-level chunk / tile / K nest is not flattened by Triton 3.6.)
    for ct in tl.range(0, tl.cdiv(count, BLOCK_T) * N_TILES, flatten=N_TILES > 1):
        pair, ok = chunk_pairs(members, rank, count, ct // N_TILES, PAIRS, BLOCK_T)
        tile = pid_tiles * N_TILES + ct % N_TILES
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_ym + (kb_start * BLOCK_K + offs_k)[None, :]
        w_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + (kb_start * BLOCK_K + offs_k)[None, :]
        if BLOCK_SCALED:
            ws_ptr = w_scale_ptr + expert * stride_wse + (tile * BLOCK_N // BLOCK_K) * stride_wsn
        acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
        # UNROLL K blocks an iteration: the pipeline's CTA barrier and waits are paid once for them.
        for kb0 in range(kb_start, kb_end, UNROLL):
            for u in tl.static_range(UNROLL):
                kb = kb0 + u
                y_mask, w_mask, scale_ok, kb_in = k_block_masks(kb, kb_end, I, offs_k, ok, n_ok, EVEN_K, BLOCK_K)
                yq, ys = load_operand(
                    y_ptrs + u * BLOCK_K,
                    y_mask,
                    y_scale_ptr + pair.to(tl.int64) * stride_ysm + kb,
                    scale_ok,
                    y_static_ptr,
                    0.0,
                    QUANT_ON_LOAD,
                    Y_STATIC,
                    UE8M0,
                    False,
                    BLOCK_T,
                )
                w = tl.load(w_ptrs + u * BLOCK_K, mask=w_mask, other=0.0)
                ws = 1.0
                if BLOCK_SCALED:
                    if EVEN_K:
                        ws = tl.load(ws_ptr + kb)
                    else:
                        ws = tl.load(ws_ptr + kb, mask=kb_in, other=0.0)
                acc = accumulate(acc, w, yq, ys, ws, BLOCK_SCALED, Y_STATIC, BLOCK_K)
            y_ptrs += UNROLL * BLOCK_K
            w_ptrs += UNROLL * BLOCK_K
        acc = tensor_scaled(acc, w_scale_ptr, expert, y_static_ptr, BLOCK_SCALED, Y_STATIC)
        if not WEIGHT_ON_INPUT:
            acc = acc * tl.load(topk_w_ptr + pair, mask=ok, other=0.0)[None, :]
        token = (pair // top_k).to(tl.int64)
        out_ptrs = acc_ptr + token[None, :] * stride_accm + offs_n[:, None]
        tl.atomic_add(out_ptrs, acc, mask=ok[None, :] & n_ok[:, None], sem="relaxed")
    if FUSED_CAST:
        # A pass of its own after the weight stream: its CTA barriers inside the streaming loop
        # would stop Triton from software-pipelining it.
        for ct in range(0, tl.cdiv(count, BLOCK_T) * N_TILES):
            pair, ok = chunk_pairs(members, rank, count, ct // N_TILES, PAIRS, BLOCK_T)
            tile = pid_tiles * N_TILES + ct % N_TILES
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            token = (pair // top_k).to(tl.int64)
            expected, batch, first = token_arrivals(
                ids_ptr, token, ok, expert_offset, num_experts, top_k, TOPK_PAD, BLOCK_T
            )
            fused_cast(
                acc_ptr + token[None, :] * stride_accm + offs_n[:, None],
                result_ptr + token[None, :] * stride_rm + offs_n[:, None],
                offs_n < H,
                arrivals_ptr + token * stride_arm + tile,
                tile < num_tiles,
                expected * tl.num_programs(2),  # every K slice adds its share
                batch,
                first,
            )
    if READY:
        if PDL:
            if first_program:
                gdc_wait()


def _check_fused_down(
    block_n1: int,
    block_n2: int,
    split_k2: int,
    n_tiles2: int,
    unroll2: int,
    ready: Optional[torch.Tensor],
    result: Optional[torch.Tensor],
    a2_static: Optional[torch.Tensor],
) -> None:
    """Raise ValueError for a ``fused_down`` configuration :func:`swapab_fp8` cannot honour."""
    if SCALE_BLOCK % block_n1 or (a2_static is None and block_n1 != SCALE_BLOCK):
        raise ValueError(
            f"config: FUSED_DOWN quantizes GEMM1's tile as one group of the intermediate: BLOCK_N1 must divide "
            f"{SCALE_BLOCK} (be {SCALE_BLOCK} with dynamic activation scales), got {block_n1}"
        )
    if block_n2 < 1 or block_n2 & (block_n2 - 1):
        raise ValueError(f"config: FUSED_DOWN's BLOCK_N2 (w2 rows a tile) must be a power of two, got {block_n2}")
    knobs = dict(SPLIT_K2=split_k2, N_TILES2=n_tiles2, UNROLL2=unroll2)
    if knobs != dict(SPLIT_K2=1, N_TILES2=1, UNROLL2=1) or ready is not None or result is not None:
        raise ValueError(
            "config: FUSED_DOWN has no GEMM2 launch: it needs SPLIT_K2=1, N_TILES2=1, UNROLL2=1, "
            f"WAIT2='grid' and FUSED_CAST2=False, got {knobs}, WAIT2={'expert' if ready is not None else 'grid'!r}, "
            f"FUSED_CAST2={result is not None}"
        )


def line_rows(rows: int, width: int, dtype: torch.dtype, device: torch.device, role: str) -> torch.Tensor:
    """A ``[rows, width]`` view of the ``role`` workspace whose rows start 128 bytes apart or a
    multiple of it (each row on lines of its own)."""
    per_line = 128 // dtype.itemsize
    return workspace(rows, triton.cdiv(width, per_line) * per_line, dtype, device, role)[:, :width]


def swapab_fp8(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    acc: torch.Tensor,
    *,
    local_expert_offset: int,
    block_scaled: bool,
    a13_static: Optional[torch.Tensor],
    a2_static: Optional[torch.Tensor],
    ue8m0: bool,
    weight_on_input: bool,
    BLOCK_T: int,
    BLOCK_N1: int,
    BLOCK_N2: int,
    SPLIT_K2: int,
    num_warps1: int,
    num_stages1: int,
    num_warps2: int,
    num_stages2: int,
    quant_on_load: bool,
    quant_out: bool,
    pdl: bool,
    zeroed: Optional[torch.cuda.Event] = None,
    zero_in_gemm1: bool = True,
    N_TILES2: int = 1,
    result: Optional[torch.Tensor] = None,
    PREFETCH1: int = 0,
    PREFETCH2: int = 0,
    ready: Optional[torch.Tensor] = None,
    by_expert: bool = False,
    UNROLL1: int = 1,
    UNROLL2: int = 1,
    fused_down: bool = False,
) -> None:
    """Both GEMMs: ``acc[t] += sum_j w[t, j] * expert(ids[t, j])(hidden[t])`` (fp32, atomics).

    Args:
        hidden: ``[T, H]`` bf16 contiguous, ``T * k <= MAX_PAIRS``.
        w13, w13_scale, w2, w2_scale: as ``fp8_moe.fused_experts_fp8`` takes them.
        topk_ids, topk_weights: ``[T, k]`` int32 / fp32, contiguous.
        acc: ``[T, H]`` fp32 contiguous; GEMM1 zeroes it, GEMM2 adds into it.
        a13_static / a2_static: ``[1]`` fp32 static activation scales, or None for dynamic.
        BLOCK_T: pairs per MMA (its N side, >= 16); BLOCK_N1: gate (and up) rows of a GEMM1
            tile; BLOCK_N2: ``w2`` rows of a GEMM2 tile; SPLIT_K2: slices of ``I`` in GEMM2.
        quant_on_load: GEMM1 quantizes the hidden states as it loads them (else one
            ``act_quant`` launch first; the router weight on the input always quantizes on load).
        quant_out: GEMM1's epilogue writes ``y`` in e4m3 with per-128 scales (``BLOCK_N1`` 128
            with dynamic scales), so GEMM2 loads FP8 directly (else fp32, quantized on load).
        pdl: launch GEMM2 as a programmatic dependent launch (it starts while GEMM1's last
            programs run and waits for GEMM1 before reading ``y``); on a GPU only.
        zero_in_gemm1: GEMM1's programs zero ``acc`` (else the caller zeroed it or is zeroing it).
        zeroed: an event GEMM2 waits for (the caller's zeroing of ``acc`` on another stream).
        N_TILES2: consecutive ``BLOCK_N2``-row tiles of ``w2`` per GEMM2 program.
        result: ``[T, H]`` bf16 contiguous: GEMM2 writes the rounded sum itself (the fused cast;
            needs ``zero_in_gemm1``: GEMM1 zeroes ``result`` and the arrival counters); None:
            the caller casts ``acc``.
        PREFETCH1: K blocks (one of :data:`PREFETCH_BLOCKS`) of each ``w13`` row of its tile that a
            GEMM1 program asks L2 for first; with ``pdl`` and the input quantized by a separate
            ``act_quant`` launch (not ``quant_on_load``), GEMM1 is launched as that launch's
            programmatic dependent, so the prefetch runs beside it; 0: neither.
        PREFETCH2: K blocks (one of :data:`PREFETCH_BLOCKS`) of each ``w2`` row of its first
            tile that a GEMM2 program asks L2 for before waiting on GEMM1 (with ``pdl`` it runs
            beside GEMM1's tail); 0: none. Skipped under the interpreter (a hint, no value).
        ready: ``[E + 1]`` int32 counters at 0 (``runtime.counters``), or None. Given, GEMM2's
            programs wait for their own expert instead of all of GEMM1: GEMM1 runs an expert's
            tiles as consecutive programs and counts each stored tile in ``ready[expert]`` and
            each zeroing share in ``ready[E]``; a GEMM2 program spins until both are complete
            and reads ``y`` past L1. The counters stay counted: the caller's next launch resets
            them (``combine.cast_out(reset=ready)``). Needs ``zero_in_gemm1`` and no fused cast.
        by_expert: with fewer local experts than pairs, one program (per tile) for each local
            expert instead of each pair (:func:`tiles.local_expert_members`); the same pairs in
            the same chunks, so the same numerics.
        UNROLL1, UNROLL2: K blocks a GEMM1 / GEMM2 pipeline iteration loads and multiplies (one
            of :data:`UNROLL_BLOCKS`): its CTA barrier and waits are paid once for them.
        fused_down: no GEMM2 launch: each GEMM1 program multiplies its ``BLOCK_N1`` columns of
            the intermediate by the same columns of ``w2`` (:func:`down_slice`, ``BLOCK_N2`` rows
            a tile on ``num_stages2`` stages) and adds the result into ``acc`` atomically, so
            ``y`` never reaches memory and the weight stream has no launch boundary. ``acc`` is
            then zeroed before GEMM1: by ``act_quant``'s launch (``zero_in_gemm1`` with a
            pre-quantized input), else by a memset here, or by the caller. ``PREFETCH2`` then
            counts the ``BLOCK_N2``-row tiles of the program's ``w2`` columns it asks L2 for one
            K iteration before GEMM1's loop ends. Needs ``BLOCK_N1`` dividing 128 (128 with dynamic
            scales), ``BLOCK_N2`` a power of two, no ``ready``, ``result``, ``SPLIT_K2``,
            ``N_TILES2`` or ``UNROLL2`` (GEMM2's launch).

    Raises:
        ValueError: a tile that would mix block scales, an e4m3 intermediate with dynamic
            scales whose GEMM1 tile is not one scale block wide, N_TILES2 < 1, PREFETCH1 or
            PREFETCH2 not in :data:`PREFETCH_BLOCKS`, the fused cast without GEMM1's zeroing, or
            ``ready`` with the fused cast or without GEMM1's zeroing, UNROLL1 or UNROLL2 not in
            :data:`UNROLL_BLOCKS`, ``fused_down`` with a knob of GEMM2's launch or an
            intermediate tile that is not one scale group.
    """
    e, two_i, h = w13.shape
    inter = two_i // 2
    num_pairs = topk_ids.numel()
    top_k = topk_ids.shape[1]
    if num_pairs > MAX_PAIRS:
        raise ValueError(
            f"config: path='swapab' serves at most {MAX_PAIRS} (token, slot) pairs, got T * k = {num_pairs}"
        )
    if fused_down:
        _check_fused_down(BLOCK_N1, BLOCK_N2, SPLIT_K2, N_TILES2, UNROLL2, ready, result, a2_static)
    elif block_scaled and (SCALE_BLOCK % BLOCK_N1 or SCALE_BLOCK % BLOCK_N2):
        raise ValueError(
            f"config: BLOCK_N1 and BLOCK_N2 must divide the weight scale block {SCALE_BLOCK} (a tile's rows "
            f"share one block scale per K block), got {BLOCK_N1} and {BLOCK_N2}"
        )
    if quant_out and a2_static is None and BLOCK_N1 != SCALE_BLOCK:
        raise ValueError(
            f"config: QUANT_OUT1 with dynamic activation scales needs BLOCK_N1 = {SCALE_BLOCK} (one "
            f"per-128 scale per GEMM1 tile), got BLOCK_N1 = {BLOCK_N1}"
        )
    if isinstance(N_TILES2, bool) or not isinstance(N_TILES2, int) or N_TILES2 < 1:
        raise ValueError(f"config: N_TILES2 must be an int >= 1, got {N_TILES2!r}")
    for name, blocks in (("PREFETCH1", PREFETCH1), ("PREFETCH2", PREFETCH2)):
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks not in PREFETCH_BLOCKS:
            raise ValueError(f"config: {name} must be one of {PREFETCH_BLOCKS}, got {blocks!r}")
    if result is not None and not zero_in_gemm1:
        raise ValueError(
            "config: FUSED_CAST2 needs ZERO='fused' (GEMM1 zeroes the output rows of tokens without a local "
            "expert and GEMM2's arrival counters)"
        )
    if ready is not None and (result is not None or not zero_in_gemm1):
        raise ValueError(
            "config: WAIT2='expert' needs ZERO='fused' and FUSED_CAST2=False (GEMM2 counts GEMM1's zeroing "
            "shares, and the cast launch resets the counters)"
        )
    for name, blocks in (("UNROLL1", UNROLL1), ("UNROLL2", UNROLL2)):
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks not in UNROLL_BLOCKS:
            raise ValueError(f"config: {name} must be one of {UNROLL_BLOCKS}, got {blocks!r}")
    if ready is not None:
        assert ready.dtype == torch.int32 and ready.is_contiguous() and ready.numel() == e + 1
    pairs_pad = gather_scan_width(num_pairs)
    dev = hidden.device
    dummy = w13_scale  # stands for pointers a variant does not read
    quant_on_load = quant_on_load or weight_on_input
    # GEMM1 as act_quant's programmatic dependent: its prefetch runs beside the quantization.
    gemm1_waits = pdl and PREFETCH1 > 0 and not quant_on_load
    # The fused down projection adds into acc from GEMM1's programs: zeroed by a launch before.
    zero_first = fused_down and zero_in_gemm1
    if zero_first and quant_on_load:
        acc.zero_()
    x, x_scale = (
        (hidden, dummy)
        if quant_on_load
        else act_quant_fp8(hidden, a13_static, ue8m0, launch_dependents=gemm1_waits, zero=acc if zero_first else None)
    )
    # Each pair's row of y and of its scales starts on a 128-byte line (no line holds two pairs':
    # ``wait_count``). The fused down projection keeps y in registers.
    if fused_down:
        y, y_scale = dummy, dummy
    elif quant_out:
        y = line_rows(num_pairs, inter, torch.float8_e4m3fn, dev, "moe_intermediate")
        y_scale = (
            dummy
            if a2_static is not None
            else line_rows(num_pairs, triton.cdiv(inter, SCALE_BLOCK), torch.float32, dev, "moe_intermediate_scale")
        )
    else:
        y, y_scale = line_rows(num_pairs, inter, torch.float32, dev, "moe_intermediate"), dummy
    a13 = a13_static if a13_static is not None else dummy
    a2 = a2_static if a2_static is not None else dummy
    num_tiles2 = triton.cdiv(h, BLOCK_N2)
    fused = result is not None
    if result is not None:
        assert result.is_contiguous() and result.shape == acc.shape and result.dtype == torch.bfloat16
        out_rows = result
        arrivals = workspace(acc.shape[0], num_tiles2, torch.int32, dev, "moe_arrivals")
    else:
        out_rows, arrivals = acc, acc  # not read
    tiles1 = triton.cdiv(inter, BLOCK_N1)
    expert_wait = ready is not None
    grid_by_expert = by_expert and e < num_pairs
    slots = e if grid_by_expert else num_pairs  # programs (per tile) that may lead an expert
    expert_major = expert_wait or fused_down
    if fused_down and zeroed is not None:
        torch.cuda.current_stream(dev).wait_event(zeroed)
    _gemm1_kernel[(tiles1, slots) if expert_major else (slots, tiles1)](
        x,
        x_scale,
        w13,
        w13_scale,
        y,
        y_scale,
        topk_ids,
        topk_weights,
        a13,
        a2,
        acc,
        acc.numel() if zero_in_gemm1 and not fused_down else 0,
        out_rows,
        out_rows.numel() if fused else 0,
        arrivals,
        arrivals.numel() if fused else 0,
        ready if expert_wait else arrivals,
        w2,
        w2_scale,
        acc,
        num_pairs,
        local_expert_offset,
        e,
        h,
        inter,
        top_k,
        x.stride(0),
        x_scale.stride(0),
        w13.stride(0),
        w13.stride(1),
        w13_scale.stride(0),
        w13_scale.stride(1) if block_scaled else 0,
        y.stride(0),
        y_scale.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2_scale.stride(0),
        w2_scale.stride(1) if block_scaled else 0,
        acc.stride(0),
        PAIRS=pairs_pad,
        BLOCK_T=BLOCK_T,
        BLOCK_N=BLOCK_N1,
        BLOCK_K=SCALE_BLOCK,
        QUANT_ON_LOAD=quant_on_load,
        A_STATIC=a13_static is not None,
        QUANT_OUT=quant_out,
        Y_STATIC=a2_static is not None,
        BLOCK_SCALED=block_scaled,
        UE8M0=ue8m0,
        WEIGHT_ON_INPUT=weight_on_input,
        EVEN_K=h % SCALE_BLOCK == 0 and triton.cdiv(h, SCALE_BLOCK) % UNROLL1 == 0,
        PDL=pdl,
        PREFETCH=0 if INTERPRETING else PREFETCH1,
        WAIT_INPUT=gemm1_waits,
        READY=expert_wait,
        BY_EXPERT=grid_by_expert,
        UNROLL=UNROLL1,
        EXPERT_MAJOR=expert_major,
        DOWN=fused_down,
        BLOCK_H=BLOCK_N2,
        DOWN_STAGES=num_stages2,
        EVEN_DOWN=h % BLOCK_N2 == 0 and inter % BLOCK_N1 == 0,
        DOWN_PREFETCH=PREFETCH2 if fused_down and not INTERPRETING else 0,
        num_warps=num_warps1,
        num_stages=num_stages1,
        **({"launch_pdl": True} if gemm1_waits else {}),
    )
    if fused_down:
        return
    if zeroed is not None:
        torch.cuda.current_stream(dev).wait_event(zeroed)
    k_blocks = triton.cdiv(inter, SCALE_BLOCK)
    per_split = triton.cdiv(k_blocks, SPLIT_K2)
    programs2 = triton.cdiv(num_tiles2, N_TILES2)
    splits2 = triton.cdiv(k_blocks, per_split)
    _gemm2_kernel[(programs2, slots, splits2) if expert_wait else (slots, programs2, splits2)](
        y,
        y_scale,
        w2,
        w2_scale,
        acc,
        out_rows,
        arrivals,
        ready if expert_wait else arrivals,
        tiles1,
        slots * tiles1,
        topk_ids,
        topk_weights,
        a2,
        num_pairs,
        local_expert_offset,
        e,
        h,
        inter,
        top_k,
        per_split,
        num_tiles2,
        y.stride(0),
        y_scale.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2_scale.stride(0),
        w2_scale.stride(1) if block_scaled else 0,
        acc.stride(0),
        out_rows.stride(0),
        arrivals.stride(0),
        PAIRS=pairs_pad,
        TOPK_PAD=triton.next_power_of_2(top_k),
        BLOCK_T=BLOCK_T,
        BLOCK_N=BLOCK_N2,
        BLOCK_K=SCALE_BLOCK,
        N_TILES=N_TILES2,
        FUSED_CAST=fused,
        QUANT_ON_LOAD=not quant_out,
        Y_STATIC=a2_static is not None,
        BLOCK_SCALED=block_scaled,
        UE8M0=ue8m0,
        WEIGHT_ON_INPUT=weight_on_input,
        EVEN_K=inter % SCALE_BLOCK == 0 and per_split % UNROLL2 == 0 and k_blocks % UNROLL2 == 0,
        PDL=pdl,
        PREFETCH=0 if INTERPRETING else PREFETCH2,
        READY=expert_wait,
        BY_EXPERT=grid_by_expert,
        UNROLL=UNROLL2,
        num_warps=num_warps2,
        num_stages=num_stages2,
        maxnreg=GATHER_MAXNREG,
        **({"launch_pdl": True} if pdl else {}),
    )
