"""FP8 block-scale fused experts through the CuTe DSL FP8 grouped GEMM: the candidate prefill path.

One call, all on the device with no host sync (CUDA-graph capturable once the GEMM plans are
compiled, :func:`precompile`):

1. ``varlen_routing(compact=False)``: pairs sorted by local expert into unpadded segments;
   segment ``s`` is local expert ``s``, so the FP8 weights and their scales are read in place;
2. ``act_quant_scatter_fp8``: the hidden states quantized once per token, per 128 channels (the
   Triton activation quantizer the Triton FP8 layer uses: same kernel, same numerics), each
   token's codes and scales written straight to its pairs' rows of ``A [P, H]`` e4m3 and
   ``A_scale [P, H/128]`` fp32 (workspace buffers);
3. GEMM1 ``grouped_gemm_fp8_block`` with fp32 D: ``gate_up [P, 2I]`` fp32 (gate ``[:I]``, up
   ``[I:]``, the checkpoint's ``w13`` order);
4. ``silu_mul_quant``: ``silu(gate) * up`` in fp32, requantized per row per 128 columns:
   ``Y [P, I]`` e4m3, ``Y_scale [P, I/128]`` fp32 (rows past the last segment skipped on the device);
5. GEMM2 ``grouped_gemm_fp8_block`` with bf16 D: one row ``[P, H]`` per (token, expert) pair;
6. ``weighted_sum_pairs``: ``out[t] = sum_j w[t, j] * row(t, j)`` in fp32 in slot order, one bf16
   rounding (deterministic, no atomics).

``P = T * k`` (static); pairs whose id is -1 or another rank's get no segment row, their rows
past ``cu_seqlens[E]`` are never read by a GEMM, and the combine skips them.

Numerics: those of the Triton FP8 layer's default (``accurate``) numerics and of
``reference_fused_experts`` with ``quantize_activations=True``: dynamic 1x128 activation
quantization (``max(amax, 1e-10) / 448``) of the GEMM1 input and of the SiLU-and-mul output,
128x128 weight block scales applied per K block to fp32 partial sums (DeepGEMM-style promotion),
gate/up kept in fp32 up to the requantization (rounding them to bf16 first moves the result by
~1.5e-2: near-midpoint e4m3 flips), plus one bf16 rounding of each pair's GEMM2 output before the
fp32 combine (as ``bf16_moe``). Weights with ``ue8m0`` scales are not supported yet.

The FP8 launcher (``fp8_moe.fused_experts_fp8``) runs this path as ``path='cute_grouped'``:
its heuristic default for prefill sizes wherever :func:`grouped_path_defect` finds nothing
against it, and a tuner candidate. Not done yet: fused epilogues (SiLU-and-mul + requantization
in GEMM1's epilogue, the weighted combine in GEMM2's), a gathered-A GEMM1 (the producer reading
token rows instead of the ``A`` copy), per-tensor FP8 weights, ``ue8m0`` and
``apply_router_weight_on_input``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..._checks import check_bool, check_routed_call
from ...expert_weights import FP8BlockWeights
from ...quant.fp8 import BLOCK, FP8_DTYPE
from ...runtime import workspace
from .act_quant import act_quant_scatter_fp8
from .cute_env import sm90_cute_defect
from .fp8_grouped import (
    DEFAULT_TILE,
    GATED_TILES,
    Tile,
    check_tile,
    compile_plans,
    gated_gemm1_fp8_block,
    grouped_gemm_fp8_block,
)
from .pair_combine import weighted_sum_pairs
from .silu_mul_quant import silu_mul_quant
from .varlen_routing import VarlenRouting, varlen_routing


class GemmInput(NamedTuple):
    """GEMM1's operand: the routed pairs' rows ``a [P, H]`` e4m3 and ``a_scale [P, H/128]`` fp32."""

    routing: VarlenRouting
    a: torch.Tensor
    a_scale: torch.Tensor


def named_tile(name: str, tile: object, k: int, *, gemm1: bool = False, n: Optional[int] = None) -> Tile:
    """:func:`fp8_grouped.check_tile` for reduction ``k`` and output width ``n`` (``gemm1``: a
    configuration of :data:`fp8_grouped.GATED_TILES` is the gated GEMM1), its ValueError prefixed
    with ``name``."""
    t = tuple(tile) if isinstance(tile, (tuple, list)) else tile
    try:
        return check_tile(t, gated=True) if gemm1 and t in GATED_TILES else check_tile(t, k, n=n)
    except ValueError as exc:
        allowed = f" or one of {GATED_TILES}" if gemm1 else ""
        raise ValueError(f"{name}: {exc}{allowed}") from None


def _check_inputs(
    hidden: torch.Tensor,
    w: FP8BlockWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local_expert_offset: int,
    apply_router_weight_on_input: bool,
    out: torch.Tensor,
) -> None:
    if not isinstance(w, FP8BlockWeights):
        raise TypeError(f"weights: expected FP8BlockWeights, got {type(w).__name__}")
    if w.ue8m0:
        raise ValueError("weights: ue8m0 (power-of-two) activation scales are not supported by this path yet")
    check_routed_call(
        hidden, topk_ids, topk_weights, local_expert_offset, out, hidden_size=w.hidden_size, device=w.device
    )
    check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
    if apply_router_weight_on_input:
        raise ValueError("apply_router_weight_on_input: this path scales the expert output only, got True")
    for name, m in (("weights.w13", w.w13), ("weights.w2", w.w2)):
        if not m.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")


def route_quantize_scatter(
    hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, local_expert_offset: int
) -> GemmInput:
    """Steps 1 and 2: routing (segment ``s`` = local expert ``s``) and ``hidden [T, H]`` quantized
    per token per 128 channels straight into its pairs' rows of the workspace buffers
    (``moe_fp8g_a``, ``moe_fp8g_a_scale``). ``T * k > 0``."""
    num_pairs = topk_ids.numel()
    h = hidden.shape[1]
    dev = hidden.device
    routing = varlen_routing(topk_ids, num_experts, local_expert_offset, compact=False)
    a = workspace(num_pairs, h, FP8_DTYPE, dev, "moe_fp8g_a")
    a_scale = workspace(num_pairs, h // BLOCK, torch.float32, dev, "moe_fp8g_a_scale")
    act_quant_scatter_fp8(hidden, routing.row_of_pair, a, a_scale)
    return GemmInput(routing, a, a_scale)


def grouped_path_defect(
    device: torch.device,
    *,
    block_scaled: bool,
    static_activation_scales: bool,
    ue8m0: bool,
    apply_router_weight_on_input: bool,
) -> Optional[str]:
    """Why this path cannot serve an FP8 layer with these properties on ``device``, or None."""
    if not block_scaled:
        return "it needs FP8 block-scale weights (per-tensor scales are not supported yet)"
    if static_activation_scales:
        return "it quantizes activations dynamically (static activation scales are not supported yet)"
    if ue8m0:
        return "ue8m0 (power-of-two) activation scales are not supported yet"
    if apply_router_weight_on_input:
        return "its router weight scales the expert output only"
    return sm90_cute_defect(device)


def precompile(weights: FP8BlockWeights, tile1: Tile = DEFAULT_TILE, tile2: Tile = DEFAULT_TILE) -> int:
    """Compile GEMM1's (N 2I, K H) and GEMM2's (bf16 D, N H, K I) plans on the weights' device
    (before a CUDA-graph capture). Returns the number compiled or loaded now."""
    h, i = weights.hidden_size, weights.intermediate_size
    return compile_grouped_plans(
        h, i, named_tile("tile1", tile1, h, gemm1=True), named_tile("tile2", tile2, i, n=h), weights.device
    )


def compile_grouped_plans(hidden_size: int, inter: int, tile1: Tile, tile2: Tile, device: torch.device) -> int:
    """:func:`precompile` on sizes: GEMM1 (N 2I, K H; fp32 D, or the gated kernel's e4m3 for a
    tile of :data:`GATED_TILES`) and GEMM2 (bf16 D, N H, K I)."""
    gemm1_out = FP8_DTYPE if tile1 in GATED_TILES else torch.float32
    built = compile_plans(2 * inter, hidden_size, [tile1], device, gemm1_out)
    return built + compile_plans(hidden_size, inter, [tile2], device, torch.bfloat16)


def fused_experts_fp8_grouped(
    hidden: torch.Tensor,
    weights: FP8BlockWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    local_expert_offset: int,
    apply_router_weight_on_input: bool = False,
    out: torch.Tensor,
    tile1: Tile = DEFAULT_TILE,
    tile2: Tile = DEFAULT_TILE,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * expert(ids[t, j])(hidden[t])`` over the local experts (FP8 block scales).

    Args:
        hidden: ``[T, H]`` bf16, contiguous; T may be 0.
        weights: :class:`FP8BlockWeights` as loaded (``w13 [E, 2I, H]`` e4m3 gate rows ``[:I]``,
            up ``[I:]``; ``w13_scale [E, 2I/128, H/128]`` fp32; ``w2 [E, H, I]`` e4m3;
            ``w2_scale [E, H/128, I/128]`` fp32), read in place; ``ue8m0`` must be False.
        topk_ids: ``[T, k]`` int32 global expert ids, contiguous; -1 or ids outside
            ``[local_expert_offset, local_expert_offset + E)`` contribute nothing.
        topk_weights: ``[T, k]`` fp32 router weights, contiguous.
        local_expert_offset: global id of local expert 0.
        apply_router_weight_on_input: must be False (the weight scales the output).
        out: ``[R >= T, H]`` bf16 contiguous; rows ``[:T]`` are all written, rows ``>= T`` untouched.
        tile1, tile2: GEMM1's and GEMM2's configuration (:data:`fp8_grouped.TILES`; an
            overlapping one needs H, resp. I, a multiple of 256). A ``tile1`` of
            :data:`fp8_grouped.GATED_TILES` runs GEMM1 with SiLU-and-mul and the requantization
            in its epilogue (I a multiple of 128); a ``tile2`` of :data:`fp8_grouped.WIDE_TILES`
            runs GEMM2 on 128 x 256 tiles (H a multiple of 256).

    Returns:
        ``out[:T]``.
    """
    _check_inputs(hidden, weights, topk_ids, topk_weights, local_expert_offset, apply_router_weight_on_input, out)
    h, i = weights.hidden_size, weights.intermediate_size
    return run_fp8_grouped(
        hidden,
        weights.w13,
        weights.w13_scale,
        weights.w2,
        weights.w2_scale,
        topk_ids,
        topk_weights,
        local_expert_offset=local_expert_offset,
        result=out[: hidden.shape[0]],
        tile1=named_tile("tile1", tile1, h, gemm1=True),
        tile2=named_tile("tile2", tile2, i, n=h),
    )


