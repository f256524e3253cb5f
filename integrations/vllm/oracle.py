"""Route FP8 and NVFP4 MoE layers to :class:`MoEBackendExperts` (vLLM's MoE "oracle").

vLLM picks an MoE kernel per quantization in ``fused_moe/oracle/{fp8,nvfp4}.py``:
``map_*_backend`` turns the ``--moe-backend`` name into a backend tag,
``select_*_moe_backend`` returns ``(tag, experts class)`` and
``convert_to_*_moe_kernel_format`` converts the loaded weights for that tag.
For our name we return an existing tag whose quant-config and kernel
construction apply no weight conversion (FP8: ``TRITON``; NVFP4: ``MARLIN``,
W4A16 like us) with our experts class, and our convert builds the
:class:`~moe_backend.MoELayer` over vLLM's tensors instead of converting them.

The wrappers replace the oracle functions in the oracle modules (so later
imports get them) and in every already-imported vLLM module that imported
them by name (``quantization.fp8``, ``modelopt``, the online and
compressed-tensors MoE methods). Every symbol patched here is listed in
:data:`~.surface.SURFACE`. Where vLLM has its out-of-tree FP8 MoE backend registry
(main branch; no release yet), our experts class is also registered through it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
from typing import Any, Callable

from . import convert
from .support import BACKEND_NAME, check_layer, is_ours

logger = logging.getLogger(__name__)

#: vLLM's out-of-tree FP8 MoE backend registry (``register_fp8_moe_backend``), detected by feature.
FP8_REGISTRY = "vllm.model_executor.layers.fused_moe.oracle.fp8_registry"
#: Our experts class, by the qualified name the registry imports lazily.
EXPERTS_CLASS_PATH = "moe_backend.integrations.vllm.experts.MoEBackendExperts"

#: Modules that import the oracle functions by name; imported now so the sweep rebinds them.
_CALLERS = (
    "vllm.model_executor.layers.quantization.fp8",
    "vllm.model_executor.layers.quantization.modelopt",
    "vllm.model_executor.layers.quantization.online.fp8",
    "vllm.model_executor.layers.quantization.online.nvfp4",
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w8a8_fp8",
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe"
    ".compressed_tensors_moe_w4a4_nvfp4",
)


def _replace(module: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``module.name`` with ``make(original)`` there and wherever it was imported by name."""
    original = getattr(module, name)
    wrapped = functools.wraps(original)(make(original))
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("vllm") and getattr(mod, name, None) is original:
            setattr(mod, name, wrapped)


def _map(tag: Any) -> Callable[[Callable], Callable]:
    def make(original: Callable) -> Callable:
        def map_backend(runner_backend):
            return tag if is_ours(runner_backend) else original(runner_backend)

        return map_backend

    return make


def _select(tag: Any) -> Callable[[Callable], Callable]:
    def make(original: Callable) -> Callable:
        def select_backend(config, weight_key, activation_key, *args, **kwargs):
            if not is_ours(config.moe_backend):
                return original(config, weight_key, activation_key, *args, **kwargs)
            from .experts import MoEBackendExperts

            check_layer(MoEBackendExperts, config, weight_key, activation_key)
            logger.info("moe_backend: serving MoE layers with MoEBackendExperts (vLLM tag %s)", tag.value)
            return tag, MoEBackendExperts

        return select_backend

    return make


def _convert_fp8(original: Callable) -> Callable:
    def convert_fp8(fp8_backend, layer, w13, w2, w13_scale, w2_scale, w13_input_scale, w2_input_scale):
        if not is_ours(layer.moe_config.moe_backend):
            return original(fp8_backend, layer, w13, w2, w13_scale, w2_scale, w13_input_scale, w2_input_scale)
        convert.bind(layer, convert.fp8_weights(w13, w2, w13_scale, w2_scale, w13_input_scale, w2_input_scale))
        return w13, w2, w13_scale, w2_scale

    return convert_fp8


def _convert_nvfp4(original: Callable) -> Callable:
    def convert_nvfp4(
        nvfp4_backend,
        layer,
        w13,
        w13_scale,
        w13_scale_2,
        a13_scale,
        w2,
        w2_scale,
        w2_scale_2,
        a2_scale,
        *args,
        **kwargs,
    ):
        if not is_ours(layer.moe_config.moe_backend):
            return original(
                nvfp4_backend,
                layer,
                w13,
                w13_scale,
                w13_scale_2,
                a13_scale,
                w2,
                w2_scale,
                w2_scale_2,
                a2_scale,
                *args,
                **kwargs,
            )
        convert.bind(layer, convert.nvfp4_weights(layer, w13, w13_scale, w2, w2_scale, w2_scale_2))
        return w13, w13_scale, w13_scale_2, a13_scale, w2, w2_scale, w2_scale_2, a2_scale

    return convert_nvfp4


def register_fp8_backend() -> bool:
    """Register our experts class in vLLM's FP8 MoE backend registry; False where vLLM has none."""
    if importlib.util.find_spec(FP8_REGISTRY) is None:
        return False
    importlib.import_module(FP8_REGISTRY).register_fp8_moe_backend(BACKEND_NAME, (EXPERTS_CLASS_PATH,))
    logger.info("moe_backend: registered %s in vLLM's FP8 MoE backend registry", EXPERTS_CLASS_PATH)
    return True


def route_layers() -> None:
    """Install the oracle wrappers (once per process; ``register`` guards repeats)."""
    from vllm.model_executor.layers.fused_moe.oracle import fp8, nvfp4

    register_fp8_backend()

    for name in _CALLERS:
        try:
            importlib.import_module(name)
        except ImportError as err:  # a vLLM version without this method: nothing to rebind
            logger.debug("moe_backend: %s not importable (%s)", name, err)
    _replace(fp8, "map_fp8_backend", _map(fp8.Fp8MoeBackend.TRITON))
    _replace(fp8, "select_fp8_moe_backend", _select(fp8.Fp8MoeBackend.TRITON))
    _replace(fp8, "convert_to_fp8_moe_kernel_format", _convert_fp8)
    _replace(nvfp4, "map_nvfp4_backend", _map(nvfp4.NvFp4MoeBackend.MARLIN))
    _replace(nvfp4, "select_nvfp4_moe_backend", _select(nvfp4.NvFp4MoeBackend.MARLIN))
    _replace(nvfp4, "convert_to_nvfp4_moe_kernel_format", _convert_nvfp4)
