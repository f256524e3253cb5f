"""Deterministic, realistic profiling inputs for autotuning (docs/design.md §8.2).

The top-k assignment is the balanced "approximate max load" of one EP rank: with
``ep = E_global / E_local`` and ``avg = T * k / ep`` (the rank's mean load), the
rank receives ``min(T * k, ceil(avg + sqrt(avg * ln ep)))`` (token, slot) pairs, a
typical maximum over the ``ep`` ranks, so a tactic is tuned for the most loaded
rank that sets the step time. The load is split evenly over the local experts
(remainder to the first ones); each expert takes its quota of distinct tokens in
a seeded random order, preferring the tokens with the most free slots (which
always leaves room for the experts after it); an expert with quota 0 gets none.

Slots a token does not fill with local experts hold distinct experts of other
ranks (chosen with the seed), so every row carries ``k`` distinct global ids like
a real router's output; the kernels treat non-local ids as no-ops. Within a
row the slots are shuffled so local experts do not always sit in the first columns.

Everything comes from a ``torch.Generator`` seeded by the caller: the same
arguments give the same tensors in every instance and process (for the same
torch version; hidden states and logits are drawn on the target device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple, Union

import torch

from .._checks import check_device, check_int

Device = Union[str, torch.device]


def rank_load(num_tokens: int, top_k: int, num_experts: int, num_local_experts: int) -> int:
    """The rank's (token, slot) pairs: ``min(T*k, T*E_local, ceil(avg + sqrt(avg * ln ep)))``.

    The ``T * E_local`` bound (reached only when ``E_local < k``) keeps every
    expert's quota at most ``T``: an expert cannot take a token twice.
    """
    if num_tokens == 0:
        return 0
    ep = num_experts / num_local_experts
    avg = num_tokens * top_k / ep
    approx_max = math.ceil(avg + math.sqrt(avg * math.log(ep)))
    return min(num_tokens * top_k, num_tokens * num_local_experts, approx_max)


def expert_quotas(num_tokens: int, top_k: int, num_experts: int, num_local_experts: int) -> List[int]:
    """Tokens per local expert (index 0 is expert ``local_expert_offset``): the rank's load
    split evenly, the remainder to the first experts. Each quota is in ``[0, T]``."""
    load = rank_load(num_tokens, top_k, num_experts, num_local_experts)
    base, extra = divmod(load, num_local_experts)
    return [base + 1 if e < extra else base for e in range(num_local_experts)]


def _check_topk_args(
    num_tokens: int, top_k: int, num_experts: int, num_local_experts: int, local_expert_offset: int
) -> None:
    check_int("num_tokens", num_tokens, minimum=0)
    check_int("top_k", top_k, minimum=1)
    check_int("num_experts", num_experts, minimum=1)
    check_int("num_local_experts", num_local_experts, minimum=1)
    check_int("local_expert_offset", local_expert_offset, minimum=0)
    if top_k > num_experts:
        raise ValueError(f"top_k: expected at most num_experts ({num_experts}), got {top_k}")
    if local_expert_offset + num_local_experts > num_experts:
        raise ValueError(
            f"local_expert_offset: experts [{local_expert_offset}, {local_expert_offset + num_local_experts})"
            f" exceed num_experts={num_experts}"
        )


def profiling_topk(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    num_local_experts: int,
    local_expert_offset: int = 0,
    *,
    seed: int = 0,
    device: Device = "cpu",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded "approximate max load" top-k for the rank holding experts
    ``[local_expert_offset, local_expert_offset + num_local_experts)`` of ``num_experts``.

    Returns ``(topk_ids [T, k] int32, topk_weights [T, k] fp32)`` on ``device``: global
    expert ids, distinct within a row (local quotas per :func:`expert_quotas`, the other
    slots experts of other ranks); weights positive, each row summing to 1.
    """
    _check_topk_args(num_tokens, top_k, num_experts, num_local_experts, local_expert_offset)
    check_int("seed", seed, minimum=0)
    device = check_device("device", device)
    t, k = num_tokens, top_k
    gen = torch.Generator().manual_seed(seed)  # CPU: the integer algorithm is exact and cheap there
    ids = torch.full((t, k), -1, dtype=torch.int32)
    used = torch.zeros(t, dtype=torch.int64)  # slots filled per token
    for e, quota in enumerate(expert_quotas(t, k, num_experts, num_local_experts)):
        if quota == 0:
            break  # quotas are non-increasing: the remaining experts get nothing
        # Tokens with the most free slots first, random among equals: free slots then stay
        # within one of each other, so the later experts always find `quota` free tokens.
        priority = (k - used) * t + torch.randperm(t, generator=gen)
        chosen = priority.topk(quota).indices
        ids[chosen, used[chosen]] = local_expert_offset + e
        used[chosen] += 1
    _fill_remote(ids, used, num_experts, num_local_experts, local_expert_offset, gen)
    # Shuffle each row's slots so local experts are not always in the first columns.
    perm = torch.rand(t, k, generator=gen).argsort(dim=1)
    ids = ids.gather(1, perm)
    weights = torch.rand(t, k, generator=gen) + 0.05  # keep weights away from 0
    weights /= weights.sum(dim=1, keepdim=True)
    return ids.to(device), weights.to(device)


