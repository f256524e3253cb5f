"""Calls into FlashInfer's TRT-LLM-gen fused MoE (SM100/SM103), one routed and one computed per precision.

Every call goes by keyword (the routed and computed functions differ in their trailing arguments)
with the weights of :mod:`.layout`, the layer's sizes and routing (:class:`LayerContext`),
``tune_max_num_tokens`` = the engine's max tokens, and ``output=out[:T]`` (the caller's buffer or
the layer's), so FlashInfer allocates no output of its own.

Routing: DeepSeek-V3 layers (``noaux_tc`` within the launcher's limits) name FlashInfer's
``DeepSeekV3`` method with their grouping and scale in both entry points; with logits FlashInfer
routes (sigmoid, bias, groups, top-k, normalization, scale), with precomputed top-k it uses the
given weights as they are. Other layers are routed by the layer and reach FlashInfer as top-k
under its ``TopK`` method. Replay: FlashInfer writes ``routing_replay_out`` where it accepts one
(every computed call, FP8 per-tensor routed); for FP8 block and NVFP4 routed calls we write it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ...quant.fp8 import activation_codes, quantize_fp8_per_token_group
from ...routing import write_routing_replay
from ..registry import LayerContext
from .layout import FP8BlockLayout, FP8TensorLayout, NVFP4Layout
from .readiness import FlashInferNotReadyError, check_flashinfer_ready

logger = logging.getLogger(__name__)

#: The DeepSeek-V3 routing kernel's limits (FlashInfer 0.7.2 launcher): top_k <= 8 up to 384 experts
#: (22 above), topk_group <= 4, experts divisible by 4 and by n_group.
_DSV3_EXPERTS_SMALL = 384


def computed_routing_defect(context: LayerContext) -> Optional[str]:
    """Why FlashInfer cannot compute this layer's routing from logits, or None when it can."""
    r, e, k = context.routing, context.num_experts, context.top_k
    if r.method != "noaux_tc":
        return f"FlashInfer's DeepSeekV3 routing serves noaux_tc routing, not {r.method!r}"
    max_k = 8 if e <= _DSV3_EXPERTS_SMALL else 22
    if k > max_k:
        return f"its DeepSeekV3 routing takes top_k <= {max_k} with {e} experts, got {k}"
    if r.topk_group > 4:
        return f"its DeepSeekV3 routing takes topk_group <= 4, got {r.topk_group}"
    if e % 4 or e % r.n_group:
        return f"its routing needs an expert count divisible by 4 and by n_group={r.n_group}, got {e}"
    if k >= r.topk_group * e // r.n_group:
        return "its DeepSeekV3 routing needs top_k below the number of experts in the selected groups"
    return None


def _routing_method(context: LayerContext) -> Dict[str, Any]:
    """The routing arguments every call of this layer shares (routed and computed alike)."""
    from flashinfer.tllm_enums import RoutingMethodType

    r = context.routing
    if computed_routing_defect(context) is None:
        return dict(
            routing_method_type=int(RoutingMethodType.DeepSeekV3),
            n_group=r.n_group,
            topk_group=r.topk_group,
            routed_scaling_factor=r.routed_scaling_factor if r.apply_routed_scaling else 1.0,
        )
    return dict(
        routing_method_type=int(RoutingMethodType.TopK), n_group=None, topk_group=None, routed_scaling_factor=None
    )


def _shared(
    prepared: Any, hidden: torch.Tensor, out: torch.Tensor, context: LayerContext, local_expert_offset: int
) -> Dict[str, Any]:
    from flashinfer.tllm_enums import ActivationType

    return dict(
        num_experts=context.num_experts,
        top_k=context.top_k,
        intermediate_size=prepared.intermediate_size,
        local_expert_offset=local_expert_offset,
        local_num_experts=prepared.num_experts,
        do_finalize=True,
        tune_max_num_tokens=context.max_num_tokens,
        activation_type=int(ActivationType.Swiglu),
        output=out[: hidden.shape[0]],
        **_routing_method(context),
    )


def _computed(
    context: LayerContext, router_logits: torch.Tensor, routing_replay_out: Optional[torch.Tensor]
) -> Dict[str, Any]:
    return dict(
        routing_logits=router_logits,
        routing_bias=context.correction_bias,
        norm_topk_prob=context.routing.norm_topk_prob,
        routing_replay_out=routing_replay_out,
    )


def _routed(ids: torch.Tensor, weights: torch.Tensor) -> Dict[str, Any]:
    return dict(topk_ids=(ids, weights), routing_bias=None)


