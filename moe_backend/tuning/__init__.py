"""Autotuning keyed on the engine's serving max tokens (docs/design.md §8).

- :mod:`.buckets`: the hybrid token-count buckets and the batch -> bucket mapping;
- :mod:`.inputs`: seeded profiling inputs (approximate-max-load top-k for one EP rank);
- :mod:`.cache`: the persistent JSON cache of tuned configurations;
- :mod:`.tuner`: the tuner (cold-L2 timing per bucket) and the runtime lookup.
"""

from .buckets import buckets, map_to_bucket, map_to_bucket_uncapped
from .cache import CacheEntry, ProblemSignature, TuningCache, current_environment, default_cache_dir
from .inputs import MoEInputs, expert_quotas, moe_inputs, profiling_hidden, profiling_router_logits, profiling_topk
from .tuner import CudaTimer, Tuner, TuningResult, tune

__all__ = [
    "CacheEntry",
    "CudaTimer",
    "MoEInputs",
    "ProblemSignature",
    "Tuner",
    "TuningCache",
    "TuningResult",
    "buckets",
    "current_environment",
    "default_cache_dir",
    "expert_quotas",
    "map_to_bucket",
    "map_to_bucket_uncapped",
    "moe_inputs",
    "profiling_hidden",
    "profiling_router_logits",
    "profiling_topk",
    "tune",
]
