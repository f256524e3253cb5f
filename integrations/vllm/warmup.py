"""Our tuning warm-up inside vLLM's kernel warm-up, before CUDA-graph capture.

vLLM's worker runs ``kernel_warmup(worker)`` after its profiling and compile
runs and before ``capture_model()``; we run first in it. Each served layer is
tuned for the token counts the engine can hand it: ``max_num_batched_tokens``
times the data-parallel size (DP ranks' tokens are gathered before the
experts). Layers without a ``warmup`` method (tuning not installed) are skipped.
Under expert parallelism every rank tunes its own experts (the tuning cache keys
on the local expert count); the log line names the rank and its expert range.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from .convert import ATTR

logger = logging.getLogger(__name__)


def warm_up(model: Any, max_num_tokens: int, rank: int = 0) -> int:
    """Call ``layer.warmup(max_num_tokens)`` on every layer we serve in ``model`` (of worker ``rank``);
    returns the count."""
    served = [m for m in model.modules() if hasattr(m, ATTR)]
    tunable = [m for m in served if hasattr(getattr(m, ATTR).layer, "warmup")]
    if not tunable:
        return 0
    start = time.perf_counter()
    for module in tunable:
        getattr(module, ATTR).layer.warmup(max_num_tokens)
    logger.info(
        "moe_backend: tuning warm-up of %d MoE layers for up to %d tokens took %.2f s (rank %d, experts %s)",
        len(tunable),
        max_num_tokens,
        time.perf_counter() - start,
        rank,
        ", ".join(sorted({_expert_range(m) for m in tunable})),
    )
    return len(tunable)


def _expert_range(module: Any) -> str:
    """``[first, end) of E``: the global ids of the experts a vLLM MoE layer holds on this rank."""
    config = getattr(module, ATTR).layer.config
    first = config.local_expert_offset
    return f"[{first}, {first + module.local_num_experts}) of {config.num_experts}"


def _run(worker: Any) -> None:
    config = worker.vllm_config
    warm_up(
        worker.model_runner.get_model(),
        config.scheduler_config.max_num_batched_tokens * config.parallel_config.data_parallel_size,
        getattr(worker, "rank", 0),
    )


def install() -> None:
    """Wrap ``kernel_warmup`` where the GPU worker imported it by name."""
    import vllm.v1.worker.gpu_worker as gpu_worker

    original = gpu_worker.kernel_warmup

    @functools.wraps(original)
    def kernel_warmup(worker, *args, **kwargs):
        _run(worker)
        return original(worker, *args, **kwargs)

    gpu_worker.kernel_warmup = kernel_warmup