# -- FP8 block ----------------------------------------------------------------------------------
def _fp8_block_args(p: FP8BlockLayout, hidden: torch.Tensor, apply_router_weight_on_input: bool) -> Dict[str, Any]:
    from flashinfer.tllm_enums import Fp8QuantizationType, WeightLayout

    # Per token per 128 channels, as our reference and the Hopper kernel (ue8m0 included);
    # FlashInfer reads the scales transposed, [H/128, T].
    q, s = quantize_fp8_per_token_group(hidden, 128, p.ue8m0)
    s_t = s.new_empty(s.shape[1], s.shape[0]).copy_(s.t())  # row-major strides even for one token
    return dict(
        hidden_states=q,
        hidden_states_scale=s_t,
        gemm1_weights=p.w13,
        gemm1_weights_scale=p.w13_scale,
        gemm2_weights=p.w2,
        gemm2_weights_scale=p.w2_scale,
        use_shuffled_weight=False,
        weight_layout=int(WeightLayout.MajorK),
        fp8_quantization_type=Fp8QuantizationType.DeepSeekFp8,
    )


# -- FP8 per tensor -----------------------------------------------------------------------------
def _fp8_tensor_args(p: FP8TensorLayout, hidden: torch.Tensor, apply_router_weight_on_input: bool) -> Dict[str, Any]:
    q = activation_codes(hidden.float(), p.a13_scale.reshape(()))  # as our reference
    return dict(
        hidden_states=q,
        gemm1_weights=p.w13,
        output1_scales_scalar=p.output1_scales_scalar,
        output1_scales_gate_scalar=p.output1_scales_gate_scalar,
        gemm2_weights=p.w2,
        output2_scales_scalar=p.output2_scales_scalar,
        use_routing_scales_on_input=apply_router_weight_on_input,
    )


# -- NVFP4 --------------------------------------------------------------------------------------
def _nvfp4_args(p: NVFP4Layout, hidden: torch.Tensor, apply_router_weight_on_input: bool) -> Dict[str, Any]:
    from flashinfer.fused_moe.api import QuantConfig, QuantFormat
    from flashinfer.fused_moe.prepare import prepare_trtllm_fp4_activations
    from flashinfer.tllm_enums import SfLayout

    # NVFP4 x NVFP4 with FlashInfer's unit global scale (its weight view assumes the same).
    q, sf = prepare_trtllm_fp4_activations(hidden, quant=QuantConfig(QuantFormat.NVFP4, QuantFormat.NVFP4))
    return dict(
        hidden_states=q,
        hidden_states_scale=sf,
        hidden_states_scale_layout=SfLayout.layout_linear,
        gemm1_weights=p.w13,
        gemm1_weights_scale=p.w13_scale,
        gemm1_bias=None,
        gemm1_alpha=None,
        gemm1_beta=None,
        gemm1_clamp_limit=None,
        gemm2_weights=p.w2,
        gemm2_weights_scale=p.w2_scale,
        gemm2_bias=None,
        output1_scale_scalar=p.w13_scale_2[:, 1].contiguous(),
        output1_scale_gate_scalar=p.w13_scale_2[:, 0].contiguous(),
        output2_scale_scalar=p.w2_scale_2,
    )


# -- the two entry points of each precision ----------------------------------------------------
Run = Callable[..., torch.Tensor]


