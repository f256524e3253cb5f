"""bf16 and NVFP4 fused experts through bf16 grouped GEMMs (QuACK, CuTe DSL): every batch size of
a bf16 layer (64-row tiles up to ``DECODE_MAX_ROWS`` rows an expert), NVFP4 prefill.

One call, all on the GPU with no host sync (CUDA-graph capturable once warmed up):

1. ``varlen_routing``: pairs sorted by local expert into unpadded segments;
2. NVFP4 only: ``dequantize_kernel_layout_segments`` writes the ACTIVE experts' matrices as bf16
   into the shared workspace pool (``min(E, T * k)`` matrices, one buffer for every layer), from
   the NVFP4 Triton kernels' layout (``sm90_triton_nvfp4``'s grouped path runs the same);
3. ``gemm1_gated``: gathered token rows times ``w13``, SiLU-and-mul in the epilogue: ``[P, I]`` bf16;
4. ``gemm2``: times ``w2``: one bf16 row ``[P, H]`` per (token, expert) pair;
5. ``weighted_sum_pairs``: ``out[t] = sum_j w[t, j] * row(t, j)`` in slot order (deterministic).

Numerics: the W4A16 Triton kernels' (bf16 weights, fp32 accumulation, bf16 intermediate), plus
one bf16 rounding of each pair's GEMM2 output before the fp32 combine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..._checks import check_routed_call
from ...expert_weights import BF16Weights, ExpertShapes, NVFP4Weights
from ...runtime import workspace
from . import bf16_grouped
from .config import merge_config
from .nvfp4_dequant import dequantize_kernel_layout_segments
from .nvfp4_layout import NVFP4KernelWeights, nvfp4_from_kernel_layout, nvfp4_to_kernel_layout
from .pair_combine import weighted_sum_pairs
from .varlen_routing import VarlenRouting, varlen_routing


@dataclass
class GroupedBF16Weights(ExpertShapes):
    """bf16 experts in this kernel's layout: ``w13 [E, 2I, H]`` with gate and up rows interleaved
    (row ``2c`` gate ``c``, ``2c + 1`` up ``c``: the gated epilogue pairs adjacent columns),
    ``w2 [E, H, I]``; both contiguous."""

    w13: torch.Tensor
    w2: torch.Tensor


GroupedWeights = Union[GroupedBF16Weights, NVFP4KernelWeights]


def prepare_grouped(weights: Union[BF16Weights, NVFP4Weights]) -> GroupedWeights:
    """bf16: interleave gate and up rows (a copy); NVFP4: the W4A16 kernels' layout (the
    dequantization interleaves as it writes)."""
    if isinstance(weights, BF16Weights):
        return GroupedBF16Weights(bf16_grouped.interleave_gate_up(weights.w13), weights.w2.contiguous())
    if isinstance(weights, NVFP4Weights):
        return nvfp4_to_kernel_layout(weights)
    raise TypeError(f"weights: expected BF16Weights or NVFP4Weights, got {type(weights).__name__}")


def restore_grouped(prepared: GroupedWeights) -> Union[BF16Weights, NVFP4Weights]:
    """Inverse of :func:`prepare_grouped`."""
    if isinstance(prepared, GroupedBF16Weights):
        return BF16Weights(bf16_grouped.deinterleave_gate_up(prepared.w13), prepared.w2)
    return nvfp4_from_kernel_layout(prepared)


#: Knobs: GEMM1's and GEMM2's tile, each ``(tile_m, tile_n, cluster_m, pingpong)`` from
#: :data:`bf16_grouped.TILES` (JSON caches hand them back as lists).
CONFIG_KEYS = ("tile1", "tile2")
#: The default above ``DECODE_MAX_ROWS`` expected rows per local expert.
DEFAULT_CONFIG: Dict[str, Any] = dict(tile1=bf16_grouped.DEFAULT_TILE, tile2=bf16_grouped.DEFAULT_TILE)
#: The default up to ``DECODE_MAX_ROWS`` expected rows per local expert. H200, 2026-12-04 (bf16,
#: DeepSeek-V3 widths, balanced routing): 1.8-2.0x faster than ``DEFAULT_CONFIG`` from 1/32 to 64
#: rows an expert (E=256 T=1: 216 against 437 us), 1.5x slower at 256 (E=32 T=1024: 1772 against
#: 1212); between 64 and 256 the crossover was not measured, and the tuner times both.
DECODE_CONFIG: Dict[str, Any] = dict(tile1=bf16_grouped.DECODE_TILE, tile2=bf16_grouped.DECODE_TILE)
DECODE_MAX_ROWS = 64
#: Version of this kernel's tuned configurations (the tuning cache keeps a configuration only for
#: the version it was tuned for). Bump it when the kernels, the interleaved ``w13`` layout, the
#: candidates or the configuration schema change.
KERNEL_VERSION = 2
#: What the tuner times per token bucket.
CANDIDATE_CONFIGS = tuple(dict(tile1=t, tile2=t) for t in bf16_grouped.TILES)
#: No atomics and one configuration for every T: bitwise reproducible.
DETERMINISTIC_CONFIG: Dict[str, Any] = dict(DEFAULT_CONFIG)


def default_config(num_tokens: int, top_k: int, num_experts: int) -> Dict[str, Any]:
    """The heuristic configuration for ``num_tokens * top_k`` pairs over ``num_experts`` local
    experts, from the expected rows per expert (balanced routing)."""
    rows_per_expert = num_tokens * top_k / num_experts
    return dict(DECODE_CONFIG if rows_per_expert <= DECODE_MAX_ROWS else DEFAULT_CONFIG)


def resolve_config(config: Optional[dict], default: Optional[dict] = None) -> Dict[str, Tuple[int, int, int, bool]]:
    """``default`` (None: :data:`DEFAULT_CONFIG`) overridden by ``config``; every tile must be one
    of :data:`bf16_grouped.TILES`."""
    merged = merge_config(DEFAULT_CONFIG if default is None else default, config, CONFIG_KEYS)
    return {key: checked_tile(key, merged[key]) for key in CONFIG_KEYS}


def checked_tile(key: str, value: object) -> Tuple[int, int, int, bool]:
    """``value`` (a tuple, or a list from a JSON cache) as one of :data:`bf16_grouped.TILES`, else
    ValueError naming the configuration key ``key``."""
    tile = tuple(value) if isinstance(value, (list, tuple)) else value
    if tile not in bf16_grouped.TILES:
        raise ValueError(f"config: {key} must be one of {bf16_grouped.TILES}, got {value!r}")
    return tile  # type: ignore[return-value]


def config_tiles(configs) -> Tuple[Tuple[int, int, int, bool], ...]:
    """Every tile the configurations ``configs`` use, each once. The default depends on the batch
    size (:func:`default_config`), so a configuration that leaves a key to it (None leaves both)
    takes that key's tile from either default."""
    tiles = []
    for cfg in configs:
        for default in (DEFAULT_CONFIG, DECODE_CONFIG):
            resolved = resolve_config(cfg, default)
            tiles += [resolved[k] for k in CONFIG_KEYS]
    return tuple(dict.fromkeys(tiles))


