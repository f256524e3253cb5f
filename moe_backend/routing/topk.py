"""Top-k expert selection from router logits.

All functions take router logits ``[T, E]`` (fp32, the global expert count E) and
return ``(ids [T, k] int32, weights [T, k] fp32)`` with ids global. Ties are broken
towards the lower expert index everywhere (a stable descending sort), so results
are deterministic and match a plain loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .._checks import check_bool, check_int, check_real, check_tensor

METHODS = ("noaux_tc", "renormalize", "softmax", "sigmoid")


def _topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, lower index first among equals."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def _check_logits(logits: torch.Tensor, top_k: int) -> None:
    check_tensor("router_logits", logits, dtype=torch.float32, ndim=2)
    check_int("top_k", top_k, minimum=1)
    if top_k > logits.shape[1]:
        raise ValueError(f"top_k: expected at most the number of experts ({logits.shape[1]}), got {top_k}")


def _gather(values: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return ids.to(torch.int32), values.gather(1, ids).float()


def check_grouping(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """Validate DeepSeek-V3 grouping parameters against the expert count and top-k."""
    check_int("n_group", n_group, minimum=1)
    check_int("topk_group", topk_group, minimum=1)
    if num_experts % n_group:
        raise ValueError(f"n_group: expected a divisor of the expert count {num_experts}, got {n_group}")
    if topk_group > n_group:
        raise ValueError(f"topk_group: expected at most n_group ({n_group}), got {topk_group}")
    per_group = num_experts // n_group
    if per_group < 2:
        raise ValueError(
            f"n_group: expected at least 2 experts per group, got {num_experts} experts in {n_group} groups"
        )
    if top_k > topk_group * per_group:
        raise ValueError(
            f"top_k: expected at most topk_group * experts per group ({topk_group * per_group}), got {top_k}"
        )


def noaux_tc_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    *,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    apply_routed_scaling: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 grouped top-k (``topk_method = noaux_tc``), docs/design.md §4.

    ``router_logits [T, E]`` fp32, ``correction_bias [E]`` fp32 (selection only).
    Groups are ranked by the sum of their two best biased scores; experts outside
    the ``topk_group`` best groups are masked; weights come from the unbiased
    sigmoid scores, renormalized when ``norm_topk_prob`` and multiplied by
    ``routed_scaling_factor`` when ``apply_routed_scaling`` (else left to the caller).
    """
    _check_logits(router_logits, top_k)
    t, e = router_logits.shape
    check_tensor("correction_bias", correction_bias, dtype=torch.float32, shape=(e,), device=router_logits.device)
    check_grouping(e, top_k, n_group, topk_group)
    check_bool("norm_topk_prob", norm_topk_prob)
    check_real("routed_scaling_factor", routed_scaling_factor, positive=True)
    check_bool("apply_routed_scaling", apply_routed_scaling)
    per_group = e // n_group
    scores = torch.sigmoid(router_logits)
    biased = scores + correction_bias
    grouped = biased.view(t, n_group, per_group)
    top2 = torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., :2]
    group_scores = top2.sum(dim=-1)
    keep = _topk_stable(group_scores, topk_group)
    group_mask = torch.zeros(t, n_group, dtype=torch.bool, device=router_logits.device)
    group_mask.scatter_(1, keep, True)
    expert_mask = group_mask.repeat_interleave(per_group, dim=1)
    masked = biased.masked_fill(~expert_mask, float("-inf"))
    ids, weights = _gather(scores, _topk_stable(masked, top_k))
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if apply_routed_scaling:
        weights = weights * routed_scaling_factor
    return ids, weights


def renormalize_topk(router_logits: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, top-k, weights renormalized to sum to one."""
    _check_logits(router_logits, top_k)
    probs = torch.softmax(router_logits, dim=-1)
    ids, weights = _gather(probs, _topk_stable(probs, top_k))
    return ids, weights / weights.sum(dim=-1, keepdim=True)


def softmax_topk(router_logits: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, top-k, weights are the softmax probabilities."""
    _check_logits(router_logits, top_k)
    probs = torch.softmax(router_logits, dim=-1)
    return _gather(probs, _topk_stable(probs, top_k))


def sigmoid_topk(router_logits: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores, top-k, weights are the sigmoid scores."""
    _check_logits(router_logits, top_k)
    scores = torch.sigmoid(router_logits)
    return _gather(scores, _topk_stable(scores, top_k))


@dataclass(frozen=True)
class RoutingConfig:
    """How a layer turns router logits into top-k ids and weights.

    ``method`` is one of ``noaux_tc`` (DeepSeek-V3; needs ``n_group``, ``topk_group``
    and a correction bias), ``renormalize``, ``softmax`` or ``sigmoid``.
    ``routed_scaling_factor`` (a finite float > 0) applies to ``noaux_tc`` only, and only when
    ``apply_routed_scaling`` (otherwise the caller scales the layer output). Every field is
    type-checked here: flags must be bools, counts ints.
    """

    method: str = "renormalize"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    apply_routed_scaling: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        check_int("n_group", self.n_group, minimum=1)
        check_int("topk_group", self.topk_group, minimum=1)
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group: expected at most n_group ({self.n_group}), got {self.topk_group}")
        check_bool("norm_topk_prob", self.norm_topk_prob)
        # stored as a float: an int factor (DeepSeek configs write 1) is the same value
        object.__setattr__(
            self,
            "routed_scaling_factor",
            check_real("routed_scaling_factor", self.routed_scaling_factor, positive=True),
        )
        check_bool("apply_routed_scaling", self.apply_routed_scaling)

    @classmethod
    def deepseek_v3(
        cls,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        apply_routed_scaling: bool = True,
    ) -> "RoutingConfig":
        """The DeepSeek-V3 routing (sigmoid, grouped, normalized, scaled)."""
        return cls("noaux_tc", n_group, topk_group, True, routed_scaling_factor, apply_routed_scaling)

    def check(self, num_experts: int, top_k: int, has_correction_bias: bool) -> None:
        """Validate this routing for a layer of ``num_experts`` global experts and ``top_k``."""
        if self.method == "noaux_tc":
            check_grouping(num_experts, top_k, self.n_group, self.topk_group)
            if not has_correction_bias:
                raise ValueError("correction_bias: expected an fp32 [E] tensor for noaux_tc routing, got None")
        elif has_correction_bias:
            raise ValueError(
                f"correction_bias: only noaux_tc routing uses one, got a tensor with method {self.method!r}"
            )

    def select(
        self, router_logits: torch.Tensor, top_k: int, correction_bias: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k ids ``[T, k]`` int32 (global) and weights ``[T, k]`` fp32 for ``router_logits [T, E]``."""
        self.check(router_logits.shape[-1], top_k, correction_bias is not None)
        if self.method == "noaux_tc":
            assert correction_bias is not None  # check() refused noaux_tc without one
            return noaux_tc_topk(
                router_logits,
                correction_bias,
                top_k,
                self.n_group,
                self.topk_group,
                norm_topk_prob=self.norm_topk_prob,
                routed_scaling_factor=self.routed_scaling_factor,
                apply_routed_scaling=self.apply_routed_scaling,
            )
        return {"renormalize": renormalize_topk, "softmax": softmax_topk, "sigmoid": sigmoid_topk}[self.method](
            router_logits, top_k
        )
