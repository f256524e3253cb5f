"""Token -> expert grouping for the varlen grouped GEMMs: unpadded segments, one per active expert.

The (token, slot) pairs ``p = t * k + j`` of ``topk_ids [T, k]`` are sorted by local expert
(stable: within an expert, pairs keep their order, so results are deterministic); pairs whose id
is -1 or outside ``[offset, offset + E)`` sort last and get no row. With ``compact``, experts that receive no
pair get no segment: segment ``s`` belongs to the ``s``-th active expert, so a kernel that stages weights per
segment (NVFP4 dequantized to bf16) touches only the active experts; without it segment ``s`` is
local expert ``s`` (weights read in place, bf16). Every size is
static in ``(T, k, E)`` and nothing synchronizes with the host (CUDA-graph capturable).

Three Triton launches on ``align``'s counting sort: its per-chunk histograms (``count_chunks``),
one program that turns them into per-chunk bases (``chunk_prefix``) and writes the segments, and
the stable placement of each chunk (``chunk_rows``: a pair's rank among its expert's pairs from
an in-register sort). The torch version of the same steps took about 30 launches, ~80 us of a
1024-token layer (H200).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .align import CHUNK, chunk_block, chunk_prefix, chunk_rows, count_chunks


class VarlenRouting(NamedTuple):
    """Pairs grouped into per-expert row segments.

    ``cu_seqlens [S + 1]`` int32: segment ``s`` is rows ``[cu[s], cu[s + 1])``; trailing segments
    (past the active experts) are empty. ``S``: :func:`num_segments`.
    ``expert_of_segment [S]`` int32: local expert of each segment, -1 for an empty trailing one.
    ``token_of_row [T * k]`` int32: token of each row (rows past ``cu[S]`` hold tokens of pairs
    without a local expert; no kernel reads them).
    ``row_of_pair [T * k]`` int32: row of each pair, -1 for a pair without a local expert.
    """

    cu_seqlens: torch.Tensor
    expert_of_segment: torch.Tensor
    token_of_row: torch.Tensor
    row_of_pair: torch.Tensor


def num_segments(num_pairs: int, num_experts: int, compact: bool) -> int:
    """Static segment count: one per local expert; compacted, also at most one per pair."""
    return min(num_experts, num_pairs) if compact else num_experts


@triton.jit
def _segments_kernel(
    hist_ptr,
    base_ptr,
    cu_ptr,
    expert_of_segment_ptr,
    num_chunks,
    num_experts,
    num_segments,
    COMPACT: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK_BLOCK: tl.constexpr,
):
    """One program: the histograms become each chunk's first row per expert (in place), the
    experts' start rows go to ``base`` (bin E after the last expert), and the segments are written."""
    e = tl.arange(0, E_PAD)
    total = chunk_prefix(hist_ptr, num_chunks, E_PAD, CHUNK_BLOCK)
    total = tl.where(e <= num_experts, total, 0)
    start = tl.cumsum(total, 0) - total
    tl.store(base_ptr + e, start)
    local = e < num_experts
    valid_rows = tl.sum(tl.where(local, total, 0), 0)
    if COMPACT:
        active = local & (total > 0)
        seg = tl.cumsum(active.to(tl.int32), 0) - 1
        n_active = tl.sum(active.to(tl.int32), 0)
    else:
        active = local
        seg = e
        n_active = num_experts
    tl.store(cu_ptr + seg, start, mask=active)
    tl.store(expert_of_segment_ptr + seg, e, mask=active)
    # empty trailing segments, and cu[S]
    for s0 in range(0, num_segments + 1, E_PAD):
        s = s0 + e
        trailing = (s >= n_active) & (s <= num_segments)
        tl.store(cu_ptr + s, tl.zeros([E_PAD], dtype=tl.int32) + valid_rows, mask=trailing)
        tl.store(expert_of_segment_ptr + s, tl.full([E_PAD], -1, tl.int32), mask=trailing & (s < num_segments))


@triton.jit
def _place_kernel(
    ids_ptr,
    hist_ptr,
    base_ptr,
    token_of_row_ptr,
    row_of_pair_ptr,
    num_pairs,
    top_k,
    expert_offset,
    num_experts,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Row of each pair = its expert's start + its expert's pairs in earlier chunks + its rank in
    this chunk (pairs without a local expert after every expert's, in pair order too)."""
    pair, s_key, row = chunk_rows(ids_ptr, hist_ptr, base_ptr, num_pairs, expert_offset, num_experts, CHUNK, E_PAD)
    in_range = pair < num_pairs
    tl.store(token_of_row_ptr + row, pair // top_k, mask=in_range)
    tl.store(row_of_pair_ptr + pair, tl.where(s_key < num_experts, row, -1), mask=in_range)


def varlen_routing(topk_ids: torch.Tensor, num_experts: int, local_expert_offset: int, compact: bool) -> VarlenRouting:
    """Group the pairs of ``topk_ids [T, k]`` (int32, contiguous, T * k > 0) into per-expert
    segments (``compact``: active experts only)."""
    assert topk_ids.dtype == torch.int32 and topk_ids.is_contiguous() and topk_ids.numel() > 0
    t, k = topk_ids.shape
    num_pairs = t * k
    dev = topk_ids.device
    s = num_segments(num_pairs, num_experts, compact)
    hist, base = count_chunks(topk_ids, num_experts, local_expert_offset)
    num_chunks, e_pad = hist.shape
    cu_seqlens = torch.empty(s + 1, dtype=torch.int32, device=dev)
    expert_of_segment = torch.empty(s, dtype=torch.int32, device=dev)
    token_of_row = torch.empty(num_pairs, dtype=torch.int32, device=dev)
    row_of_pair = torch.empty(num_pairs, dtype=torch.int32, device=dev)
    _segments_kernel[(1,)](
        hist,
        base,
        cu_seqlens,
        expert_of_segment,
        num_chunks,
        num_experts,
        s,
        COMPACT=compact,
        E_PAD=e_pad,
        CHUNK_BLOCK=chunk_block(e_pad),
        num_warps=8,
    )
    _place_kernel[(num_chunks,)](
        topk_ids,
        hist,
        base,
        token_of_row,
        row_of_pair,
        num_pairs,
        k,
        local_expert_offset,
        num_experts,
        CHUNK=CHUNK,
        E_PAD=e_pad,
        num_warps=4,
    )
    return VarlenRouting(cu_seqlens, expert_of_segment, token_of_row, row_of_pair)
