"""vLLM's routed-experts capture (``--enable-return-routed-experts``) fed by our routing replay.

vLLM binds a capture callback to each MoE router, which records the router's
top-k ids. For layers we serve, that callback moves to our binding: the
experts run through :meth:`MoELayer.forward_routed` with a routing-replay
buffer and the callback receives the ids our kernel actually consumed (int16
rows ``[:T]`` of a buffer sized for the engine's max tokens, so CUDA graphs
replay it without allocating).
"""

from __future__ import annotations

import logging

import torch

from .compat import after_capture_binding
from .convert import ATTR

logger = logging.getLogger(__name__)


def _max_rows() -> int:
    """Most tokens one MoE layer sees in a step: max batched tokens, gathered across DP ranks."""
    from vllm.config import get_current_vllm_config

    config = get_current_vllm_config()
    return config.scheduler_config.max_num_batched_tokens * config.parallel_config.data_parallel_size


def move_capture_to_experts(model: torch.nn.Module) -> int:
    """Hand each bound router's capture callback to the binding of the layer it routes for."""
    moved = 0
    for module in model.modules():
        router = getattr(module, "router", None)
        capture_fn = getattr(router, "capture_fn", None)
        if router is None or capture_fn is None:
            continue
        binding = next((getattr(m, ATTR) for m in module.modules() if hasattr(m, ATTR)), None)
        if binding is None:
            continue
        moe = binding.layer
        binding.replay = torch.zeros(_max_rows(), moe.config.top_k, dtype=torch.int16, device=moe.device)
        binding.capture_fn = capture_fn
        router.set_capture_fn(None)
        moved += 1
    logger.info("moe_backend: routed-experts capture fed by routing replay in %d MoE layers", moved)
    return moved


def install() -> None:
    """Move capture callbacks whenever vLLM binds its capturer."""
    after_capture_binding(move_capture_to_experts)