def _fill_remote(
    ids: torch.Tensor,
    used: torch.Tensor,
    num_experts: int,
    num_local_experts: int,
    local_expert_offset: int,
    gen: torch.Generator,
) -> None:
    """Fill slots ``[used[t], k)`` of each row of ``ids [T, k]`` with distinct experts of
    other ranks, in place.

    There are always enough: the balanced fill gives every token at least
    ``floor(load / T) >= k - (E_global - E_local)`` local experts, because the load is at
    least ``avg = T * k * E_local / E_global`` (or capped at ``T * k`` or ``T * E_local``).
    """
    t, k = ids.shape
    num_remote = num_experts - num_local_experts
    if t == 0 or num_remote == 0:
        return
    # A random ranking of the remote experts per token, mapped to global ids around the
    # rank's own range; free slot j of token t takes ranking entry j - used[t].
    remote = torch.rand(t, num_remote, generator=gen).argsort(dim=1)
    remote = torch.where(remote >= local_expert_offset, remote + num_local_experts, remote)
    slot = torch.arange(k)
    free = slot[None, :] >= used[:, None]  # [T, k]
    fill = remote.gather(1, (slot[None, :] - used[:, None]).clamp(min=0))
    ids[free] = fill[free].to(torch.int32)


def profiling_hidden(
    num_tokens: int, hidden_size: int, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: Device = "cpu"
) -> torch.Tensor:
    """Seeded hidden states ``[T, H]`` (default bf16), standard normal."""
    check_int("num_tokens", num_tokens, minimum=0)
    check_int("hidden_size", hidden_size, minimum=1)
    check_int("seed", seed, minimum=0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    device = check_device("device", device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(num_tokens, hidden_size, generator=gen, device=device).to(dtype)


def profiling_router_logits(
    num_tokens: int, num_experts: int, *, seed: int = 0, device: Device = "cpu"
) -> torch.Tensor:
    """Seeded router logits ``[T, num_experts]`` fp32, standard normal."""
    check_int("num_tokens", num_tokens, minimum=0)
    check_int("num_experts", num_experts, minimum=1)
    check_int("seed", seed, minimum=0)
    device = check_device("device", device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=gen, device=device)


@dataclass(frozen=True)
class MoEInputs:
    """One profiling batch for a routed fused-experts call.

    ``hidden [T, H]`` bf16, ``topk_ids [T, k]`` int32 global ids, ``topk_weights [T, k]`` fp32.
    """

    hidden: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


def moe_inputs(
    num_tokens: int,
    hidden_size: int,
    top_k: int,
    num_experts: int,
    num_local_experts: int,
    local_expert_offset: int = 0,
    *,
    seed: int = 0,
    device: Device = "cpu",
) -> MoEInputs:
    """Hidden states and approximate-max-load top-k for one bucket (the tuner's input factory)."""
    ids, weights = profiling_topk(
        num_tokens, top_k, num_experts, num_local_experts, local_expert_offset, seed=seed, device=device
    )
    hidden = profiling_hidden(num_tokens, hidden_size, seed=seed, device=device)
    return MoEInputs(hidden, ids, weights)
