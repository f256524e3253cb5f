"""Weight layouts of FlashInfer's TRT-LLM-gen MoE kernels, made by FlashInfer's own helpers.

FlashInfer's ``prepare_trtllm_*_weights`` quantize bf16 masters themselves; our checkpoints are
already quantized, so each ``prepare_*`` below applies the layout steps of the matching FlashInfer
function to the stored codes and scales, calling the same FlashInfer helpers in the same order:

* every GEMM1 matrix goes to FlashInfer's ``[up; gate]`` row order (ours is ``[gate; up]``);
* FP8 block (DeepSeek FP8): nothing else, K-major and unshuffled, as
  ``prepare_trtllm_fp8_block_weights`` returns them;
* FP8 per tensor: rows permuted by ``_maybe_get_cached_w3_w1_permute_indices`` (gated-row
  interleave then ``shuffle_matrix_a`` rows, epilogue tile 128) and
  ``get_w2_permute_indices_with_cache``, as ``prepare_trtllm_fp8_per_tensor_weights``; its three
  per-expert output scales come from our scales and static activation scales;
* NVFP4: codes permuted as above, block scales permuted with ``num_elts_per_sf=16`` and swizzled
  to the 128x4 layout by ``block_scale_interleave`` (CUDA only), as ``prepare_trtllm_fp4_weights``.
  Activations and the GEMM1 output use FlashInfer's unit global scale (its unified NVFP4 view
  does the same), so gate's and up's global scales go to the gate and output-1 scalars.

Each ``restore_*`` is the exact inverse (the layer rebuilds canonical weights from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from ...expert_weights import ExpertShapes, FP8BlockWeights, FP8TensorWeights, NVFP4Weights
from ...quant.fp8 import FP8_DTYPE

#: TRT-LLM-gen's epilogue tile along M; FlashInfer's prepare functions fix it at 128.
EPILOGUE_TILE_M = 128
#: NVFP4 elements per block scale.
NVFP4_SF_VEC = 16

_PERMUTE_CACHE: Dict[tuple, torch.Tensor] = {}


def up_gate(w: torch.Tensor) -> torch.Tensor:
    """``[A; B] -> [B; A]`` along dim 1 of ``w [E, 2I, ...]``: ``[gate; up] <-> [up; gate]`` (its own inverse)."""
    a, b = w.split(w.shape[1] // 2, dim=1)
    return torch.cat([b, a], dim=1)


def _check_multiples(name: str, h: int, i: int, h_multiple: int, i_multiple: int) -> None:
    if h % h_multiple or i % i_multiple:
        raise ValueError(
            f"weights: FlashInfer's TRT-LLM-gen {name} MoE needs a hidden size that is a multiple of {h_multiple} "
            f"and an intermediate size that is a multiple of {i_multiple} (its 128-row epilogue tile), "
            f"got H={h}, I={i}"
        )


def _permutations(w13: torch.Tensor, w2: torch.Tensor, num_elts_per_sf=None):
    """FlashInfer's row permutations of one expert's GEMM1 ``[2I, K]`` and GEMM2 ``[H, K']`` (uint8 views)."""
    from flashinfer.fused_moe.core import _maybe_get_cached_w3_w1_permute_indices, get_w2_permute_indices_with_cache

    p13 = _maybe_get_cached_w3_w1_permute_indices(
        _PERMUTE_CACHE, w13, EPILOGUE_TILE_M, num_elts_per_sf=num_elts_per_sf, is_gated_act_gemm=True
    )
    p2 = get_w2_permute_indices_with_cache(
        _PERMUTE_CACHE, w2, EPILOGUE_TILE_M, num_elts_per_sf=num_elts_per_sf, is_gated_act_gemm=True
    )
    return p13.to(w13.device), p2.to(w2.device)


def _rows(w: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``w [E, R, ...]`` with rows ``perm`` of every expert (any dtype, through its byte view)."""
    return w.view(torch.uint8)[:, perm].contiguous().view(w.dtype)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    return torch.argsort(perm)


# -- FP8 block ----------------------------------------------------------------------------------
@dataclass
class FP8BlockLayout(ExpertShapes):
    """``w13 [E, 2I, H]`` e4m3 and ``w13_scale [E, 2I/128, H/128]`` fp32 in ``[up; gate]`` order,
    ``w2 [E, H, I]``, ``w2_scale [E, H/128, I/128]`` unchanged; K-major, unshuffled."""

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    ue8m0: bool = False


def prepare_fp8_block(weights: FP8BlockWeights) -> FP8BlockLayout:
    return FP8BlockLayout(up_gate(weights.w13), up_gate(weights.w13_scale), weights.w2, weights.w2_scale, weights.ue8m0)


def restore_fp8_block(prepared: FP8BlockLayout) -> FP8BlockWeights:
    return FP8BlockWeights(
        up_gate(prepared.w13), up_gate(prepared.w13_scale), prepared.w2, prepared.w2_scale, prepared.ue8m0
    )


# -- FP8 per tensor -----------------------------------------------------------------------------
@dataclass
class FP8TensorLayout(ExpertShapes):
    """``w13 [E, 2I, H]`` / ``w2 [E, H, I]`` e4m3 in FlashInfer's shuffled ``[up; gate]`` rows; the
    canonical scales (``w13_scale``/``w2_scale [E]``, ``a13_scale``/``a2_scale [1]``, divisors) and
    the kernel's per-expert fp32 multipliers ``output1_scales_scalar`` (up, requantized for GEMM2),
    ``output1_scales_gate_scalar`` (gate) and ``output2_scales_scalar``."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    a13_scale: torch.Tensor
    a2_scale: torch.Tensor
    output1_scales_scalar: torch.Tensor
    output1_scales_gate_scalar: torch.Tensor
    output2_scales_scalar: torch.Tensor


def prepare_fp8_tensor(weights: FP8TensorWeights) -> FP8TensorLayout:
    if weights.a13_scale is None or weights.a2_scale is None:
        raise ValueError(
            "weights: FlashInfer's TRT-LLM-gen FP8 per-tensor MoE needs static activation scales "
            "(a13_scale and a2_scale, a checkpoint's input_scale); these weights quantize activations "
            "dynamically: use kernel='reference' for them"
        )
    _check_multiples(
        "FP8 per-tensor", weights.hidden_size, weights.intermediate_size, EPILOGUE_TILE_M, EPILOGUE_TILE_M // 2
    )
    w13 = up_gate(weights.w13)
    p13, p2 = _permutations(w13[0].view(torch.uint8), weights.w2[0].view(torch.uint8))
    # The kernel multiplies: gate = acc * s_gate, up = acc * s_1 (including the 1/a2 requantization),
    # down = acc * s_2. Computed in float64 from the divisors we store.
    w13_s, w2_s = weights.w13_scale.double(), weights.w2_scale.double()
    a13, a2 = weights.a13_scale.double(), weights.a2_scale.double()
    return FP8TensorLayout(
        _rows(w13, p13),
        _rows(weights.w2, p2),
        weights.w13_scale,
        weights.w2_scale,
        weights.a13_scale,
        weights.a2_scale,
        (w13_s * a13 / a2).float(),
        (w13_s * a13).float(),
        (w2_s * a2).float(),
    )


def restore_fp8_tensor(prepared: FP8TensorLayout) -> FP8TensorWeights:
    p13, p2 = _permutations(prepared.w13[0].view(torch.uint8), prepared.w2[0].view(torch.uint8))
    return FP8TensorWeights(
        up_gate(_rows(prepared.w13, _inverse(p13))),
        prepared.w13_scale,
        _rows(prepared.w2, _inverse(p2)),
        prepared.w2_scale,
        prepared.a13_scale,
        prepared.a2_scale,
    )


# -- NVFP4 --------------------------------------------------------------------------------------
@dataclass
class NVFP4Layout(ExpertShapes):
    """``w13 [E, 2I, H/2]`` / ``w2 [E, H, I/2]`` uint8 codes in FlashInfer's shuffled ``[up; gate]`` rows;
    ``w13_scale [E, 2I, H/16]`` / ``w2_scale [E, H, I/16]`` e4m3, rows permuted and each expert's
    matrix swizzled to the 128x4 layout; the global scales ``w13_scale_2 [E, 2]`` (gate, up) and
    ``w2_scale_2 [E]`` as in :class:`~moe_backend.expert_weights.NVFP4Weights`."""

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    w13_scale_2: torch.Tensor
    w2_scale_2: torch.Tensor


def _swizzle(scales: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Per expert: rows ``perm`` of ``scales [E, R, C]`` e4m3, then FlashInfer's 128x4 swizzle
    (``block_scale_interleave``, from where ``prepare_trtllm_fp4_weights`` takes it; CUDA only)."""
    from flashinfer.quantization import fp4_quantization

    interleave = fp4_quantization.block_scale_interleave
    rows = scales.view(torch.uint8)[:, perm]
    out = torch.stack([interleave(rows[e].contiguous()).reshape(rows.shape[1:]) for e in range(rows.shape[0])])
    return out.view(FP8_DTYPE)


def unswizzle_128x4(swizzled: torch.Tensor) -> torch.Tensor:
    """Inverse of the 128x4 scale swizzle for ``[..., R, C]`` with R a multiple of 128, C of 4.

    Linear element ``(r, c)`` sits at ``(r // 128) * 128 * C + (c // 4) * 512 + (r % 32) * 16
    + ((r % 128) // 32) * 4 + c % 4`` (FlashInfer's ``compute_sf_index_swizzled_128x4_gpu``).
    """
    *lead, r, c = swizzled.shape
    v = swizzled.reshape(*lead, r // 128, c // 4, 32, 4, 4)  # (row tile, col group, r%32, (r%128)//32, c%4)
    n = len(lead)
    order = (*range(n), n, n + 3, n + 2, n + 1, n + 4)
    return v.permute(order).reshape(*lead, r, c).contiguous()


def prepare_nvfp4(weights: NVFP4Weights) -> NVFP4Layout:
    h, i = weights.hidden_size, weights.intermediate_size
    # 2I and H fill 128-row tiles; the scale columns H/16 and I/16 fill 4-column groups.
    _check_multiples("NVFP4", h, i, EPILOGUE_TILE_M, EPILOGUE_TILE_M // 2)
    w13, s13 = up_gate(weights.w13), up_gate(weights.w13_scale)
    p13, p2 = _permutations(w13[0], weights.w2[0])
    sp13, sp2 = _permutations(s13[0].view(torch.uint8), weights.w2_scale[0].view(torch.uint8), NVFP4_SF_VEC)
    return NVFP4Layout(
        _rows(w13, p13),
        _swizzle(s13, sp13),
        _rows(weights.w2, p2),
        _swizzle(weights.w2_scale, sp2),
        weights.w13_scale_2,
        weights.w2_scale_2,
    )


def restore_nvfp4(prepared: NVFP4Layout) -> NVFP4Weights:
    p13, p2 = _permutations(prepared.w13[0], prepared.w2[0])
    sp13, sp2 = _permutations(
        prepared.w13_scale[0].view(torch.uint8), prepared.w2_scale[0].view(torch.uint8), NVFP4_SF_VEC
    )
    s13 = _rows(unswizzle_128x4(prepared.w13_scale.view(torch.uint8)), _inverse(sp13)).view(FP8_DTYPE)
    s2 = _rows(unswizzle_128x4(prepared.w2_scale.view(torch.uint8)), _inverse(sp2)).view(FP8_DTYPE)
    return NVFP4Weights(
        w13=up_gate(_rows(prepared.w13, _inverse(p13))),
        w13_scale=up_gate(s13),
        w13_scale_2=prepared.w13_scale_2,
        w2=_rows(prepared.w2, _inverse(p2)),
        w2_scale=s2,
        w2_scale_2=prepared.w2_scale_2,
    )
