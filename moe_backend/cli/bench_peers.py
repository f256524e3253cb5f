"""Peers timed by ``moe-backend bench --peers vllm``: vLLM's own MoE kernels on the bench's weights.

* ``vllm_triton`` (FP8 block-scale): vLLM's Triton ``fused_experts`` with its own
  configuration lookup (its tuned config files, else its default), what ``--moe-backend
  triton`` serves;
* ``vllm_triton`` (bf16): the same fused experts, unquantized;
* ``vllm_marlin`` (NVFP4): vLLM's Marlin W4A16 MoE on weights repacked by vLLM's own
  ``prepare_nvfp4_moe_layer_for_marlin``, what vLLM serves NVFP4 with on Hopper. Marlin keeps
  one global scale for ``w13`` (the gate's); the bench's weights give gate and up the same one.

Each peer is a callable ``(hidden [T, H] bf16, ids [T, k] int32, weights [T, k] fp32, out) ->
[T, H] bf16`` like our layer's engine call; peers return their own output tensor.
"""

from __future__ import annotations

import importlib
import logging
import types
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..expert_weights import BF16Weights, FP8BlockWeights, NVFP4Weights

logger = logging.getLogger(__name__)
Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: precision -> the peer's ``impl`` name in the records.
PEER_IMPLS = {"fp8_block": "vllm_triton", "bf16": "vllm_triton", "nvfp4": "vllm_marlin"}


def vllm_version() -> Optional[str]:
    """vLLM's version, or None when it does not import or is incomplete (its ``__version__``
    resolves lazily and fails where vLLM's own dependencies are missing, e.g. a partly unpacked
    offline bundle)."""
    try:
        import vllm

        return str(vllm.__version__)
    except Exception as exc:  # any failure means: no peer to time
        logger.info("vLLM is not usable here: %s: %s", type(exc).__name__, exc)
        return None


def _fused_marlin_moe() -> Callable[..., torch.Tensor]:
    """vLLM's ``fused_marlin_moe`` (its module moved between releases)."""
    for name in (
        "vllm.model_executor.layers.fused_moe.experts.marlin_moe",
        "vllm.model_executor.layers.fused_moe.fused_marlin_moe",
    ):
        try:
            return importlib.import_module(name).fused_marlin_moe
        except ImportError:
            continue
    raise ImportError("vllm: fused_marlin_moe not found in vllm.model_executor.layers.fused_moe")


def vllm_triton(weights: FP8BlockWeights) -> Run:
    """vLLM's Triton fused experts on FP8 block-scale ``weights`` (128 x 128 blocks)."""
    from vllm.model_executor.layers.fused_moe import fused_experts
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    quant = fp8_w8a8_moe_quant_config(w1_scale=weights.w13_scale, w2_scale=weights.w2_scale, block_shape=[128, 128])
    return lambda hidden, ids, topk_w, out: fused_experts(
        hidden, weights.w13, weights.w2, topk_w, ids, quant_config=quant
    )


def vllm_triton_bf16(weights: BF16Weights) -> Run:
    """vLLM's Triton fused experts on bf16 ``weights`` (its unquantized configuration)."""
    from vllm.model_executor.layers.fused_moe import fused_experts

    return lambda hidden, ids, topk_w, out: fused_experts(hidden, weights.w13, weights.w2, topk_w, ids)


def vllm_marlin(weights: NVFP4Weights) -> Run:
    """vLLM's Marlin W4A16 MoE on NVFP4 ``weights`` (checkpoint layout), repacked by vLLM."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import prepare_nvfp4_moe_layer_for_marlin
    from vllm.scalar_type import scalar_types

    shim = types.SimpleNamespace(
        num_experts=weights.num_experts,
        hidden_size=weights.hidden_size,
        intermediate_size_per_partition=weights.intermediate_size,
        params_dtype=torch.bfloat16,
    )
    w13, s13, g13, w2, s2, g2 = prepare_nvfp4_moe_layer_for_marlin(
        # vLLM reads only the shim's attributes of the layer it types as RoutedExperts
        shim,  # type: ignore[arg-type]
        weights.w13,
        weights.w13_scale,
        weights.w13_scale_2[:, 0].contiguous(),
        weights.w2,
        weights.w2_scale,
        weights.w2_scale_2,
        is_act_and_mul=True,
    )
    fused_marlin_moe = _fused_marlin_moe()
    quant_type = scalar_types.float4_e2m1f.id
    experts = weights.num_experts
    return lambda hidden, ids, topk_w, out: fused_marlin_moe(
        hidden,
        w13,
        w2,
        None,
        None,
        s13,
        s2,
        topk_w,
        ids,
        quant_type_id=quant_type,
        global_num_experts=experts,
        global_scale1=g13,
        global_scale2=g2,
        workspace=shim.workspace,
    )


def vllm_peers(weights: Mapping[str, Callable[[], object]], precisions: Sequence[str]) -> Dict[str, Tuple[str, Run]]:
    """precision -> ``(impl, run)`` for each precision of ``precisions`` that vLLM serves on Hopper
    (keyed by precision: FP8 block and bf16 share the ``impl`` name ``vllm_triton``).

    ``weights``: precision -> a builder of the bench's weights in that precision.
    Raises ImportError when vLLM does not import.
    """
    if vllm_version() is None:
        raise ImportError("--peers vllm: vllm does not import in this environment")
    builders: Dict[str, Callable[[Any], Run]] = {
        "fp8_block": vllm_triton,
        "bf16": vllm_triton_bf16,
        "nvfp4": vllm_marlin,
    }
    return {p: (PEER_IMPLS[p], builders[p](weights[p]())) for p in precisions if p in builders}
