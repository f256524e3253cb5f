"""What moe_backend can serve in vLLM, and the start-up refusals for the rest.

Two checks, both before the first request:

- on the engine config (``KernelConfig.set_platform_defaults``, run while
  ``VllmConfig`` is built, before any worker starts): quantization method,
  model dtype, expert activation and parallel layout;
- on each MoE layer when vLLM selects its experts kernel (``oracle``): the
  experts class's predicates (quantization scheme, activation, parallel config).

A refusal raises :class:`UnsupportedByMoEBackend` naming what is unsupported and
which backends can serve it.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable

BACKEND_NAME = "moe_backend"

#: Environment variable naming our layers' numerics (``moe_backend.layer.NUMERICS``; see ``convert``).
NUMERICS_ENV = "MOE_BACKEND_NUMERICS"


def numerics() -> str:
    """The numerics ``MOE_BACKEND_NUMERICS`` asks for (``accurate`` when unset)."""
    return os.environ.get(NUMERICS_ENV, "accurate")


#: ``--quantization`` methods whose MoE layers we run (see ``oracle``).
QUANTIZATIONS = ("fp8", "modelopt", "modelopt_fp4")

#: All-to-all backends that hand the experts global ids in the standard layout.
ALL2ALL_BACKENDS = ("allgather_reducescatter", "naive")

SERVES = (
    "moe_backend serves FP8 block-scale (DeepSeek-V3 'fp8'), FP8 per-tensor ('fp8', ModelOpt "
    "'modelopt') and NVFP4 (ModelOpt 'modelopt_fp4') MoE checkpoints with silu experts in bfloat16, "
    "under tensor parallelism, expert parallelism with contiguous ('linear') expert placement, and "
    f"data+expert parallelism with the {' or '.join(ALL2ALL_BACKENDS)} all-to-all"
)


class UnsupportedByMoEBackend(ValueError):
    """A checkpoint or deployment that moe_backend cannot serve."""


def is_ours(moe_backend: Any) -> bool:
    """True when a vLLM ``moe_backend`` setting names this backend (``-`` or ``_``)."""
    return isinstance(moe_backend, str) and moe_backend.lower().replace("-", "_") == BACKEND_NAME


def unsupported(what: str) -> UnsupportedByMoEBackend:
    """The start-up error for ``what`` (e.g. "quantization 'gptq'")."""
    from .names import vllm_backend_names

    others = ", ".join(n for n in vllm_backend_names() if n != "auto")
    return UnsupportedByMoEBackend(
        f"--moe-backend {BACKEND_NAME}: {what} is not supported. {SERVES}. Serve this model with "
        f"--moe-backend auto, which picks among vLLM's own backends ({others}) for it."
    )


def _config_problems(vllm_config: Any) -> Iterable[str]:
    """Unsupported features of an engine config, as phrases for :func:`unsupported`."""
    import torch

    from moe_backend.layer import NUMERICS

    requested = numerics()
    if requested not in NUMERICS:
        yield f"{NUMERICS_ENV}={requested!r} (expected one of {', '.join(sorted(NUMERICS))})"
    model = vllm_config.model_config
    if model is not None:
        if model.quantization not in QUANTIZATIONS:
            yield f"quantization {model.quantization!r}"
        if model.dtype != torch.bfloat16:
            yield f"model dtype {model.dtype} (bfloat16 only)"
        act = getattr(model.hf_text_config, "hidden_act", "silu")
        if act != "silu":
            yield f"expert activation {act!r}"
    parallel = vllm_config.parallel_config
    if parallel.enable_eplb:
        yield "expert load balancing (--enable-eplb: redundant, remapped experts)"
    if parallel.enable_expert_parallel:
        if getattr(parallel, "expert_placement_strategy", "linear") != "linear":
            yield f"expert placement {parallel.expert_placement_strategy!r} (experts not contiguous per rank)"
        if parallel.data_parallel_size > 1 and parallel.all2all_backend not in ALL2ALL_BACKENDS:
            yield f"all-to-all backend {parallel.all2all_backend!r}"


def check_vllm_config(vllm_config: Any) -> None:
    """Raise :class:`UnsupportedByMoEBackend` when the engine config selects us for something we cannot serve."""
    if not is_ours(vllm_config.kernel_config.moe_backend):
        return
    problems = list(_config_problems(vllm_config))
    if problems:
        raise unsupported("; ".join(problems))


def install_config_check() -> None:
    """Run :func:`check_vllm_config` when vLLM finalises its config (every process that builds one)."""
    from vllm.config.kernel import KernelConfig

    original = KernelConfig.set_platform_defaults

    @functools.wraps(original)
    def set_platform_defaults(self, vllm_config):
        check_vllm_config(vllm_config)
        return original(self, vllm_config)

    KernelConfig.set_platform_defaults = set_platform_defaults  # type: ignore[method-assign]  # patching vLLM


def check_layer(experts_cls: Any, moe_config: Any, weight_key: Any, activation_key: Any) -> None:
    """Refuse an MoE layer our experts class does not support (vLLM's own predicates)."""
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk

    fmt = (
        mk.FusedMoEActivationFormat.BatchedExperts
        if moe_config.moe_parallel_config.use_batched_activation_format
        else mk.FusedMoEActivationFormat.Standard
    )
    ok, reason = experts_cls.is_supported_config(experts_cls, moe_config, weight_key, activation_key, fmt)
    if not ok:
        raise unsupported(f"this MoE layer ({reason})")
