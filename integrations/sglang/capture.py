"""SGLang's routed-experts capture (``--enable-return-routed-experts``) fed by our routing replay.

SGLang records each MoE layer's top-k in its ``TopK`` module, before dispatch.
For layers we serve on one EP rank, the record moves to our runner core: the
experts run through :meth:`MoELayer.forward_routed` with an int16 routing-replay
buffer sized like the capturer's (rows ``[:T]`` are written, so CUDA graphs
replay it without allocating) and the capturer receives the ids our kernel
actually consumed, fused shared expert included. Under expert parallelism each
rank's runner sees only its local ids (``-1`` elsewhere), which do not make a
global record, so SGLang's own capture of the global top-k stays in place.
"""

from __future__ import annotations

import logging

import torch

from .binding import ATTR

logger = logging.getLogger(__name__)


def move_capture_to_experts(model: torch.nn.Module) -> int:
    """Feed SGLang's routed-experts capturer from our routing replay in every MoE block we serve."""
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.state_capturer.routed_experts import get_global_experts_capturer

    capturer = get_global_experts_capturer()
    if capturer is None:
        return 0
    if get_parallel().moe_ep_size > 1:
        logger.info("moe_backend: expert parallelism: routed experts are recorded by SGLang's TopK (global ids)")
        return 0
    rows = capturer.device_cache.buffer.shape[0]
    moved = 0
    for block in model.modules():
        experts = next((m for m in block.children() if hasattr(m, ATTR)), None)
        topk = next((m for m in block.children() if isinstance(m, TopK)), None)
        if experts is None or topk is None:
            continue
        binding = getattr(experts, ATTR)
        moe = binding.layer
        binding.replay = torch.zeros(rows, moe.config.top_k, dtype=torch.int16, device=moe.device)
        binding.capturer = capturer
        topk.topk_config.allow_routed_experts_capture = False
        moved += 1
    logger.info("moe_backend: routed-experts capture fed by routing replay in %d MoE layers", moved)
    return moved
