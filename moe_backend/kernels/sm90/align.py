"""Token -> expert alignment on the GPU (moe_align_block_size), with no host sync.

The (token, slot) pairs ``p = t * k + j`` of ``topk_ids [T, k]`` are grouped by
LOCAL expert ``e = topk_ids[t, j] - local_expert_offset`` into tiles of
``BLOCK_M`` rows; each expert's rows are padded up to a whole tile with the
sentinel ``T * k``. Pairs whose id is -1 or outside ``[offset, offset + E)`` get
no row. Every size depends only on ``(T, k, E, BLOCK_M)``, never on the data,
so the result is capturable in a CUDA graph; the number of valid rows lives on
the device (``num_padded``) and the GEMMs skip tiles past it.

Two implementations of one algorithm (count, prefix-sum, scatter):

* up to ``FUSED_MAX_PAIRS`` pairs (decode): one program does everything, one launch;
* more pairs (prefill): chunks of ``CHUNK`` pairs are counted in parallel, one
  program scans the per-chunk counts, and the chunks scatter in parallel.

Inside a chunk, a pair's rank among the pairs of its expert comes from an
in-register sort of ``(expert, position)`` keys, so the order of rows within an
expert is the order of the pairs (deterministic).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple, Union

import torch
import triton
import triton.language as tl

#: Largest pair count (T * k) handled by the single-program kernel.
FUSED_MAX_PAIRS = 1024
#: Pairs per program in the multi-program path.
CHUNK = 1024


class AlignedRouting(NamedTuple):
    """Pairs grouped by local expert into tiles of ``block_m`` rows.

    ``sorted_ids [max_tiles * block_m]`` int32: pair index ``t * k + j``, or the
    sentinel ``T * k`` for padding (entries past ``num_padded`` are undefined);
    ``tile_expert [max_tiles]`` int32: local expert of each tile (undefined past
    ``num_padded / block_m``); ``num_padded [1]`` int32: rows in use, a multiple of
    ``block_m``; ``row_of_pair [T * k]`` int32: the row of each pair, -1 for none.
    """

    sorted_ids: torch.Tensor
    tile_expert: torch.Tensor
    num_padded: torch.Tensor
    row_of_pair: torch.Tensor
    block_m: int
    max_tiles: int


class GatheredPairs(NamedTuple):
    """The decode alternative to :class:`AlignedRouting`: no alignment launch; the kernels scan
    ``ids`` and each expert's leader pair gathers the expert's pairs, ``block_m`` at a time
    (``tiles.expert_members``). ``ids [T * k]`` int32 global ids (flattened top-k, contiguous),
    ``expert_offset`` the global id of local expert 0, ``num_experts`` the local experts."""

    ids: torch.Tensor
    expert_offset: int
    num_experts: int
    block_m: int


def row_source_args(
    routing: Union[AlignedRouting, GatheredPairs], num_experts: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """The GEMM kernels' row arguments for either routing: ``(rows, tile_expert, num_padded,
    expert_offset, num_experts, max_tiles)``; gathered pairs pass their ids as ``rows`` (the
    two aligned-only tensors repeat it, unread)."""
    if isinstance(routing, GatheredPairs):
        return routing.ids, routing.ids, routing.ids, routing.expert_offset, routing.num_experts, 0
    return routing.sorted_ids, routing.tile_expert, routing.num_padded, 0, num_experts, routing.max_tiles


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the padded row count.

    At most ``min(pairs, E)`` experts receive a pair and each pads by fewer than
    ``block_m`` rows: tighter than ``pairs + E * (block_m - 1)`` for decode.
    """
    return num_pairs + min(num_pairs, num_experts) * (block_m - 1)


@triton.jit
def _local_keys(ids_ptr, offs, num_pairs, expert_offset, num_experts):
    """Local expert of each pair, or ``num_experts`` (an extra bin) when it has none here."""
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    local = ids - expert_offset
    valid = (local >= 0) & (local < num_experts) & (offs < num_pairs) & (ids >= 0)
    return tl.where(valid, local, num_experts)


