"""What moe_backend can serve in SGLang, and the start-up refusals for the rest.

The check runs when SGLang builds each MoE layer (``FusedMoE.__init__``, while
the model is constructed, before its weights load and long before the first
request): the layer's quantization method must be one of ours (FP8 block-scale,
FP8 per-tensor, ModelOpt NVFP4), its experts gated SiLU in bfloat16, and the
deployment one whose dispatch hands the experts the standard top-k layout. A
refusal raises :class:`UnsupportedByMoEBackend` naming what is unsupported and
which backend serves it instead.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

BACKEND_NAME = "moe_backend"

SERVES = (
    "moe_backend serves FP8 block-scale (DeepSeek-V3 'fp8'), FP8 per-tensor ('fp8') and ModelOpt NVFP4 "
    "('modelopt_fp4') MoE layers with gated silu experts in bfloat16, under tensor parallelism and expert "
    "parallelism with the standard dispatcher (--moe-a2a-backend none)"
)


class UnsupportedByMoEBackend(ValueError):
    """A checkpoint or deployment that moe_backend cannot serve."""


def is_ours(backend: Any) -> bool:
    """True when an SGLang MoE runner backend (name or enum-like with ``.value``) names this backend."""
    name = getattr(backend, "value", backend)
    return isinstance(name, str) and name == BACKEND_NAME


def selected() -> bool:
    """True when ``--moe-runner-backend`` selects this backend in the running process."""
    from sglang.srt.layers.moe.utils import get_moe_runner_backend

    return is_ours(get_moe_runner_backend())


def unsupported(what: str) -> UnsupportedByMoEBackend:
    """The start-up error for ``what`` (e.g. "quantization method 'GPTQMarlinMoEMethod'")."""
    return UnsupportedByMoEBackend(
        f"--moe-runner-backend {BACKEND_NAME}: {what} is not supported. {SERVES}. Serve this model with "
        f"--moe-runner-backend auto, which picks among SGLang's own runners (triton, deep_gemm, marlin, "
        f"flashinfer_*, ...) for it."
    )


def _deployment_problems() -> Iterable[str]:
    from sglang.srt.layers.moe.utils import get_moe_a2a_backend
    from sglang.srt.runtime_context import get_lora, get_server_args

    a2a = get_moe_a2a_backend()
    if not a2a.is_none():
        yield f"--moe-a2a-backend {a2a.value} (its dispatch does not hand the experts the standard top-k)"
    lora = get_lora()
    if getattr(lora, "enable_lora", False) or getattr(lora, "lora_paths", None):
        yield "LoRA adapters on MoE layers"
    if getattr(get_server_args(), "enable_eplb", False):
        yield "expert load balancing (--enable-eplb: redundant, remapped experts)"


def layer_problems(layer: Any, our_methods: tuple) -> Iterable[str]:
    """Unsupported features of one SGLang ``FusedMoE`` layer, as phrases for :func:`unsupported`."""
    method = layer.quant_method
    if not isinstance(method, our_methods):
        yield f"quantization method {type(method).__name__} (an unquantized, excluded or other-format MoE layer)"
    config = layer.moe_runner_config
    if config.activation != "silu" or not config.is_gated:
        yield f"expert activation {config.activation!r}{'' if config.is_gated else ' (not gated)'}"
    if config.params_dtype not in (None, torch.bfloat16):
        yield f"model dtype {config.params_dtype} (bfloat16 only)"
    for name in ("gemm1_alpha", "gemm1_clamp_limit", "swiglu_limit"):
        if getattr(config, name, None) is not None:
            yield f"a clamped or scaled SwiGLU ({name}={getattr(config, name)})"
    if getattr(config, "no_combine", False):
        yield "no_combine (per-expert outputs left unreduced)"
    yield from _deployment_problems()


def check_layer(layer: Any, our_methods: tuple) -> None:
    """Raise :class:`UnsupportedByMoEBackend` for an SGLang MoE layer we were selected for but cannot serve."""
    problems = list(dict.fromkeys(layer_problems(layer, our_methods)))
    if problems:
        where = getattr(layer, "layer_id", None)
        raise unsupported(f"MoE layer {where if where is not None else '?'}: {'; '.join(problems)}")