def _entry_points(
    routed_name: str, computed_name: str, precision_args: Callable[..., Dict[str, Any]], routed_replays: bool
) -> Tuple[Run, Run]:
    """``(run, run_computed)`` over FlashInfer's ``routed_name`` (precomputed top-k) and
    ``computed_name`` (router logits in) functions of ``flashinfer.fused_moe``.

    ``precision_args(p, hidden, apply_router_weight_on_input)`` gives the precision's weights and
    quantized hidden states; ``routed_replays``: the routed function takes ``routing_replay_out``
    (else we write the replay from the ids). Both look the function up at call time (FlashInfer
    imports only where it runs). Each returns ``out[:T]``.
    """

    def run(
        p: Any,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        *,
        local_expert_offset: int,
        apply_router_weight_on_input: bool,
        out: torch.Tensor,
        context: LayerContext,
        routing_replay_out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        import flashinfer.fused_moe as fused_moe

        replay = {"routing_replay_out": routing_replay_out} if routed_replays else {}
        if not routed_replays:
            write_routing_replay(ids, routing_replay_out)
        if hidden.shape[0]:
            getattr(fused_moe, routed_name)(
                **_routed(ids, weights),
                **replay,
                **precision_args(p, hidden, apply_router_weight_on_input),
                **_shared(p, hidden, out, context, local_expert_offset),
            )
        return out[: hidden.shape[0]]

    def run_computed(
        p: Any,
        hidden: torch.Tensor,
        router_logits: torch.Tensor,
        *,
        local_expert_offset: int,
        apply_router_weight_on_input: bool,
        out: torch.Tensor,
        context: LayerContext,
        routing_replay_out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        import flashinfer.fused_moe as fused_moe

        if hidden.shape[0]:
            getattr(fused_moe, computed_name)(
                **_computed(context, router_logits, routing_replay_out),
                **precision_args(p, hidden, apply_router_weight_on_input),
                **_shared(p, hidden, out, context, local_expert_offset),
            )
        return out[: hidden.shape[0]]

    return run, run_computed


run_fp8_block, run_computed_fp8_block = _entry_points(
    "trtllm_fp8_block_scale_routed_moe", "trtllm_fp8_block_scale_moe", _fp8_block_args, routed_replays=False
)
run_fp8_tensor, run_computed_fp8_tensor = _entry_points(
    "trtllm_fp8_per_tensor_scale_routed_moe", "trtllm_fp8_per_tensor_scale_moe", _fp8_tensor_args, routed_replays=True
)
run_nvfp4, run_computed_nvfp4 = _entry_points(
    "trtllm_fp4_block_scale_routed_moe", "trtllm_fp4_block_scale_moe", _nvfp4_args, routed_replays=False
)

#: Layout type -> (run, run_computed).
_RUNS: Dict[type, Tuple[Run, Run]] = {
    FP8BlockLayout: (run_fp8_block, run_computed_fp8_block),
    FP8TensorLayout: (run_fp8_tensor, run_computed_fp8_tensor),
    NVFP4Layout: (run_nvfp4, run_computed_nvfp4),
}


# -- warm-up ------------------------------------------------------------------------------------
def warmup(
    prepared: Any,
    context: LayerContext,
    inputs: Any,
    computed: bool,
    *,
    local_expert_offset: int,
    apply_router_weight_on_input: bool,
) -> None:
    """Check FlashInfer is obtainable, then build its module and tune it for ``context.max_num_tokens``.

    ``inputs`` (:class:`~moe_backend.tuning.MoEInputs` of max-load top-k for the max tokens) drive
    FlashInfer's autotuner over its token buckets up to ``tune_max_num_tokens`` through the routed
    function, and through the computed one (seeded logits) when ``computed``.
    """
    from flashinfer.autotuner import autotune
    from flashinfer.fused_moe import core

    check_flashinfer_ready()
    started = time.perf_counter()
    try:  # the first load fetches the cubins and compiles the module: at start-up, not in a request
        core.get_trtllm_moe_sm100_module()
    except (RuntimeError, AssertionError, OSError) as exc:
        raise FlashInferNotReadyError(
            f"FlashInfer could not load its TRT-LLM-gen MoE module ({type(exc).__name__}: {exc}); if it could not "
            "fetch its cubins, install flashinfer-cubin of the same version (or set FLASHINFER_CUBIN_DIR); if it "
            "could not compile, install flashinfer-jit-cache or a CUDA toolkit"
        ) from exc
    logger.info("FlashInfer TRT-LLM-gen MoE module loaded in %.1f s", time.perf_counter() - started)
    run, run_computed = _RUNS[type(prepared)]
    kw = dict(
        local_expert_offset=local_expert_offset,
        apply_router_weight_on_input=apply_router_weight_on_input,
        out=torch.empty_like(inputs.hidden),
        context=context,
    )
    started = time.perf_counter()
    with autotune(True):
        run(prepared, inputs.hidden, inputs.topk_ids, inputs.topk_weights, **kw)
        if computed:
            gen = torch.Generator(device=inputs.hidden.device).manual_seed(0)
            logits = torch.randn(
                inputs.hidden.shape[0], context.num_experts, generator=gen, device=inputs.hidden.device
            )
            run_computed(prepared, inputs.hidden, logits, **kw)
    logger.info(
        "FlashInfer TRT-LLM-gen MoE (%s) tuned up to %d tokens in %.1f s",
        type(prepared).__name__,
        context.max_num_tokens,
        time.perf_counter() - started,
    )
