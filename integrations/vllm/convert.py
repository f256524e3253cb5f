"""vLLM MoE layer -> :class:`~moe_backend.MoELayer`, once, after its weights are loaded.

The containers wrap vLLM's own parameter storage (no copy): FP8 block
``w13_weight [E, 2I, H]`` e4m3 with ``w13_weight_scale_inv [E, 2I/128, H/128]``
fp32; FP8 per-tensor ``w13_weight`` with ``w13_weight_scale [E]`` (vLLM has
already folded gate/up into one scale per expert) and optional static input
scales; ModelOpt NVFP4 ``w13_weight [E, 2I, H/2]`` uint8 with
``w13_weight_scale [E, 2I, H/16]`` e4m3 and ``w13_weight_scale_2 [E, 2]`` fp32
(gate and up kept apart, each applied exactly: vLLM keeps only the gate's).

The environment variable ``MOE_BACKEND_NUMERICS`` picks our layers' numerics
(:data:`moe_backend.layer.NUMERICS`): ``accurate`` (default), or ``vllm_triton`` to decode the
same tokens as vLLM's ``triton`` backend (FP8 block-scale checkpoints only; a checkpoint it
cannot serve stops start-up).

Each converted layer gets a :class:`Binding`, stored on the vLLM layer and
found again from the ``w1`` tensor that vLLM hands to ``apply`` (its storage
pointer), so the experts object needs no reference to the layer.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from moe_backend import LAYER_TYPES, FP8BlockWeights, FP8TensorWeights, MoEConfig, MoELayer, NVFP4Weights
from moe_backend.expert_weights import ExpertWeights
from moe_backend.kernels.registry import KERNELS

from .support import numerics as requested_numerics, unsupported

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Binding:
    """Our layer for one vLLM MoE layer, plus its routed-experts capture (see ``capture``).

    ``replay`` is the int16 ``[R, k]`` routing-replay buffer that ``capture_fn``
    reads its rows from; both are None unless vLLM captures routed experts.
    """

    layer: MoELayer
    capture_fn: Optional[Callable[[torch.Tensor], None]] = None
    replay: Optional[torch.Tensor] = None


#: ``w13`` storage pointer -> binding; the vLLM layer owns the binding.
_BINDINGS: Dict[int, "weakref.ref[Binding]"] = {}

ATTR = "moe_backend_binding"


def binding_for(w1: torch.Tensor) -> Binding:
    """The binding whose ``w13`` is ``w1`` (the tensor vLLM passes to ``apply``)."""
    ref = _BINDINGS.get(w1.data_ptr())
    binding = ref() if ref is not None else None
    if binding is None:
        raise RuntimeError(
            "moe_backend: this MoE layer's weights were never converted (the vLLM quantization "
            "method did not call the oracle's convert_to_*_moe_kernel_format)"
        )
    return binding


def expert_offset(expert_map: Optional[torch.Tensor], local_num_experts: int) -> int:
    """Global id of local expert 0, from vLLM's ``expert_map [E_global]`` (global -> local, -1 elsewhere).

    Runs once at start-up (it reads the map on the host); a placement that is
    not one contiguous block of global ids is refused.
    """
    if expert_map is None:
        return 0
    emap = expert_map.cpu()
    owned = torch.nonzero(emap >= 0).flatten()
    offset = int(owned[0]) if owned.numel() else 0
    expected = torch.arange(local_num_experts)
    if (
        owned.numel() != local_num_experts
        or not torch.equal(emap[owned].long(), expected)
        or not torch.equal(owned, expected + offset)
    ):
        raise unsupported(
            f"an expert placement that is not contiguous (this rank owns global experts "
            f"{owned.tolist()[:8]}{'...' if owned.numel() > 8 else ''})"
        )
    return offset


def _ue8m0() -> bool:
    """DeepSeek V3.1 checkpoints round activation scales to powers of two (``scale_fmt: ue8m0``)."""
    from vllm.config import get_current_vllm_config

    model = get_current_vllm_config().model_config
    quant = getattr(model.hf_config, "quantization_config", None) if model is not None else None
    return isinstance(quant, dict) and quant.get("scale_fmt") == "ue8m0"


def fp8_weights(
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    a13_scale: Optional[torch.Tensor],
    a2_scale: Optional[torch.Tensor],
) -> ExpertWeights:
    """FP8 block (3-D scales) or per-tensor (one scale per expert) container over vLLM's tensors."""
    if w13_scale.dim() == 3:
        return FP8BlockWeights(w13.data, w13_scale.data, w2.data, w2_scale.data, ue8m0=_ue8m0())
    scalar = lambda s: None if s is None else s.data.reshape(1)  # noqa: E731  vLLM keeps one max scale
    return FP8TensorWeights(
        w13.data, w13_scale.data.reshape(-1), w2.data, w2_scale.data.reshape(-1), scalar(a13_scale), scalar(a2_scale)
    )


def nvfp4_weights(
    layer: Any,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_scale_2: torch.Tensor,
) -> NVFP4Weights:
    """ModelOpt NVFP4 container; reads ``layer.w13_weight_scale_2 [E, 2]`` before vLLM narrows it."""
    scale_2 = getattr(layer, "w13_weight_scale_2", None)
    if scale_2 is None or scale_2.dim() != 2:
        raise unsupported("an NVFP4 layout other than ModelOpt's (w13_weight_scale_2 [E, 2])")
    return NVFP4Weights(w13.data, w13_scale.data, scale_2.data, w2.data, w2_scale.data, w2_scale_2.data)


def _check_graph_safe(moe: MoELayer) -> None:
    """Refuse, at start-up, a kernel that cannot run under the CUDA graphs vLLM will capture."""
    from vllm.config import get_current_vllm_config

    if moe.device.type != "cuda":
        return
    config = get_current_vllm_config()
    eager = config.model_config is not None and config.model_config.enforce_eager
    kernel = KERNELS[moe.kernel_name(routed=True)]
    if not eager and not kernel.capturable:
        raise unsupported(
            f"{moe.precision} on this GPU under CUDA graphs (the available kernel {kernel.name!r} "
            f"is not capturable; pass --enforce-eager to run it anyway)"
        )


def bind(layer: Any, weights: ExpertWeights) -> MoELayer:
    """Build our layer for the vLLM MoE ``layer`` over ``weights`` and register its binding."""
    offset = expert_offset(layer.expert_map, layer.local_num_experts)
    config = MoEConfig(
        num_experts=layer.global_num_experts,
        top_k=layer.top_k,
        local_expert_offset=offset,
        apply_router_weight_on_input=bool(layer.apply_router_weight_on_input),
    )
    numerics = requested_numerics()
    try:
        moe = LAYER_TYPES[weights.precision](weights, config, numerics=numerics)
    except (TypeError, ValueError) as err:
        raise unsupported(f"MoE layer {getattr(layer, 'layer_name', '?')!r} ({err})") from err
    _check_graph_safe(moe)
    binding = Binding(moe)
    setattr(layer, ATTR, binding)
    _BINDINGS[weights.w13.data_ptr()] = weakref.ref(binding)
    logger.debug(
        "moe_backend: %s bound (%s, E=%d from %d, kernel %s, numerics %s)",
        getattr(layer, "layer_name", "?"),
        moe.precision,
        weights.num_experts,
        offset,
        moe.kernel_name(routed=True),
        numerics,
    )
    return moe
