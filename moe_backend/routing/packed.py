"""Packed top-k codec: one int32 per (token, slot).

``packed = (expert_id << 16) | bf16_bits(weight)``: the id in the high 16 bits
(signed, so ``-1`` means "no expert"), the bf16 bit pattern of the router weight
in the low 16 bits. This is the layout FlashInfer's routed kernels read (a
little-endian struct ``{bf16 score; int16 idx}``).
"""

from __future__ import annotations

from typing import Tuple

import torch

from .._checks import capturing, check_tensor

MAX_PACKED_ID = 1 << 15  # ids must be < 32768 to fit the signed high half


def check_id_range(name: str, ids: torch.Tensor) -> None:
    """Refuse ids outside ``[-1, 32768)``: they do not fit the packed format's signed 16 bits
    (nor an int16 replay buffer), so they would be recorded wrapped.

    Reads the values (one device sync) except while a CUDA graph is being captured, where the
    caller guarantees the range.
    """
    if capturing() or not ids.numel():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1 or hi >= MAX_PACKED_ID:
        raise ValueError(f"{name}: expected expert ids in [-1, {MAX_PACKED_ID}), got values in [{lo}, {hi}]")


def pack_topk(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pack ``ids [T, k]`` (int32, in ``[-1, 32768)``) and ``weights [T, k]`` (fp32 or
    bf16; rounded to bf16) into ``[T, k]`` int32.

    The id range is checked on the values (one device sync) except while a CUDA
    graph is being captured, where the caller guarantees it.
    """
    check_tensor("ids", ids, dtype=torch.int32, ndim=2)
    check_tensor("weights", weights, dtype=(torch.float32, torch.bfloat16), shape=tuple(ids.shape), device=ids.device)
    check_id_range("ids", ids)
    bits = weights.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return (ids << 16) | bits


def unpack_topk(packed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_topk`: ``packed [T, k]`` int32 -> ``(ids int32, weights fp32)``."""
    check_tensor("topk", packed, dtype=torch.int32, ndim=2)
    ids = packed >> 16  # arithmetic shift keeps -1
    bits = (packed & 0xFFFF).to(torch.int16)  # wraps to the same 16-bit pattern
    return ids, bits.view(torch.bfloat16).float()
