"""Token -> expert grouping for the varlen grouped GEMMs: unpadded segments, one per active expert.

The (token, slot) pairs ``p = t * k + j`` of ``topk_ids [T, k]`` are sorted by local expert
(stable: within an expert, pairs keep their order, so results are deterministic); pairs whose id
is -1 or outside ``[offset, offset + E)`` sort last and get no row. With ``compact``, experts that receive no
pair get no segment: segment ``s`` belongs to the ``s``-th active expert, so a kernel that stages weights per
segment (NVFP4 dequantized to bf16) touches only the active experts; without it segment ``s`` is
local expert ``s`` (weights read in place, bf16). Every size is
static in ``(T, k, E)`` and nothing synchronizes with the host (CUDA-graph capturable).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


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


def varlen_routing(topk_ids: torch.Tensor, num_experts: int, local_expert_offset: int, compact: bool) -> VarlenRouting:
    """Group the pairs of ``topk_ids [T, k]`` (int32, T * k > 0) into per-expert segments
    (``compact``: active experts only)."""
    t, k = topk_ids.shape
    num_pairs = t * k
    dev = topk_ids.device
    local = topk_ids.reshape(-1).long() - local_expert_offset
    valid = (topk_ids.reshape(-1) >= 0) & (local >= 0) & (local < num_experts)
    key = torch.where(valid, local, torch.full_like(local, num_experts))
    # row -> pair. The radix sort makes one pass per key byte: the keys (<= E) fit 16 bits, so
    # two passes instead of eight for int64.
    narrow = torch.int16 if num_experts < 2**15 else torch.int32
    order = torch.sort(key.to(narrow), stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    active = counts > 0
    s = num_segments(num_pairs, num_experts, compact)
    experts = torch.arange(num_experts, dtype=torch.long, device=dev)
    # Compacted, an active expert's segment is its rank among the active ones; inactive experts
    # write to a spare slot S that is cut off.
    seg = experts
    if compact:
        seg = torch.where(active, torch.cumsum(active.long(), 0) - 1, torch.full_like(counts, s))
    expert_of_segment = torch.full((s + 1,), -1, dtype=torch.long, device=dev)
    expert_of_segment.scatter_(0, seg, experts)
    seg_len = torch.zeros(s + 1, dtype=torch.long, device=dev)
    seg_len.scatter_(0, seg, counts)
    cu_seqlens = torch.zeros(s + 1, dtype=torch.int32, device=dev)
    cu_seqlens[1:] = torch.cumsum(seg_len[:s], 0).to(torch.int32)
    rows = torch.arange(num_pairs, dtype=torch.int32, device=dev)
    row_of_pair = torch.empty(num_pairs, dtype=torch.int32, device=dev).scatter_(0, order, rows)
    row_of_pair = torch.where(valid, row_of_pair, torch.full_like(row_of_pair, -1))
    token_of_row = (order // k).to(torch.int32)
    return VarlenRouting(cu_seqlens, expert_of_segment[:s].to(torch.int32).contiguous(), token_of_row, row_of_pair)
