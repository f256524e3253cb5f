"""Every vLLM symbol the plugin patches or subclasses, in one table checked at start-up.

vLLM has no plugin interface for MoE backends in the releases we support, so the
plugin changes vLLM in place. :data:`SURFACE` lists each symbol it touches (module,
attribute path, what the plugin does with it, why) and the vLLM versions it applies
to; :func:`check_surface` runs before the plugin patches anything, so a vLLM that
moved or renamed one of them fails at start-up with a message listing every missing
symbol, rather than half-patched or at the first MoE layer.

vLLM's main branch has grown an out-of-tree FP8 MoE backend registry,
``register_fp8_moe_backend(name, expert_class_paths)`` in
``vllm/model_executor/layers/fused_moe/oracle/fp8_registry.py``. No release ships it
yet (0.33 does not); where the module exists :func:`~.oracle.route_layers` registers
our experts class through it. The FP8 oracle rows below stay until a release with the
registry is tested: our experts need the layer binding that the FP8 conversion hook
makes, and the registry's backends consume vLLM's canonical weights.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import List, Tuple

Version = Tuple[int, ...]


@dataclass(frozen=True)
class PatchTarget:
    """One vLLM symbol: ``symbol`` is an attribute path in ``module`` (``Class.method`` for a
    member); the plugin uses it on vLLM versions ``since <= (major, minor) < until``."""

    module: str
    symbol: str
    action: str
    why: str
    since: Tuple[int, int] = (0, 26)
    until: Tuple[int, int] = (99, 0)

    def applies_to(self, version: Version) -> bool:
        return self.since <= tuple(version[:2]) < self.until

    @property
    def name(self) -> str:
        return f"{self.module}.{self.symbol}"


_FUSED_MOE = "vllm.model_executor.layers.fused_moe"
_FP8_ORACLE = f"{_FUSED_MOE}.oracle.fp8"
_NVFP4_ORACLE = f"{_FUSED_MOE}.oracle.nvfp4"
_ORACLE_WHY = (
    "vLLM picks the MoE kernel per quantization here; a name it does not know would fall through to its own backends"
)

#: The patch surface (module ``names``: the CLI name; ``support``: refusals; ``oracle``:
#: routing; ``warmup``: tuning; ``compat``/``capture``: routed-experts capture; ``experts``).
SURFACE: Tuple[PatchTarget, ...] = (
    PatchTarget(
        "vllm.config.kernel",
        "MoEBackend",
        "extended with 'moe_backend' (names)",
        "--moe-backend's choices and config validation come from this Literal",
    ),
    PatchTarget(
        "vllm.config.kernel",
        "KernelConfig",
        "moe_backend field re-annotated, pydantic validator rebuilt (names)",
        "it validates --moe-backend against the old Literal",
    ),
    PatchTarget(
        "vllm.config.speculative",
        "SpeculativeConfig",
        "moe_backend field re-annotated, validator rebuilt (names)",
        "a draft model's moe_backend is validated the same way",
    ),
    PatchTarget(
        "vllm.engine.arg_utils",
        "EngineArgs",
        "moe_backend field annotation updated (names)",
        "keeps the documented type in step with the Literal",
    ),
    PatchTarget(
        "vllm.engine.arg_utils",
        "_compute_kwargs",
        "cache cleared (names)",
        "argparse's choices are derived from the Literal once and cached",
    ),
    PatchTarget(
        "vllm.config.kernel",
        "KernelConfig.set_platform_defaults",
        "wrapped: start-up refusals run first (support)",
        "every process that finalises a vLLM config passes here",
    ),
    PatchTarget(_FP8_ORACLE, "map_fp8_backend", "wrapped: our name maps to TRITON (oracle)", _ORACLE_WHY),
    PatchTarget(_FP8_ORACLE, "select_fp8_moe_backend", "wrapped: returns our experts class (oracle)", _ORACLE_WHY),
    PatchTarget(
        _FP8_ORACLE,
        "convert_to_fp8_moe_kernel_format",
        "wrapped: binds an MoELayer over vLLM's tensors instead of converting them (oracle)",
        _ORACLE_WHY,
    ),
    PatchTarget(
        _FP8_ORACLE,
        "Fp8MoeBackend.TRITON",
        "the tag our FP8 layers get (oracle)",
        "its quant config and kernel construction convert no weights",
    ),
    PatchTarget(_NVFP4_ORACLE, "map_nvfp4_backend", "wrapped: our name maps to MARLIN (oracle)", _ORACLE_WHY),
    PatchTarget(_NVFP4_ORACLE, "select_nvfp4_moe_backend", "wrapped: returns our experts class (oracle)", _ORACLE_WHY),
    PatchTarget(
        _NVFP4_ORACLE,
        "convert_to_nvfp4_moe_kernel_format",
        "wrapped: binds an MoELayer over vLLM's tensors instead of converting them (oracle)",
        _ORACLE_WHY,
    ),
    PatchTarget(
        _NVFP4_ORACLE,
        "NvFp4MoeBackend.MARLIN",
        "the tag our NVFP4 layers get (oracle)",
        "W4A16 like us; its construction converts no weights",
    ),
    PatchTarget(
        "vllm.v1.worker.gpu_worker",
        "kernel_warmup",
        "wrapped: tunes our layers first (warmup)",
        "the worker's last step before CUDA-graph capture",
    ),
    PatchTarget(
        f"{_FUSED_MOE}.routed_experts_capturer",
        "bind_routed_experts_capturer",
        "wrapped: hands the capturer to our layers (compat, capture)",
        "our routing runs inside the layer, where vLLM's router would record it",
        since=(0, 33),
    ),
    PatchTarget(
        "vllm.distributed.aux_output_connector.worker",
        "bind_routed_experts_capturer",
        "rebound to the wrapper (compat, capture)",
        "the connector imported it by name",
        since=(0, 33),
    ),
    PatchTarget(
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner._bind_routed_experts_capturer",
        "wrapped: hands the capturer to our layers (compat, capture)",
        "where vLLM before 0.33 binds the capturer",
        until=(0, 33),
    ),
    PatchTarget(
        f"{_FUSED_MOE}.modular_kernel",
        "FusedMoEExpertsModular",
        "subclassed by MoEBackendExperts (experts)",
        "vLLM's modular-kernel experts interface, which our layers serve",
    ),
    PatchTarget(
        f"{_FUSED_MOE}.modular_kernel",
        "FusedMoEActivationFormat",
        "read by the layer check (support)",
        "vLLM's own support predicate takes it",
    ),
)


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM lacks symbols the plugin patches."""


def _resolves(target: PatchTarget) -> bool:
    try:
        obj = importlib.import_module(target.module)
    except ImportError:
        return False
    for part in target.symbol.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def missing_targets(version: Version) -> List[PatchTarget]:
    """The rows of :data:`SURFACE` that apply to ``version`` and do not resolve in this vLLM."""
    return [t for t in SURFACE if t.applies_to(version) and not _resolves(t)]


def check_surface(version: Version) -> None:
    """Raise :class:`UnsupportedVllmError` listing every missing symbol (run before patching)."""
    missing = missing_targets(version)
    if missing:
        lines = "\n".join(f"  - {t.name}: {t.action}" for t in missing)
        raise UnsupportedVllmError(
            f"moe_backend: vLLM {'.'.join(map(str, version))} lacks {len(missing)} symbol(s) the plugin "
            f"patches (moved or renamed in this version); it cannot serve with it:\n{lines}"
        )


__all__ = ["SURFACE", "PatchTarget", "UnsupportedVllmError", "check_surface", "missing_targets"]