@triton.jit
def _ranks_in_chunk(keys, counts, N_PAD: tl.constexpr):
    """Sort a chunk's pairs by expert; return (position in chunk, expert, rank within expert).

    ``counts [E_PAD]`` is the chunk's histogram; ranks follow the pairs' order.
    """
    pos = tl.arange(0, N_PAD)
    packed = tl.sort(keys * N_PAD + pos)
    s_key = packed // N_PAD
    s_pos = packed % N_PAD
    first = tl.cumsum(counts, 0) - counts  # first sorted position of each expert
    rank = pos - tl.gather(first, s_key, 0)
    return s_pos, s_key, rank


@triton.jit
def _write_layout(
    counts,
    sorted_ptr,
    tile_expert_ptr,
    num_padded_ptr,
    sentinel,
    num_experts,
    max_tiles,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    TILE_BLOCK: tl.constexpr,
):
    """From per-expert counts: padded starts, sentinels in the padding, tile -> expert, total.

    Returns the padded start row of each expert ``[E_PAD]``.
    """
    e = tl.arange(0, E_PAD)
    counts = tl.where(e < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    # Padding rows of each expert: [start + count, end).
    j = tl.arange(0, BLOCK_M)
    pad_rows = (start + counts)[:, None] + j[None, :]
    pad_mask = j[None, :] < (padded - counts)[:, None]
    tl.store(sorted_ptr + pad_rows, tl.full([E_PAD, BLOCK_M], 0, tl.int32) + sentinel, mask=pad_mask)
    # Expert of tile i = number of experts whose rows end at or before row i * BLOCK_M.
    end_valid = tl.where(e < num_experts, end, 2147483647)
    for t0 in range(0, max_tiles, TILE_BLOCK):
        tiles = t0 + tl.arange(0, TILE_BLOCK)
        expert = tl.sum((end_valid[None, :] <= (tiles * BLOCK_M)[:, None]).to(tl.int32), 1)
        tl.store(tile_expert_ptr + tiles, expert, mask=tiles < max_tiles)
    return start


@triton.jit
def align_in_one_program(
    ids_ptr,
    sorted_ptr,
    tile_expert_ptr,
    num_padded_ptr,
    row_of_pair_ptr,
    num_pairs,
    expert_offset,
    num_experts,
    max_tiles,
    BLOCK_M: tl.constexpr,
    N_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    TILE_BLOCK: tl.constexpr,
):
    """All pairs in one program: count, lay out, scatter (decode sizes; the arguments of
    :func:`one_program_args`). Launched on its own with one program, and called by the first
    program of kernels that run other small work beside the alignment in the same launch
    (``nvfp4_act.align_and_permute``)."""
    offs = tl.arange(0, N_PAD)
    keys = _local_keys(ids_ptr, offs, num_pairs, expert_offset, num_experts)
    counts = tl.histogram(keys, E_PAD)
    start = _write_layout(
        counts,
        sorted_ptr,
        tile_expert_ptr,
        num_padded_ptr,
        num_pairs,
        num_experts,
        max_tiles,
        BLOCK_M,
        E_PAD,
        TILE_BLOCK,
    )
    s_pos, s_key, rank = _ranks_in_chunk(keys, counts, N_PAD)
    row = tl.gather(start, s_key, 0) + rank
    tl.store(sorted_ptr + row, s_pos, mask=s_key < num_experts)
    tl.store(row_of_pair_ptr + s_pos, tl.where(s_key < num_experts, row, -1), mask=s_pos < num_pairs)


@triton.jit
def count_kernel(ids_ptr, hist_ptr, num_pairs, expert_offset, num_experts, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    """hist[c, e] = pairs of chunk c routed to local expert e (bin E: none)."""
    c = tl.program_id(0)
    keys = _local_keys(ids_ptr, c * CHUNK + tl.arange(0, CHUNK), num_pairs, expert_offset, num_experts)
    tl.store(hist_ptr + c * E_PAD + tl.arange(0, E_PAD), tl.histogram(keys, E_PAD))


def chunk_block(e_pad: int) -> int:
    """Chunks' histograms :func:`chunk_prefix` loads at a time (about 8192 counts)."""
    return max(1, min(64, 8192 // e_pad))


@triton.jit
def chunk_prefix(hist_ptr, num_chunks, E_PAD: tl.constexpr, CHUNK_BLOCK: tl.constexpr):
    """``hist [num_chunks, E_PAD]`` per-chunk counts become, in place, each chunk's count of
    earlier chunks' pairs per expert (an exclusive prefix over chunks); returns the totals ``[E_PAD]``."""
    e = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, num_chunks, CHUNK_BLOCK):
        c = c0 + tl.arange(0, CHUNK_BLOCK)
        ptrs = hist_ptr + c[:, None] * E_PAD + e[None, :]
        mask = (c < num_chunks)[:, None]
        h = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(h, 0) - h + total[None, :], mask=mask)
        total += tl.sum(h, 0)
    return total


@triton.jit
def chunk_rows(
    ids_ptr, hist_ptr, base_ptr, num_pairs, expert_offset, num_experts, CHUNK: tl.constexpr, E_PAD: tl.constexpr
):
    """The rows of this program's chunk of pairs: ``base[e]`` (the expert's first row) + the
    expert's pairs in earlier chunks (``hist`` after :func:`chunk_prefix`) + the pair's rank in
    this chunk. Returns ``(pair, expert, row)`` in the chunk's sorted order (expert ``E``: none here)."""
    c = tl.program_id(0)
    keys = _local_keys(ids_ptr, c * CHUNK + tl.arange(0, CHUNK), num_pairs, expert_offset, num_experts)
    s_pos, s_key, rank = _ranks_in_chunk(keys, tl.histogram(keys, E_PAD), CHUNK)
    e = tl.arange(0, E_PAD)
    before = tl.load(base_ptr + e) + tl.load(hist_ptr + c * E_PAD + e)
    return c * CHUNK + s_pos, s_key, tl.gather(before, s_key, 0) + rank


@triton.jit
def _scan_kernel(
    hist_ptr,
    base_ptr,
    sorted_ptr,
    tile_expert_ptr,
    num_padded_ptr,
    num_chunks,
    num_pairs,
    num_experts,
    max_tiles,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK_BLOCK: tl.constexpr,
    TILE_BLOCK: tl.constexpr,
):
    """One program: hist -> exclusive prefix over chunks (in place), layout, per-chunk bases."""
    e = tl.arange(0, E_PAD)
    total = chunk_prefix(hist_ptr, num_chunks, E_PAD, CHUNK_BLOCK)
    start = _write_layout(
        total,
        sorted_ptr,
        tile_expert_ptr,
        num_padded_ptr,
        num_pairs,
        num_experts,
        max_tiles,
        BLOCK_M,
        E_PAD,
        TILE_BLOCK,
    )
    tl.store(base_ptr + e, start)


@triton.jit
def _scatter_kernel(
    ids_ptr,
    hist_ptr,
    base_ptr,
    sorted_ptr,
    row_of_pair_ptr,
    num_pairs,
    expert_offset,
    num_experts,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Row of each pair = expert start + pairs of earlier chunks + rank in this chunk."""
    pair, s_key, row = chunk_rows(ids_ptr, hist_ptr, base_ptr, num_pairs, expert_offset, num_experts, CHUNK, E_PAD)
    tl.store(sorted_ptr + row, pair, mask=s_key < num_experts)
    tl.store(row_of_pair_ptr + pair, tl.where(s_key < num_experts, row, -1), mask=pair < num_pairs)


def _e_pad(num_experts: int) -> int:
    """Histogram bins: the local experts and the "no local expert" bin, to a power of two."""
    return triton.next_power_of_2(num_experts + 1)


def _tile_block(e_pad: int) -> int:
    """Tiles whose expert ``_write_layout`` finds at a time (about 8192 comparisons)."""
    return max(16, min(128, 8192 // e_pad))


def count_chunks(
    topk_ids: torch.Tensor, num_experts: int, local_expert_offset: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count_kernel`` over chunks of ``CHUNK`` pairs: ``hist [num_chunks, E_PAD]`` int32 (bin
    ``E``: pairs without a local expert; ``E_PAD`` the next power of two above ``E``) and an
    uninitialised ``base [E_PAD]`` int32 for the experts' first rows."""
    num_pairs = topk_ids.numel()
    e_pad = _e_pad(num_experts)
    num_chunks = triton.cdiv(num_pairs, CHUNK)
    hist = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=topk_ids.device)
    count_kernel[(num_chunks,)](
        topk_ids, hist, num_pairs, local_expert_offset, num_experts, CHUNK=CHUNK, E_PAD=e_pad, num_warps=4
    )
    return hist, torch.empty(e_pad, dtype=torch.int32, device=topk_ids.device)


def empty_routing(num_pairs: int, num_experts: int, block_m: int, device: torch.device) -> AlignedRouting:
    """Uninitialised :class:`AlignedRouting` tensors for ``num_pairs`` pairs (sizes independent of
    the data, so a CUDA graph can capture their filling)."""
    max_tiles = triton.cdiv(max_padded_rows(num_pairs, num_experts, block_m), block_m)
    return AlignedRouting(
        torch.empty(max_tiles * block_m, dtype=torch.int32, device=device),
        torch.empty(max_tiles, dtype=torch.int32, device=device),
        torch.empty(1, dtype=torch.int32, device=device),
        torch.empty(num_pairs, dtype=torch.int32, device=device),
        block_m,
        max_tiles,
    )


def one_program_args(
    topk_ids: torch.Tensor, routing: AlignedRouting, num_experts: int, local_expert_offset: int
) -> Tuple[tuple, Dict[str, int]]:
    """Positional and constexpr arguments of :func:`align_in_one_program` that fill ``routing``
    from ``topk_ids`` (at most ``FUSED_MAX_PAIRS`` pairs)."""
    num_pairs = topk_ids.numel()
    assert num_pairs <= FUSED_MAX_PAIRS
    e_pad = _e_pad(num_experts)
    args = (
        topk_ids,
        routing.sorted_ids,
        routing.tile_expert,
        routing.num_padded,
        routing.row_of_pair,
        num_pairs,
        local_expert_offset,
        num_experts,
        routing.max_tiles,
    )
    consts = dict(
        BLOCK_M=routing.block_m,
        N_PAD=max(16, triton.next_power_of_2(num_pairs)),
        E_PAD=e_pad,
        TILE_BLOCK=_tile_block(e_pad),
    )
    return args, consts


def align_block_size(
    topk_ids: torch.Tensor, num_experts: int, local_expert_offset: int, block_m: int
) -> AlignedRouting:
    """Group the pairs of ``topk_ids [T, k]`` (int32, contiguous, T * k > 0) by local expert.

    Launches one kernel up to ``FUSED_MAX_PAIRS`` pairs, three above; allocates only
    data-independent sizes.
    """
    assert topk_ids.dtype == torch.int32 and topk_ids.is_contiguous() and topk_ids.numel() > 0
    num_pairs = topk_ids.numel()
    routing = empty_routing(num_pairs, num_experts, block_m, topk_ids.device)
    sorted_ids, tile_expert, num_padded, row_of_pair, _, max_tiles = routing
    e_pad = _e_pad(num_experts)
    if num_pairs <= FUSED_MAX_PAIRS:
        args, consts = one_program_args(topk_ids, routing, num_experts, local_expert_offset)
        align_in_one_program[(1,)](*args, **consts, num_warps=4)
    else:
        hist, base = count_chunks(topk_ids, num_experts, local_expert_offset)
        num_chunks = hist.shape[0]
        _scan_kernel[(1,)](
            hist,
            base,
            sorted_ids,
            tile_expert,
            num_padded,
            num_chunks,
            num_pairs,
            num_experts,
            max_tiles,
            BLOCK_M=block_m,
            E_PAD=e_pad,
            CHUNK_BLOCK=chunk_block(e_pad),
            TILE_BLOCK=_tile_block(e_pad),
            num_warps=8,
        )
        _scatter_kernel[(num_chunks,)](
            topk_ids,
            hist,
            base,
            sorted_ids,
            row_of_pair,
            num_pairs,
            local_expert_offset,
            num_experts,
            CHUNK=CHUNK,
            E_PAD=e_pad,
            num_warps=8,
        )
    return routing
