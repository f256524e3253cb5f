"""Kernel selection: one table from (precision, GPU capability, routed?) to kernels.

Every kernel runs the same contract as :func:`reference_fused_experts`
(``run(prepared, hidden, ids, weights, *, local_expert_offset,
apply_router_weight_on_input, out)``) after a one-time ``prepare(weights)`` that
puts the weights in the layout it reads. ``auto`` takes the first available
kernel of the table's row and falls back to the torch reference; a kernel asked
for by name that cannot run raises :class:`KernelUnavailableError`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..expert_weights import PRECISIONS, ExpertWeights
from .reference import reference_fused_experts

Capability = Tuple[int, int]


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
    interpretable: bool = False
    capturable: bool = False

    def unavailable_reason(self, precision: str, device: torch.device) -> Optional[str]:
        """Why this kernel cannot run here, or None when it can."""
        if precision not in self.precisions:
            return f"it supports {', '.join(self.precisions)}, not {precision}"
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


REFERENCE = Kernel("reference", PRECISIONS, None, prepare=lambda w: w, run=_reference_run)

KERNELS: Dict[str, Kernel] = {k.name: k for k in (REFERENCE,)}

#: (precision, compute capability, routed?) -> kernels to try in order before the reference.
SELECTION_TABLE: Dict[Tuple[str, Capability, bool], Tuple[str, ...]] = {}


def select_kernel(precision: str, device: torch.device, routed: bool, requested: str = "auto") -> Kernel:
    """The kernel that serves ``precision`` on ``device`` (routed or computed entry point)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if requested != "auto":
        if requested not in KERNELS:
            raise ValueError(f"kernel: expected 'auto' or one of {sorted(KERNELS)}, got {requested!r}")
        kernel = KERNELS[requested]
        reason = kernel.unavailable_reason(precision, device)
        if reason is not None:
            raise KernelUnavailableError(f"kernel {requested!r} cannot run {precision} on {device}: {reason}")
        return kernel
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        for name in SELECTION_TABLE.get((precision, cap, routed), ()):
            if KERNELS[name].unavailable_reason(precision, device) is None:
                return KERNELS[name]
    return REFERENCE


def available_kernels(device: torch.device) -> Dict[str, Dict[str, Optional[str]]]:
    """kernel name -> precision -> None (runs here) or the reason it does not."""
    return {name: {p: k.unavailable_reason(p, device) for p in k.precisions} for name, k in KERNELS.items()}