def precompile(weights: GroupedWeights, configs) -> int:
    """Compile every grouped GEMM ``configs`` can use for these experts (layer warm-up; never
    inside a CUDA-graph capture). Returns the number of kernels compiled or loaded now."""
    return bf16_grouped.compile_plans(
        weights.hidden_size, weights.intermediate_size, config_tiles(list(configs) or [None]), weights.device
    )


def _check_inputs(
    hidden: torch.Tensor,
    w: GroupedWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local_expert_offset: int,
    out: Optional[torch.Tensor],
    apply_router_weight_on_input: bool,
) -> None:
    if not isinstance(w, (GroupedBF16Weights, NVFP4KernelWeights)):
        raise TypeError(
            f"prepared_weights: expected GroupedBF16Weights or NVFP4KernelWeights (from prepare_grouped), "
            f"got {type(w).__name__}"
        )
    check_routed_call(
        hidden, topk_ids, topk_weights, local_expert_offset, out, hidden_size=w.hidden_size, device=w.device
    )
    if apply_router_weight_on_input:
        raise ValueError("apply_router_weight_on_input: the grouped-GEMM kernel scales the output only, got True")


def segment_weights(w: GroupedWeights, expert_of_segment: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(w13 [S, 2I, H] gate/up interleaved, w2 [S, H, I])`` bf16 of the segments: the weights
    themselves (bf16), or the active experts dequantized into the shared pool (NVFP4)."""
    if isinstance(w, GroupedBF16Weights):
        return w.w13, w.w2
    s = expert_of_segment.shape[0]
    h, i = w.hidden_size, w.intermediate_size
    w13 = workspace(s * 2 * i, h, torch.bfloat16, w.device, "moe_grouped_w13").view(s, 2 * i, h)
    w2 = workspace(s * h, i, torch.bfloat16, w.device, "moe_grouped_w2").view(s, h, i)
    dequantize_kernel_layout_segments(w, expert_of_segment, w13, w2)
    return w13, w2


def fused_experts_grouped(
    hidden: torch.Tensor,
    prepared_weights: GroupedWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    local_expert_offset: int,
    apply_router_weight_on_input: bool,
    out: torch.Tensor,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * expert(ids[t, j])(hidden[t])`` over the local experts.

    Args:
        hidden: ``[T, H]`` bf16, contiguous; T may be 0.
        prepared_weights: from :func:`prepare_grouped` (bf16 or NVFP4 experts).
        topk_ids: ``[T, k]`` int32 global expert ids, contiguous; -1 or ids outside
            ``[local_expert_offset, local_expert_offset + E)`` contribute nothing.
        topk_weights: ``[T, k]`` fp32 router weights, contiguous.
        local_expert_offset: global id of local expert 0.
        apply_router_weight_on_input: must be False (the weight scales the output).
        out: ``[R >= T, H]`` bf16 contiguous; rows ``[:T]`` are all written, rows ``>= T`` untouched.
        config: ``tile1`` / ``tile2`` (see :data:`CONFIG_KEYS`) over :func:`default_config` of
            this batch's size.

    Returns:
        ``out[:T]``.
    """
    _check_inputs(
        hidden, prepared_weights, topk_ids, topk_weights, local_expert_offset, out, apply_router_weight_on_input
    )
    w = prepared_weights
    num_tokens, top_k = topk_ids.shape
    cfg = resolve_config(config, default_config(num_tokens, top_k, w.num_experts))
    result = out[:num_tokens]
    if num_tokens == 0:
        return result
    if top_k == 0:
        return result.zero_()
    return run_segments(hidden, w, topk_ids, topk_weights, local_expert_offset, result, cfg["tile1"], cfg["tile2"])


def run_segments(
    hidden: torch.Tensor,
    w: GroupedWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local_expert_offset: int,
    result: torch.Tensor,
    tile1: Tuple[int, int, int, bool],
    tile2: Tuple[int, int, int, bool],
) -> torch.Tensor:
    """Steps 1-5 of the module doc on checked inputs (T, k >= 1): the pairs routed into segments
    (NVFP4: only the active experts'), the segments' bf16 weights, :func:`grouped_gemms` into
    ``result [T, H]`` bf16 (returned)."""
    compact = isinstance(w, NVFP4KernelWeights)
    routing = varlen_routing(topk_ids, w.num_experts, local_expert_offset, compact=compact)
    w13, w2 = segment_weights(w, routing.expert_of_segment)
    return grouped_gemms(hidden, w13, w2, routing, topk_weights, result, tile1, tile2)


def grouped_gemms(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: VarlenRouting,
    topk_weights: torch.Tensor,
    result: torch.Tensor,
    tile1: Tuple[int, int, int, bool],
    tile2: Tuple[int, int, int, bool],
) -> torch.Tensor:
    """The gated GEMM1 (token rows gathered by ``routing.token_of_row``), GEMM2 and the weighted
    pair combine into ``result [T, H]`` bf16 (returned), on segment weights ``w13 [S, 2I, H]``
    (gate/up interleaved) and ``w2 [S, H, I]`` bf16 of ``routing``'s segments."""
    num_pairs = routing.token_of_row.numel()
    h, i = w2.shape[1], w2.shape[2]
    dev = hidden.device
    mid = workspace(num_pairs, i, torch.bfloat16, dev, "moe_grouped_mid")
    rows = workspace(num_pairs, h, torch.bfloat16, dev, "moe_grouped_rows")
    bf16_grouped.gemm1_gated(hidden, w13, routing.cu_seqlens, routing.token_of_row, mid, tile1)
    bf16_grouped.gemm2(mid, w2, routing.cu_seqlens, rows, tile2)
    return weighted_sum_pairs(rows, routing.row_of_pair, topk_weights, result)
