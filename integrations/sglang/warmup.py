"""Our tuning warm-up (and the capture hand-over) before SGLang captures CUDA graphs.

SGLang's model runner builds its CUDA graphs in ``ModelRunner.init_cuda_graphs``
(called at start-up even with graphs disabled), after the model is loaded and the
routed-experts capturer exists; we run first in it. Each served layer is tuned
for every token count SGLang can hand it: the larger of the chunked-prefill size
(``--max-prefill-tokens`` when chunking is off) and the largest CUDA-graph batch,
times the DP size when DP attention gathers tokens before the experts. Layers
served by us are not tuned by SGLang's own MoE autotune (it tunes its runners).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .binding import ATTR
from .capture import move_capture_to_experts

logger = logging.getLogger(__name__)


def max_num_tokens() -> int:
    """Most tokens one MoE layer sees in a forward pass under the running server's settings."""
    from sglang.srt.layers.dp_attention import is_dp_attention_enabled
    from sglang.srt.runtime_context import get_exec, get_parallel, get_schedule

    schedule = get_schedule()
    prefill = schedule.chunked_prefill_size
    if prefill is None or prefill <= 0:
        prefill = schedule.max_prefill_tokens
    graphs = get_exec().graph.cuda_graph_config
    graph_bs = (
        max((getattr(getattr(graphs, phase, None), "max_bs", 0) or 0 for phase in ("decode", "prefill")), default=0)
        if graphs is not None
        else 0
    )
    dp = get_parallel().num_dp_ranks if is_dp_attention_enabled() else 1
    return max(prefill, graph_bs) * dp


def warm_up(model: Any, tokens: int) -> int:
    """Call ``layer.warmup(tokens)`` on every layer we serve in ``model``; returns the count."""
    layers = [getattr(m, ATTR).layer for m in model.modules() if hasattr(m, ATTR)]
    tunable = [layer for layer in layers if hasattr(layer, "warmup")]
    if not tunable:
        return 0
    start = time.perf_counter()
    for layer in tunable:
        layer.warmup(tokens)
    logger.info(
        "moe_backend: tuning warm-up of %d MoE layers for up to %d tokens took %.2f s",
        len(tunable),
        tokens,
        time.perf_counter() - start,
    )
    return len(tunable)


def _before_cuda_graphs(original, model_runner, *args, **kwargs):
    """AROUND hook on ``ModelRunner.init_cuda_graphs``."""
    from .support import selected

    if selected():
        move_capture_to_experts(model_runner.model)
        warm_up(model_runner.model, max_num_tokens())
    return original(model_runner, *args, **kwargs)


AROUND_HOOKS = {"sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs": _before_cuda_graphs}
