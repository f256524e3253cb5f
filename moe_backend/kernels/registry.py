"""Kernel selection: one table from (precision, GPU capability, routed?) to kernels.

Every kernel runs the same contract as :func:`reference_fused_experts`
(``run(prepared, hidden, ids, weights, *, local_expert_offset,
apply_router_weight_on_input, out)``, plus ``config=`` for tunable kernels) after a
one-time ``prepare(weights)`` that puts the weights in the layout it reads. Kernel
modules are imported on first use: Triton is not needed to import this package. ``auto`` takes the first available
kernel of the table's row and falls back to the torch reference (on a GPU with one
warning per reason and process: the reference is far slower); a kernel asked
for by name that cannot run raises :class:`KernelUnavailableError`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch

from ..expert_weights import PRECISIONS, ExpertWeights, FP8BlockWeights, FP8TensorWeights, NVFP4Weights
from .reference import reference_fused_experts

Capability = Tuple[int, int]

logger = logging.getLogger(__name__)


class KernelUnavailableError(RuntimeError):
    """An explicitly requested kernel cannot run for this precision or device."""


def _reference_run(prepared: ExpertWeights, hidden: torch.Tensor, ids: torch.Tensor,
                   weights: torch.Tensor, **kw: Any) -> torch.Tensor:
    return reference_fused_experts(hidden, prepared, ids, weights, **kw)


@dataclass(frozen=True)
class Kernel:
    """One fused-experts implementation.

    ``capabilities`` lists the CUDA compute capabilities it runs on (None: any
    device, CPU included); ``interpretable`` kernels also run on a CPU under
    ``TRITON_INTERPRET=1`` when asked for by name.
    """

    name: str
    precisions: Tuple[str, ...]
    capabilities: Optional[Tuple[Capability, ...]]
    prepare: Callable[[ExpertWeights], Any]
    run: Callable[..., torch.Tensor]
    requires: Tuple[str, ...] = ()
    #: Inverse of ``prepare`` (prepared -> canonical container); None when ``prepare`` keeps the layout.
    restore: Optional[Callable[[Any], ExpertWeights]] = None
    interpretable: bool = False
    capturable: bool = False
    #: Why it cannot scale the GEMM1 input by the router weight, or None when it can.
    weight_on_input_defect: Optional[str] = None
    #: Module (under moe_backend.kernels) whose ``CANDIDATE_CONFIGS`` the tuner times; None: not tunable.
    tuning_module: Optional[str] = None

    @property
    def tunable(self) -> bool:
        return self.tuning_module is not None

    def _tuning_attr(self, name: str) -> Any:
        if self.tuning_module is None:
            return None
        return getattr(importlib.import_module(f"moe_backend.kernels.{self.tuning_module}"), name, None)

    def candidate_configs(self) -> Tuple[dict, ...]:
        """The configurations the tuner times (each overrides the kernel's heuristic default)."""
        return tuple(self._tuning_attr("CANDIDATE_CONFIGS") or ())

    def deterministic_config(self) -> Optional[dict]:
        """A configuration without atomics and with one tiling for every T, or None if it has none."""
        return self._tuning_attr("DETERMINISTIC_CONFIG")

    def numerics_config(self, numerics: str) -> Optional[dict]:
        """The fixed configuration of ``numerics`` (e.g. ``vllm_triton``), or None if it has none."""
        return (self._tuning_attr("NUMERICS_CONFIGS") or {}).get(numerics)

    def unavailable_reason(self, precision: str, device: torch.device,
                           weight_on_input: bool = False) -> Optional[str]:
        """Why this kernel cannot run here, or None when it can."""
        if precision not in self.precisions:
            return f"it supports {', '.join(self.precisions)}, not {precision}"
        if weight_on_input and self.weight_on_input_defect:
            return f"apply_router_weight_on_input is not supported: {self.weight_on_input_defect}"
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"the package(s) {', '.join(missing)} are not installed"
        if self.capabilities is None:
            return None
        if device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            if cap in self.capabilities:
                return None
            wanted = ", ".join(f"sm_{a}{b}" for a, b in self.capabilities)
            return f"it needs a GPU of compute capability {wanted}, this one is sm_{cap[0]}{cap[1]}"
        if self.interpretable and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"it needs a CUDA GPU (or TRITON_INTERPRET=1 on a CPU), got device {device}"


def _sm90_fp8_run(prepared: ExpertWeights, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, *,
                  local_expert_offset: int, apply_router_weight_on_input: bool, out: torch.Tensor,
                  config: Optional[dict] = None) -> torch.Tensor:
    from .sm90.fp8_moe import fused_experts_fp8

    block = isinstance(prepared, FP8BlockWeights)
    static = prepared if isinstance(prepared, FP8TensorWeights) else None
    return fused_experts_fp8(
        hidden, prepared.w13, prepared.w13_scale, prepared.w2, prepared.w2_scale, ids, weights,
        block_scaled=block, local_expert_offset=local_expert_offset,
        a13_scale=static.a13_scale if static else None, a2_scale=static.a2_scale if static else None,
        ue8m0=block and prepared.ue8m0, apply_router_weight_on_input=apply_router_weight_on_input,
        out=out, config=config)


def _sm90_nvfp4_prepare(weights: NVFP4Weights) -> Any:
    from .sm90.nvfp4_moe import prepare_nvfp4

    return prepare_nvfp4(weights)


def _sm90_nvfp4_restore(prepared: Any) -> NVFP4Weights:
    from .sm90.nvfp4_layout import nvfp4_from_kernel_layout

    return nvfp4_from_kernel_layout(prepared)


def _sm90_nvfp4_run(prepared: Any, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    **kw: Any) -> torch.Tensor:
    from .sm90.nvfp4_moe import fused_experts_nvfp4

    return fused_experts_nvfp4(hidden, prepared, ids, weights, **kw)


HOPPER: Tuple[Capability, ...] = ((9, 0),)

REFERENCE = Kernel("reference", PRECISIONS, None, prepare=lambda w: w, run=_reference_run)
SM90_FP8 = Kernel("sm90_triton_fp8", ("fp8_block", "fp8_tensor"), HOPPER, prepare=lambda w: w,
                  run=_sm90_fp8_run, requires=("triton",), interpretable=True, capturable=True,
                  tuning_module="sm90.fp8_moe",
                  weight_on_input_defect="at H=7168 its output differs from the reference by ~1.7e-2 "
                                         "(open defect), so the reference serves such layers")
SM90_NVFP4 = Kernel("sm90_triton_nvfp4", ("nvfp4",), HOPPER, prepare=_sm90_nvfp4_prepare,
                    run=_sm90_nvfp4_run, requires=("triton",), restore=_sm90_nvfp4_restore, interpretable=True, capturable=True,
                    tuning_module="sm90.nvfp4_moe")

KERNELS: Dict[str, Kernel] = {k.name: k for k in (REFERENCE, SM90_FP8, SM90_NVFP4)}

#: (precision, compute capability, routed?) -> kernels to try in order before the reference.
SELECTION_TABLE: Dict[Tuple[str, Capability, bool], Tuple[str, ...]] = {
    ("fp8_block", (9, 0), False): ("sm90_triton_fp8",),
    ("fp8_block", (9, 0), True): ("sm90_triton_fp8",),
    ("fp8_tensor", (9, 0), False): ("sm90_triton_fp8",),
    ("fp8_tensor", (9, 0), True): ("sm90_triton_fp8",),
    ("nvfp4", (9, 0), False): ("sm90_triton_nvfp4",),
    ("nvfp4", (9, 0), True): ("sm90_triton_nvfp4",),
}


def select_kernel(precision: str, device: torch.device, routed: bool, requested: str = "auto", *,
                  weight_on_input: bool = False) -> Kernel:
    """The kernel that serves ``precision`` on ``device`` (routed or computed entry point;
    ``weight_on_input``: the layer scales the GEMM1 input by the router weight)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if requested != "auto":
        if requested not in KERNELS:
            raise ValueError(f"kernel: expected 'auto' or one of {sorted(KERNELS)}, got {requested!r}")
        kernel = KERNELS[requested]
        reason = kernel.unavailable_reason(precision, device, weight_on_input)
        if reason is not None:
            raise KernelUnavailableError(f"kernel {requested!r} cannot run {precision} on {device}: {reason}")
        return kernel
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        names = SELECTION_TABLE.get((precision, cap, routed), ())
        reasons = []
        for name in names:
            reason = KERNELS[name].unavailable_reason(precision, device, weight_on_input)
            if reason is None:
                return KERNELS[name]
            reasons.append(f"{name}: {reason}")
        _warn_fallback(precision, cap, "; ".join(reasons) if names else
                       f"no fused kernel serves {precision} on sm_{cap[0]}{cap[1]}")
    return REFERENCE


#: Fallback messages already logged by this process.
_WARNED_FALLBACKS: Set[str] = set()


def _warn_fallback(precision: str, cap: Capability, reason: str) -> None:
    """Log once per process and reason that a GPU layer runs the (slow) torch reference."""
    message = f"{precision} MoE on sm_{cap[0]}{cap[1]} runs the torch reference, not a fused kernel: {reason}"
    if message not in _WARNED_FALLBACKS:
        _WARNED_FALLBACKS.add(message)
        logger.warning(message)


def available_kernels(device: torch.device) -> Dict[str, Dict[str, Optional[str]]]:
    """kernel name -> precision -> None (runs here) or the reason it does not."""
    return {name: {p: k.unavailable_reason(p, device) for p in k.precisions} for name, k in KERNELS.items()}
