"""Reference fused experts in torch: the oracle every kernel is checked against.

Runs on the CPU and on any GPU, one local expert at a time, fp32 accumulation.
With ``quantize_activations`` it reproduces the activation numerics of the fast
kernels: FP8 precisions quantize the GEMM1 input and the SiLU-and-mul output
(dynamic per token per 128 channels, or the static per-tensor scales); bf16 and
NVFP4 (W4A16) round the intermediate to bf16. Without it the activations stay in
fp32, which measures the weight quantization alone.

It synchronizes with the host (it looks up which experts received tokens), so it
is not capturable in a CUDA graph.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .._checks import check_bool, check_int, check_out, check_tensor
from ..expert_weights import ExpertWeights, FP8BlockWeights, FP8TensorWeights
from ..quant.fp8 import fake_quant_activation

Rounding = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _activation_rounding(weights: ExpertWeights, quantize: bool) -> Tuple[Rounding, Rounding]:
    """Return ``(round_input, round_intermediate)`` on fp32 ``[n, K]`` activation rows."""
    if not quantize:
        return _identity, _identity
    if isinstance(weights, FP8BlockWeights):
        q = lambda x: fake_quant_activation(x, None, weights.ue8m0)  # noqa: E731
        return q, q
    if isinstance(weights, FP8TensorWeights):
        return (
            lambda x: fake_quant_activation(x, weights.a13_scale),
            lambda x: fake_quant_activation(x, weights.a2_scale),
        )
    return _identity, lambda x: x.to(torch.bfloat16).float()


def _check_inputs(
    hidden: torch.Tensor, hidden_size: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor, local_expert_offset: int
) -> None:
    check_tensor(
        "hidden",
        hidden,
        dtype=(torch.bfloat16, torch.float16, torch.float32, torch.float64),
        shape=(None, hidden_size),
        contiguous=False,
    )
    t = hidden.shape[0]
    check_tensor("topk_ids", topk_ids, dtype=torch.int32, ndim=2, device=hidden.device, contiguous=False)
    check_tensor(
        "topk_weights",
        topk_weights,
        dtype=torch.float32,
        shape=(t, topk_ids.shape[1]),
        device=hidden.device,
        contiguous=False,
    )
    check_tensor("topk_ids", topk_ids, shape=(t, None), contiguous=False)
    check_int("local_expert_offset", local_expert_offset, minimum=0)


def _expert_loop(
    hidden: torch.Tensor,
    num_experts: int,
    expert: Callable[[int], Tuple[torch.Tensor, torch.Tensor]],
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local_expert_offset: int,
    apply_router_weight_on_input: bool,
    round_in: Rounding,
    round_mid: Rounding,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Sum over (token, slot) pairs of local experts, one expert at a time, in ``dtype``: ``[T, H]``."""
    t, h = hidden.shape
    acc = torch.zeros(t, h, dtype=dtype, device=hidden.device)
    local = topk_ids.long() - local_expert_offset
    for e in torch.unique(local[(local >= 0) & (local < num_experts)]).tolist():
        tok, slot = torch.nonzero(local == e, as_tuple=True)
        w = topk_weights[tok, slot].to(dtype)[:, None]
        x = hidden[tok].to(dtype)
        if apply_router_weight_on_input:
            x = x * w
        w13, w2 = (m.to(dtype) for m in expert(e))
        gu = round_in(x) @ w13.T
        inter = w13.shape[0] // 2
        act = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        y = round_mid(act) @ w2.T
        if not apply_router_weight_on_input:
            y = y * w
        acc.index_add_(0, tok, y)
    return acc


def _write(acc: torch.Tensor, hidden: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return acc.to(hidden.dtype)
    out[: acc.shape[0]].copy_(acc)
    return out[: acc.shape[0]]


def reference_fused_experts(
    hidden: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    local_expert_offset: int = 0,
    apply_router_weight_on_input: bool = False,
    quantize_activations: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * expert(ids[t, j])(x[t])`` over the local experts, fp32 accumulation.

    Args:
        hidden: ``[T, H]`` bf16, fp16 or fp32.
        weights: the local experts (any precision container).
        topk_ids: ``[T, k]`` int32 global ids; ids outside
            ``[local_expert_offset, local_expert_offset + E)`` (including -1) contribute nothing.
        topk_weights: ``[T, k]`` fp32 router weights.
        local_expert_offset: global id of local expert 0.
        apply_router_weight_on_input: scale ``x`` by the weight before GEMM1 instead
            of scaling the expert output.
        quantize_activations: reproduce the kernels' activation rounding (see module doc).
        out: optional ``[R >= T, H]`` buffer of ``hidden``'s dtype; only ``[:T]`` is written.

    Returns:
        ``out[:T]`` (a new ``[T, H]`` tensor of ``hidden``'s dtype when ``out`` is None).
    """
    if not isinstance(weights, ExpertWeights):
        raise TypeError(f"weights: expected an ExpertWeights container, got {type(weights).__name__}")
    _check_inputs(hidden, weights.hidden_size, topk_ids, topk_weights, local_expert_offset)
    check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
    check_bool("quantize_activations", quantize_activations)
    check_out("out", out, rows=hidden.shape[0], cols=hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    round_in, round_mid = _activation_rounding(weights, quantize_activations)
    acc = _expert_loop(
        hidden,
        weights.num_experts,
        weights.dequantize_expert,
        topk_ids,
        topk_weights,
        local_expert_offset,
        apply_router_weight_on_input,
        round_in,
        round_mid,
        torch.float32,
    )
    return _write(acc, hidden, out)


def exact_fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    local_expert_offset: int = 0,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """The same sum in float64 on float master weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]``
    with exact activations: the ground truth that quantization errors are measured against.

    Returns ``[T, H]`` float64.
    """
    _check_inputs(hidden, w2.shape[1], topk_ids, topk_weights, local_expert_offset)
    return _expert_loop(
        hidden,
        w13.shape[0],
        lambda e: (w13[e], w2[e]),
        topk_ids,
        topk_weights,
        local_expert_offset,
        apply_router_weight_on_input,
        _identity,
        _identity,
        torch.float64,
    )
