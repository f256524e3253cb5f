"""Kernel selection: one table from (precision, GPU capability, routed?) to kernels.

Every kernel runs the same contract as :func:`reference_fused_experts`
(``run(prepared, hidden, ids, weights, *, local_expert_offset,
apply_router_weight_on_input, out)``, plus ``config=`` for tunable kernels) after a
one-time ``prepare(weights)`` that puts the weights in the layout it reads. Kernels that
route themselves (FlashInfer's on Blackwell) also take the layer's :class:`LayerContext` and
offer ``run_computed`` from router logits. Kernel
modules are imported on first use: Triton is not needed to import this package. ``auto`` takes the first available
kernel of the table's row and falls back to the torch reference (on a GPU with one
warning per reason and process: the reference is far slower); a kernel asked
for by name that cannot run raises :class:`KernelUnavailableError`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set, Tuple

import torch

from .._checks import check_bool, check_device, check_str
from ..expert_weights import PRECISIONS, BF16Weights, ExpertWeights, FP8BlockWeights, FP8TensorWeights, NVFP4Weights
from ..routing import RoutingConfig
from .interpret import INTERPRETING
from .reference import reference_fused_experts

Capability = Tuple[int, int]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerContext:
    """What a kernel with ``takes_context`` needs beyond its prepared weights (built by the layer).

    ``num_experts`` is the global expert count, ``correction_bias`` the fp32 ``[num_experts]``
    routing bias (or None), ``max_num_tokens`` the engine's max tokens the kernel tunes for
    (set by the layer's warm-up; FlashInfer's default 8192 before it).
    """

    num_experts: int
    top_k: int
    routing: RoutingConfig
    correction_bias: Optional[torch.Tensor] = None
    max_num_tokens: int = 8192


class KernelUnavailableError(RuntimeError):
    """An explicitly requested kernel cannot run for this precision or device."""


def _reference_run(
    prepared: ExpertWeights, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, **kw: Any
) -> torch.Tensor:
    return reference_fused_experts(hidden, prepared, ids, weights, **kw)


@dataclass(frozen=True)
class TuningSpace:
    """What the tuner may choose from for one kernel, and the version its choices are valid for.

    ``version`` is the kernel module's ``KERNEL_VERSION`` (the tuning cache discards
    configurations tuned for another); ``candidates`` the configurations the tuner times
    (each overrides the kernel's heuristic default); ``deterministic`` a configuration
    without atomics and with one tiling for every T (None: none); ``numerics`` the fixed
    configuration of each non-default numerics mode (e.g. ``vllm_triton``).
    """

    version: int
    candidates: Tuple[dict, ...]
    deterministic: Optional[dict] = None
    numerics: Mapping[str, dict] = field(default_factory=dict)


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
    #: Returns the kernel's :class:`TuningSpace` (called on first use: it imports the launcher,
    #: hence Triton); None: not tunable.
    tuning: Optional[Callable[[], TuningSpace]] = None
    #: ``run`` also takes ``context=`` (:class:`LayerContext`) and ``routing_replay_out=``, and fills the
    #: replay itself (the layer does for the other kernels).
    takes_context: bool = False
    #: ``run_computed(prepared, hidden, router_logits, *, local_expert_offset, apply_router_weight_on_input,
    #: out, context, routing_replay_out)``: routes inside the kernel; None: the layer routes and calls ``run``.
    run_computed: Optional[Callable[..., torch.Tensor]] = None
    #: ``computed_routing_defect(context)``: why ``run_computed`` cannot route this layer, or None.
    computed_routing_defect: Optional[Callable[[LayerContext], Optional[str]]] = None
    #: ``warmup(prepared, context, inputs, computed, *, local_expert_offset, apply_router_weight_on_input)``:
    #: readiness check and the kernel's own tuning for ``context.max_num_tokens`` (``inputs``: max-load
    #: :class:`~moe_backend.tuning.MoEInputs`; ``computed``: tune ``run_computed`` too).
    warmup: Optional[Callable[..., None]] = None

    def routes(self, context: LayerContext) -> bool:
        """Whether the computed entry point hands router logits to ``run_computed``."""
        return self.run_computed is not None and (
            self.computed_routing_defect is None or self.computed_routing_defect(context) is None
        )

    #: Why optional packages it needs are missing or broken, or None; asked last (it may import them).
    probe: Optional[Callable[[], Optional[str]]] = None
    #: ``precompile(prepared, configs)``: build every kernel the configurations use, at warm-up
    #: (JIT-compiled kernels; never inside a CUDA-graph capture). None: nothing to build.
    precompile: Optional[Callable[[Any, Sequence[dict]], int]] = None

    @property
    def tunable(self) -> bool:
        return self.tuning is not None

    def tuning_space(self) -> Optional[TuningSpace]:
        """The kernel's configurations and their version, or None when it is not tunable."""
        return self.tuning() if self.tuning is not None else None

    def deterministic_config(self) -> Optional[dict]:
        """A configuration without atomics and with one tiling for every T, or None if it has none."""
        space = self.tuning_space()
        return space.deterministic if space is not None else None

    def numerics_config(self, numerics: str) -> Optional[dict]:
        """The fixed configuration of ``numerics`` (e.g. ``vllm_triton``), or None if it has none."""
        space = self.tuning_space()
        return space.numerics.get(numerics) if space is not None else None

    def unavailable_reason(self, precision: str, device: torch.device, weight_on_input: bool = False) -> Optional[str]:
        """Why this kernel cannot run here, or None when it can."""
        if precision not in self.precisions:
            return f"it supports {', '.join(self.precisions)}, not {precision}"
        if weight_on_input and self.weight_on_input_defect:
            return f"apply_router_weight_on_input is not supported: {self.weight_on_input_defect}"
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"the package(s) {', '.join(missing)} are not installed"
        reason = self._device_reason(device)
        if reason is None and self.probe is not None:
            reason = self.probe()  # last: it may import large packages
        return reason

    def _device_reason(self, device: torch.device) -> Optional[str]:
        if self.capabilities is None:
            return None
        if device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            if cap in self.capabilities:
                return None
            wanted = ", ".join(f"sm_{a}{b}" for a, b in self.capabilities)
            return f"it needs a GPU of compute capability {wanted}, this one is sm_{cap[0]}{cap[1]}"
        if self.interpretable and INTERPRETING:
            return None
        interpreter = " (or TRITON_INTERPRET=1 on a CPU)" if self.interpretable else ""
        return f"it needs a CUDA GPU{interpreter}, got device {device}"


def _sm90_fp8_run(
    prepared: FP8BlockWeights | FP8TensorWeights,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    local_expert_offset: int,
    apply_router_weight_on_input: bool,
    out: torch.Tensor,
    config: Optional[dict] = None,
) -> torch.Tensor:
    from .sm90.fp8_moe import fused_experts_fp8

    return fused_experts_fp8(
        hidden,
        prepared.w13,
        prepared.w13_scale,
        prepared.w2,
        prepared.w2_scale,
        ids,
        weights,
        local_expert_offset=local_expert_offset,
        apply_router_weight_on_input=apply_router_weight_on_input,
        out=out,
        config=config,
        **_fp8_scale_args(prepared),
    )


def _fp8_scale_args(prepared: FP8BlockWeights | FP8TensorWeights) -> Dict[str, Any]:
    """The FP8 launcher's scale arguments for these weights: block scales (with ``ue8m0``) or one
    scale per expert matrix (with static activation scales, or dynamic ones when None)."""
    if isinstance(prepared, FP8BlockWeights):
        return dict(block_scaled=True, a13_scale=None, a2_scale=None, ue8m0=prepared.ue8m0)
    return dict(block_scaled=False, a13_scale=prepared.a13_scale, a2_scale=prepared.a2_scale, ue8m0=False)


def _sm90_fp8_precompile(prepared: FP8BlockWeights | FP8TensorWeights, configs: Sequence[dict]) -> int:
    from .sm90.fp8_moe import precompile

    return precompile(prepared.w13, prepared.w2, configs, **_fp8_scale_args(prepared))


def _sm90_fp8_tuning() -> TuningSpace:
    from .sm90 import fp8_moe

    return TuningSpace(
        fp8_moe.KERNEL_VERSION, fp8_moe.CANDIDATE_CONFIGS, fp8_moe.DETERMINISTIC_CONFIG, fp8_moe.NUMERICS_CONFIGS
    )


def _sm90_nvfp4_tuning() -> TuningSpace:
    from .sm90 import nvfp4_moe

    return TuningSpace(nvfp4_moe.KERNEL_VERSION, nvfp4_moe.CANDIDATE_CONFIGS)


def _sm90_nvfp4_precompile(prepared: Any, configs: Sequence[dict]) -> int:
    from .sm90.nvfp4_moe import precompile

    return precompile(prepared, configs)


def _sm90_nvfp4_prepare(weights: ExpertWeights) -> Any:
    from .sm90.nvfp4_moe import prepare_nvfp4

    assert isinstance(weights, NVFP4Weights)  # select_kernel matched the precision

    return prepare_nvfp4(weights)


def _sm90_nvfp4_restore(prepared: Any) -> NVFP4Weights:
    from .sm90.nvfp4_layout import nvfp4_from_kernel_layout

    return nvfp4_from_kernel_layout(prepared)


def _sm90_nvfp4_run(
    prepared: Any, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, **kw: Any
) -> torch.Tensor:
    from .sm90.nvfp4_moe import fused_experts_nvfp4

    return fused_experts_nvfp4(hidden, prepared, ids, weights, **kw)


def _sm100(module: str, name: str) -> Callable[..., Any]:
    """``moe_backend.kernels.sm100.<module>.<name>``, imported (with FlashInfer) on first call."""

    def call(*args: Any, **kw: Any) -> Any:
        return getattr(importlib.import_module(f"moe_backend.kernels.sm100.{module}"), name)(*args, **kw)

    call.__name__ = name
    return call


def _sm100_kernel(precision: str) -> Kernel:
    """FlashInfer's TRT-LLM-gen MoE for ``precision``: routed and (DeepSeek-V3 routing) computed."""
    return Kernel(
        f"sm100_flashinfer_{precision}",
        (precision,),
        BLACKWELL,
        prepare=_sm100("layout", f"prepare_{precision}"),
        run=_sm100("moe", f"run_{precision}"),
        requires=("flashinfer",),
        restore=_sm100("layout", f"restore_{precision}"),
        capturable=True,
        weight_on_input_defect=None
        if precision == "fp8_tensor"
        else "FlashInfer's TRT-LLM-gen kernels scale the GEMM1 input by the router weight for FP8 per tensor only",
        takes_context=True,
        run_computed=_sm100("moe", f"run_computed_{precision}"),
        computed_routing_defect=_sm100("moe", "computed_routing_defect"),
        warmup=_sm100("moe", "warmup"),
    )


def _sm90_grouped_prepare(weights: ExpertWeights) -> Any:
    from .sm90.bf16_moe import prepare_grouped

    assert isinstance(weights, (BF16Weights, NVFP4Weights))  # select_kernel matched the precision
    return prepare_grouped(weights)


def _sm90_grouped_restore(prepared: Any) -> ExpertWeights:
    from .sm90.bf16_moe import restore_grouped

    return restore_grouped(prepared)


def _sm90_grouped_run(
    prepared: Any, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, **kw: Any
) -> torch.Tensor:
    from .sm90.bf16_moe import fused_experts_grouped

    return fused_experts_grouped(hidden, prepared, ids, weights, **kw)


def _sm90_grouped_precompile(prepared: Any, configs: Sequence[dict]) -> int:
    from .sm90.bf16_moe import precompile

    return precompile(prepared, configs)


def _sm90_grouped_tuning() -> TuningSpace:
    from .sm90 import bf16_moe

    return TuningSpace(bf16_moe.KERNEL_VERSION, bf16_moe.CANDIDATE_CONFIGS, bf16_moe.DETERMINISTIC_CONFIG)


def _quack_probe() -> Optional[str]:
    from .sm90.cute_env import quack_unavailable_reason

    return quack_unavailable_reason()


HOPPER: Tuple[Capability, ...] = ((9, 0),)
#: B200/GB200 (10.0) and B300/GB300 (10.3). Never run on one (docs/blackwell.md).
BLACKWELL: Tuple[Capability, ...] = ((10, 0), (10, 3))

REFERENCE = Kernel("reference", PRECISIONS, None, prepare=lambda w: w, run=_reference_run)
SM90_FP8 = Kernel(
    "sm90_triton_fp8",
    ("fp8_block", "fp8_tensor"),
    HOPPER,
    prepare=lambda w: w,
    run=_sm90_fp8_run,
    requires=("triton",),
    interpretable=True,
    capturable=True,
    tuning=_sm90_fp8_tuning,
    precompile=_sm90_fp8_precompile,
)
SM90_NVFP4 = Kernel(
    "sm90_triton_nvfp4",
    ("nvfp4",),
    HOPPER,
    prepare=_sm90_nvfp4_prepare,
    run=_sm90_nvfp4_run,
    requires=("triton",),
    restore=_sm90_nvfp4_restore,
    interpretable=True,
    capturable=True,
    tuning=_sm90_nvfp4_tuning,
    precompile=_sm90_nvfp4_precompile,
)

# bf16 grouped GEMMs (QuACK, CuTe DSL) for bf16 experts and for NVFP4 dequantized to bf16 (prefill).
SM90_GROUPED_BF16 = Kernel(
    "sm90_quack_grouped_bf16",
    ("bf16", "nvfp4"),
    HOPPER,
    prepare=_sm90_grouped_prepare,
    run=_sm90_grouped_run,
    restore=_sm90_grouped_restore,
    requires=("triton",),
    capturable=True,
    tuning=_sm90_grouped_tuning,
    probe=_quack_probe,
    precompile=_sm90_grouped_precompile,
    weight_on_input_defect="its router weight scales the output only",
)


SM100_FP8_BLOCK = _sm100_kernel("fp8_block")
SM100_FP8_TENSOR = _sm100_kernel("fp8_tensor")
SM100_NVFP4 = _sm100_kernel("nvfp4")

KERNELS: Dict[str, Kernel] = {
    k.name: k
    for k in (REFERENCE, SM90_FP8, SM90_NVFP4, SM90_GROUPED_BF16, SM100_FP8_BLOCK, SM100_FP8_TENSOR, SM100_NVFP4)
}

#: (precision, compute capability, routed?) -> kernels to try in order before the reference.
SELECTION_TABLE: Dict[Tuple[str, Capability, bool], Tuple[str, ...]] = {
    ("fp8_block", (9, 0), False): ("sm90_triton_fp8",),
    ("fp8_block", (9, 0), True): ("sm90_triton_fp8",),
    ("fp8_tensor", (9, 0), False): ("sm90_triton_fp8",),
    ("fp8_tensor", (9, 0), True): ("sm90_triton_fp8",),
    ("nvfp4", (9, 0), False): ("sm90_triton_nvfp4",),
    ("nvfp4", (9, 0), True): ("sm90_triton_nvfp4",),
    **{
        (precision, cap, routed): (f"sm100_flashinfer_{precision}",)
        for precision in ("fp8_block", "fp8_tensor", "nvfp4")
        for cap in BLACKWELL
        for routed in (False, True)
    },
    ("bf16", (9, 0), False): ("sm90_quack_grouped_bf16",),
    ("bf16", (9, 0), True): ("sm90_quack_grouped_bf16",),
}


def select_kernel(
    precision: str, device: torch.device, routed: bool, requested: str = "auto", *, weight_on_input: bool = False
) -> Kernel:
    """The kernel that serves ``precision`` on ``device`` (routed or computed entry point;
    ``weight_on_input``: the layer scales the GEMM1 input by the router weight)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    device = check_device("device", device)
    check_bool("routed", routed)
    check_str("kernel", requested)
    check_bool("weight_on_input", weight_on_input)
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
        _warn_fallback(
            precision,
            cap,
            "; ".join(reasons) if names else f"no fused kernel serves {precision} on sm_{cap[0]}{cap[1]}",
        )
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
    device = check_device("device", device)
    return {name: {p: k.unavailable_reason(p, device) for p in k.precisions} for name, k in KERNELS.items()}
