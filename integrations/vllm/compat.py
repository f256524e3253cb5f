"""The one place that knows how vLLM versions differ (supported: 0.26 to 0.33).

Everything else in the adapter uses interfaces that are the same in both: the
``MoEBackend`` Literal, the FP8/NVFP4 oracles, ``FusedMoEExpertsModular`` and
``kernel_warmup`` imported by name into ``vllm.v1.worker.gpu_worker``. What
differs is where the routed-experts capturer is bound to the routers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from typing import Callable, Tuple

import torch

SUPPORTED = ((0, 26), (0, 34))  # [min, max) as (major, minor)


def vllm_version() -> Tuple[int, int, int]:
    """Installed vLLM version as (major, minor, patch); raises outside the supported range."""
    raw = importlib.metadata.version("vllm")
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", raw)
    if match is None:
        raise RuntimeError(f"moe_backend: cannot parse the vLLM version {raw!r}")
    version = tuple(int(g or 0) for g in match.groups())
    if not SUPPORTED[0] <= version[:2] < SUPPORTED[1]:
        raise RuntimeError(
            f"moe_backend: vLLM {raw} is not supported; the plugin supports vLLM "
            f">={SUPPORTED[0][0]}.{SUPPORTED[0][1]},<{SUPPORTED[1][0]}.{SUPPORTED[1][1]}"
        )
    return version  # type: ignore[return-value]


def after_capture_binding(hook: Callable[[torch.nn.Module], object]) -> None:
    """Run ``hook(model)`` right after vLLM binds its routed-experts capturer to the routers.

    vLLM 0.33 binds in ``routed_experts_capturer.bind_routed_experts_capturer``
    (called by the aux-output connector); 0.26 in
    ``GPUModelRunner._bind_routed_experts_capturer``.
    """
    if vllm_version()[:2] >= (0, 33):
        import vllm.distributed.aux_output_connector.worker as connector
        import vllm.model_executor.layers.fused_moe.routed_experts_capturer as rec

        original = rec.bind_routed_experts_capturer

        @functools.wraps(original)
        def bind(model, capturer):
            original(model, capturer)
            hook(model)

        rec.bind_routed_experts_capturer = bind
        connector.bind_routed_experts_capturer = bind
    else:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        original = GPUModelRunner._bind_routed_experts_capturer  # type: ignore[attr-defined]  # vLLM < 0.33

        @functools.wraps(original)
        def bind_method(self, capturer):
            original(self, capturer)
            hook(self.model)

        GPUModelRunner._bind_routed_experts_capturer = bind_method  # type: ignore[attr-defined]  # vLLM < 0.33