def run_fp8_grouped(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    local_expert_offset: int,
    result: torch.Tensor,
    tile1: Tile,
    tile2: Tile,
) -> torch.Tensor:
    """Steps 1-6 on checked operands (shapes and dtypes of :func:`fused_experts_fp8_grouped`'s
    weights, contiguous ids and weights, tiles valid for H and I); ``result [T, H]`` bf16 is
    written whole and returned."""
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return result
    if top_k == 0:
        return result.zero_()
    num_pairs = num_tokens * top_k
    h, i = w2.shape[1], w2.shape[2]
    dev = hidden.device
    routing, a, a_scale = route_quantize_scatter(hidden, topk_ids, w13.shape[0], local_expert_offset)
    cu = routing.cu_seqlens
    y = workspace(num_pairs, i, FP8_DTYPE, dev, "moe_fp8g_mid")
    y_scale = workspace(num_pairs, i // BLOCK, torch.float32, dev, "moe_fp8g_mid_scale")
    if tile1 in GATED_TILES:
        gated_gemm1_fp8_block(a, a_scale, w13, w13_scale, cu, y, y_scale, tile=tile1)
    else:
        gate_up = workspace(num_pairs, 2 * i, torch.float32, dev, "moe_fp8g_gate_up")
        grouped_gemm_fp8_block(a, a_scale, w13, w13_scale, cu, gate_up, tile=tile1)
        silu_mul_quant(gate_up, y, y_scale, cu[-1:])
    rows = workspace(num_pairs, h, torch.bfloat16, dev, "moe_fp8g_rows")
    grouped_gemm_fp8_block(y, y_scale, w2, w2_scale, cu, rows, tile=tile2)
    return weighted_sum_pairs(rows, routing.row_of_pair, topk_weights, result)
