"""SGLang ``FusedMoE`` layer -> :class:`~moe_backend.MoELayer`, once, after its weights are loaded.

The containers wrap SGLang's own parameter storage (no copy), in the checkpoint
layout SGLang loads: FP8 block ``w13_weight [E, 2I, H]`` e4m3 with
``w13_weight_scale_inv [E, 2I/128, H/128]`` fp32; FP8 per-tensor ``w13_weight``
with ``w13_weight_scale [E, 2]`` (gate and up apart: requantized here to their
larger scale, as SGLang's own per-tensor path does) and optional static input
scales; ModelOpt NVFP4 ``w13_weight [E, 2I, H/2]`` uint8 with
``w13_weight_scale [E, 2I, H/16]`` e4m3 and ``w13_weight_scale_2 [E, 2]`` fp32,
both global scales applied exactly.

Ids: SGLang's standard dispatcher hands the runner LOCAL expert ids (``-1`` for
experts on other EP ranks, fused shared experts in the last local slots), so
our layer is configured with the local expert count and offset 0; the experts it
holds are exactly the layer's ``w13_weight`` rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from moe_backend import LAYER_TYPES, FP8BlockWeights, FP8TensorWeights, MoEConfig, MoELayer, NVFP4Weights
from moe_backend.expert_weights import ExpertWeights
from moe_backend.quant.fp8 import dequantize_fp8_per_tensor, quantize_fp8_per_tensor

from .support import unsupported

logger = logging.getLogger(__name__)

#: Attribute of the SGLang layer that holds its :class:`Binding`.
ATTR = "moe_backend_binding"


@dataclass(eq=False)
class Binding:
    """Our layer for one SGLang MoE layer, and what SGLang leaves to the experts.

    ``routed_scaling_factor`` is applied to the router weights here unless SGLang's
    top-k already folded it in (then None). ``capturer``/``replay``: SGLang's
    routed-experts capturer and the int16 ``[R, k]`` routing-replay buffer it is
    fed from (see ``capture``); None unless ``--enable-return-routed-experts``.
    """

    layer: MoELayer
    layer_id: Optional[int]
    routed_scaling_factor: Optional[float] = None
    capturer: Any = None
    replay: Optional[torch.Tensor] = None


def binding_of(layer: Any) -> Binding:
    """The binding of an SGLang MoE layer (made by its quantization method after loading)."""
    binding = getattr(layer, ATTR, None)
    if binding is None:
        raise RuntimeError(
            "moe_backend: this MoE layer's weights were never bound (its quantization method's "
            "process_weights_after_loading did not run)"
        )
    return binding


def fp8_block_weights(layer: Any, ue8m0: bool) -> FP8BlockWeights:
    """FP8 block-scale container over the layer's loaded tensors."""
    return FP8BlockWeights(
        layer.w13_weight.data,
        layer.w13_weight_scale_inv.data,
        layer.w2_weight.data,
        layer.w2_weight_scale_inv.data,
        ue8m0=ue8m0,
    )


def _one_w13_scale(w13: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Requantize ``w13 [E, 2I, H]`` in place from per-half scales ``[E, 2]`` to one scale per expert ``[E]``.

    Each half is dequantized with its own scale and quantized with the larger one, so
    the half that holds it comes back bit for bit (``moe_backend.weights.loader.merge_w13_scales``).
    """
    if scales.dim() == 1:
        return scales
    merged = scales.max(dim=1).values
    half = w13.shape[1] // 2
    for h in range(scales.shape[1]):
        rows = w13[:, h * half : (h + 1) * half]
        rows.copy_(quantize_fp8_per_tensor(dequantize_fp8_per_tensor(rows, scales[:, h].contiguous()), merged)[0])
    return merged


def fp8_tensor_weights(layer: Any, static_inputs: bool) -> FP8TensorWeights:
    """FP8 per-tensor container; with static activation scales, one (the largest) per GEMM input."""
    w13_scale = _one_w13_scale(layer.w13_weight.data, layer.w13_weight_scale.data)
    a13 = a2 = None
    if static_inputs:
        if layer.w13_input_scale is None or layer.w2_input_scale is None:
            raise unsupported("a static-activation FP8 checkpoint without input scales")
        a13 = layer.w13_input_scale.data.max().reshape(1).float()
        a2 = layer.w2_input_scale.data.max().reshape(1).float()
    return FP8TensorWeights(
        layer.w13_weight.data,
        w13_scale.float().contiguous(),
        layer.w2_weight.data,
        layer.w2_weight_scale.data.reshape(-1),
        a13,
        a2,
    )


def nvfp4_weights(layer: Any) -> NVFP4Weights:
    """ModelOpt NVFP4 container (checkpoint's linear scale layout, gate's and up's global scales)."""
    scale_2 = layer.w13_weight_scale_2.data
    if scale_2.dim() != 2:
        raise unsupported("an NVFP4 layout other than ModelOpt's gated one (w13_weight_scale_2 [E, 2])")
    return NVFP4Weights(
        layer.w13_weight.data,
        layer.w13_weight_scale.data,
        scale_2,
        layer.w2_weight.data,
        layer.w2_weight_scale.data,
        layer.w2_weight_scale_2.data,
    )


def bind(layer: Any, weights: ExpertWeights) -> MoELayer:
    """Build our layer for the SGLang MoE ``layer`` over ``weights`` and attach its binding."""
    config = layer.moe_runner_config
    moe_config = MoEConfig(
        num_experts=weights.num_experts,
        top_k=config.top_k,
        apply_router_weight_on_input=bool(config.apply_router_weight_on_input),
    )
    try:
        moe = LAYER_TYPES[weights.precision](weights, moe_config)
    except (TypeError, ValueError) as err:
        raise unsupported(f"MoE layer {config.layer_id} ({err})") from err
    scale = None if layer.should_fuse_routed_scaling_factor_in_topk else config.routed_scaling_factor
    setattr(layer, ATTR, Binding(moe, config.layer_id, scale if scale not in (None, 1.0) else None))
    logger.debug(
        "moe_backend: layer %s bound (%s, %d local experts, top-%d, kernel %s)",
        config.layer_id,
        moe.precision,
        weights.num_experts,
        config.top_k,
        moe.kernel_name(routed=True),
    )
    return moe


def run(binding: Binding, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Our experts for ``hidden [T, H]`` bf16 and SGLang's top-k (local ids ``[T, k]``, ``-1`` = elsewhere;
    weights ``[T, k]``): ``[T, H]`` bf16, router-weighted, reduced, ``routed_scaling_factor`` applied once.

    With routed-experts capture on, the ids go through our routing-replay buffer to SGLang's capturer.
    """
    ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
    weights = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    if binding.routed_scaling_factor is not None:
        weights = weights * binding.routed_scaling_factor
    if binding.capturer is None:
        return binding.layer.experts(hidden, ids, weights)
    out = binding.layer.forward_routed(hidden, (ids, weights), routing_replay_out=binding.replay)
    assert binding.replay is not None  # set together with the capturer
    binding.capturer.capture(layer_id=binding.layer_id, topk_indices=binding.replay[: hidden.shape[0]])
    return out
