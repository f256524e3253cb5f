"""Routing-replay output: the selected global expert ids, recorded per token.

Contract (docs/design.md §3.5): ``routing_replay_out`` is int16, 2-D ``[R, k]`` with
``R >= T``, contiguous, on the tokens' device. Rows ``[0, T)`` receive the ids
in top-k column order; rows ``>= T`` are left untouched, so one buffer sized for
the engine's max tokens serves every CUDA-graph bucket.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor


def check_replay_out(replay_out: Optional[torch.Tensor], num_tokens: int, top_k: int, device: torch.device) -> None:
    """Validate a replay buffer for ``num_tokens`` tokens and ``top_k`` slots (None is allowed)."""
    if replay_out is None:
        return
    check_tensor("routing_replay_out", replay_out, dtype=torch.int16, shape=(None, top_k), device=device)
    if replay_out.shape[0] < num_tokens:
        raise ValueError(
            f"routing_replay_out: expected at least {num_tokens} rows (one per token), "
            f"got shape {tuple(replay_out.shape)}"
        )


def write_routing_replay(ids: torch.Tensor, replay_out: Optional[torch.Tensor]) -> None:
    """Copy ``ids [T, k]`` (global, int32) into ``replay_out[:T]`` as int16 (no-op for None)."""
    if replay_out is None:
        return
    check_replay_out(replay_out, ids.shape[0], ids.shape[1], ids.device)
    replay_out[: ids.shape[0]].copy_(ids)
