"""Our tuning warm-up inside vLLM's kernel warm-up, before CUDA-graph capture.

vLLM's worker runs ``kernel_warmup(worker)`` after its profiling and compile
runs and before ``capture_model()``; we run first in it. Each served layer is
tuned for the token counts the engine can hand it: ``max_num_batched_tokens``
times the data-parallel size (DP ranks' tokens are gathered before the
experts). Layers without a ``warmup`` method (tuning not installed) are skipped.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from .convert import ATTR

logger = logging.getLogger(__name__)


def warm_up(model: Any, max_num_tokens: int) -> int:
    """Call ``layer.warmup(max_num_tokens)`` on every layer we serve in ``model``; returns the count."""
    layers = [getattr(m, ATTR).layer for m in model.modules() if hasattr(m, ATTR)]
    tunable = [layer for layer in layers if hasattr(layer, "warmup")]
    if not tunable:
        return 0
    start = time.perf_counter()
    for layer in tunable:
        layer.warmup(max_num_tokens)
    logger.info("moe_backend: tuning warm-up of %d MoE layers for up to %d tokens took %.2f s",
                len(tunable), max_num_tokens, time.perf_counter() - start)
    return len(tunable)


def _run(worker: Any) -> None:
    config = worker.vllm_config
    warm_up(worker.model_runner.get_model(),
            config.scheduler_config.max_num_batched_tokens * config.parallel_config.data_parallel_size)


def install() -> None:
    """Wrap ``kernel_warmup`` where the GPU worker imported it by name."""
    import vllm.v1.worker.gpu_worker as gpu_worker

    original = gpu_worker.kernel_warmup

    @functools.wraps(original)
    def kernel_warmup(worker, *args, **kwargs):
        _run(worker)
        return original(worker, *args, **kwargs)

    gpu_worker.kernel_warmup = kernel_warmup
