"""The one place that knows which SGLang internals the plugin touches (tested: SGLang 0.5.23).

SGLang offers no stable interface for out-of-tree MoE backends: the plugin
extends a choices list, registers a runner core and hooks a few methods, all
private. :data:`SYMBOLS` lists every module attribute it reads or hooks;
:func:`check_symbols` imports them at start-up, so an SGLang version that moved
one fails at once with the whole list instead of at the first request. A
version bump is this table as a checklist (``docs/sglang.md``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from typing import Any, Dict, List, Tuple

#: SGLang versions the plugin is tested with, [min, max) as (major, minor, patch).
SUPPORTED = ((0, 5, 23), (0, 6, 0))

#: module -> the attributes of it the plugin uses (dotted names reach into classes).
SYMBOLS: Dict[str, Tuple[str, ...]] = {
    "sglang.srt.arg_groups.choices": ("add_moe_runner_backend_choices", "MOE_RUNNER_BACKEND_CHOICES"),
    "sglang.srt.plugins.hook_registry": ("HookRegistry.register", "HookType.AROUND", "HookType.AFTER"),
    "sglang.srt.layers.moe.moe_runner.runner": (
        "register_moe_runner_core",
        "MoeRunner",
        "_CUSTOM_RUNNER_CORE_FACTORIES",
    ),
    "sglang.srt.layers.moe.moe_runner.base": ("DispatchMoeRunnerCore", "MoeRunnerConfig"),
    "sglang.srt.layers.moe.utils": ("get_moe_runner_backend", "get_moe_a2a_backend", "resolve_moe_runner_backend"),
    "sglang.srt.layers.moe.token_dispatcher": ("StandardCombineInput",),
    "sglang.srt.layers.moe.fused_moe_triton.layer": ("FusedMoE.__init__",),
    "sglang.srt.layers.moe.topk": ("TopK",),
    "sglang.srt.layers.dp_attention": ("is_dp_attention_enabled",),
    "sglang.srt.layers.quantization.fp8": ("Fp8Config.get_quant_method", "Fp8MoEMethod.create_weights"),
    "sglang.srt.layers.quantization.modelopt_quant": (
        "ModelOptFp4Config.get_quant_method",
        "ModelOptNvFp4FusedMoEMethod.create_weights",
    ),
    "sglang.srt.model_executor.model_runner": ("ModelRunner.init_cuda_graphs",),
    "sglang.srt.state_capturer.routed_experts": ("get_global_experts_capturer",),
    "sglang.srt.runtime_context": ("get_schedule", "get_exec", "get_parallel", "get_lora", "get_server_args"),
}


def sglang_version() -> Tuple[int, int, int]:
    """Installed SGLang version as (major, minor, patch)."""
    raw = importlib.metadata.version("sglang")
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", raw)
    if match is None:
        raise RuntimeError(f"moe_backend: cannot parse the SGLang version {raw!r}")
    return tuple(int(g or 0) for g in match.groups())  # type: ignore[return-value]


def missing_symbols() -> List[str]:
    """``module:attribute`` for every entry of :data:`SYMBOLS` the installed SGLang lacks."""
    missing = []
    for module_name, names in SYMBOLS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            missing.append(f"{module_name} (cannot import: {err})")
            continue
        for name in names:
            obj: Any = module
            for part in name.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    missing.append(f"{module_name}:{name}")
                    break
    return missing


def check_symbols() -> None:
    """Raise ``RuntimeError`` naming the SGLang version and every missing symbol, if any."""
    missing = missing_symbols()
    if missing:
        version = ".".join(map(str, sglang_version()))
        lo, hi = (".".join(map(str, v)) for v in SUPPORTED)
        raise RuntimeError(
            f"moe_backend: SGLang {version} lacks what the plugin needs (tested with SGLang >={lo},<{hi}); "
            f"missing: {', '.join(missing)}"
        )
