"""The fused-experts layer: one object per precision holding weights, config and kernel.

Two entry points (DESIGN.md §1, §3)::

    out = layer.forward(hidden, router_logits)           # routing computed inside
    out = layer.forward_routed(hidden, packed_topk)       # precomputed top-k, packed int32
    out = layer.forward_routed(hidden, (ids, weights))    # or as two tensors

Both accept ``routing_replay_out=`` (int16 ``[R >= T, k]``: rows ``[:T]`` get the
global expert ids) and ``out=`` (``[R >= T, H]`` bf16: rows ``[:T]`` written and
returned). ``layer.experts(hidden, ids, weights, out=...)`` is the engine-level
call (vLLM's modular ``apply``, SGLang's runner core): no routing, no replay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, Optional, Tuple, Type, Union

import torch

from ._checks import check_int, check_out, check_tensor
from .expert_weights import (
    BF16Weights,
    ExpertWeights,
    FP8BlockWeights,
    FP8TensorWeights,
    NVFP4Weights,
)
from .kernels.registry import Kernel, select_kernel
from .routing import RoutingConfig, check_replay_out, unpack_topk, write_routing_replay
from .tuning import MoEInputs, ProblemSignature, TuningCache, TuningResult, moe_inputs, tune

logger = logging.getLogger(__name__)

TopK = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MoEConfig:
    """Static description of one MoE layer.

    ``num_experts`` is the global expert count (the router's width); the layer holds
    experts ``[local_expert_offset, local_expert_offset + E_local)`` where E_local
    comes from its weights. ``apply_router_weight_on_input`` scales the GEMM1
    input by the router weight instead of the expert output.
    """

    num_experts: int
    top_k: int
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    local_expert_offset: int = 0
    apply_router_weight_on_input: bool = False

    def __post_init__(self) -> None:
        check_int("num_experts", self.num_experts, minimum=1)
        check_int("top_k", self.top_k, minimum=1)
        check_int("local_expert_offset", self.local_expert_offset, minimum=0)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected at most num_experts ({self.num_experts}), got {self.top_k}")
        if not isinstance(self.routing, RoutingConfig):
            raise TypeError(f"routing: expected a RoutingConfig, got {type(self.routing).__name__}")


#: ``numerics`` -> the precisions it is offered for (None: all).
NUMERICS: Dict[str, Optional[Tuple[str, ...]]] = {"accurate": None, "vllm_triton": ("fp8_block",)}


class MoELayer:
    """Fused experts of one precision. Subclasses fix the weight container type."""

    weights_type: ClassVar[Type[ExpertWeights]] = ExpertWeights

    def __init__(self, weights: ExpertWeights, config: MoEConfig, *,
                 correction_bias: Optional[torch.Tensor] = None, kernel: str = "auto",
                 deterministic: bool = False, numerics: str = "accurate") -> None:
        """``deterministic``: combine the top-k without atomics in a fixed order and use one kernel
        configuration for every batch size, so outputs are bitwise reproducible across runs and
        batch compositions (for RL rollouts and debugging; slower at large T).

        ``numerics`` (one of :data:`NUMERICS`): ``accurate`` (default) keeps intermediates in
        fp32; ``vllm_triton`` rounds them as vLLM's Triton fused-MoE does, so a model decodes the
        same tokens as on that backend (FP8 block-scale on the sm90_triton_fp8 kernel; deterministic,
        one configuration for every T, less accurate).
        """
        if not isinstance(weights, self.weights_type):
            raise TypeError(
                f"weights: expected {self.weights_type.__name__}, got {type(weights).__name__}"
            )
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected MoEConfig, got {type(config).__name__}")
        if config.local_expert_offset + weights.num_experts > config.num_experts:
            raise ValueError(
                f"local_expert_offset: experts [{config.local_expert_offset}, "
                f"{config.local_expert_offset + weights.num_experts}) exceed num_experts={config.num_experts}"
            )
        config.routing.check(config.num_experts, config.top_k, correction_bias is not None)
        if correction_bias is not None:
            check_tensor("correction_bias", correction_bias, dtype=torch.float32,
                         shape=(config.num_experts,), device=weights.device)
        self.config = config
        self._shape = (weights.hidden_size, weights.intermediate_size, weights.num_experts)
        self._device = weights.device
        self.correction_bias = correction_bias
        self.requested_kernel = kernel
        self._kernels = {routed: select_kernel(weights.precision, weights.device, routed, kernel,
                                               weight_on_input=config.apply_router_weight_on_input)
                         for routed in (False, True)}
        if numerics not in NUMERICS:
            raise ValueError(f"numerics: expected one of {sorted(NUMERICS)}, got {numerics!r}")
        if numerics != "accurate" and weights.precision not in NUMERICS[numerics]:
            raise ValueError(f"numerics: {numerics!r} is available for {', '.join(NUMERICS[numerics])} "
                             f"weights, got {weights.precision}")
        if numerics == "vllm_triton" and (weights.ue8m0 or config.apply_router_weight_on_input):
            raise ValueError("numerics: 'vllm_triton' needs scales that are not ue8m0 and the router weight "
                             "on the output (apply_router_weight_on_input=False)")
        self.deterministic = deterministic
        self.numerics = numerics
        self._fixed_configs: Dict[str, dict] = {}
        for k in self._kernels.values():
            if numerics != "accurate":
                fixed, wanted = k.numerics_config(numerics), f"numerics: {numerics!r}"
            elif deterministic:
                fixed, wanted = k.deterministic_config(), "deterministic"
            else:
                continue
            if fixed is None:
                raise ValueError(
                    f"{wanted}: kernel {k.name!r} ({weights.precision} on {weights.device}) does not offer it; "
                    f"it is available with the sm90_triton_fp8 kernel (FP8 on Hopper)")
            self._fixed_configs[k.name] = fixed
        self._prepared = {k.name: k.prepare(weights) for k in self._kernels.values()}
        # Keep the checkpoint layout only if a kernel reads it: a transformed copy beside it would
        # double the layer's memory (NVFP4 must stay at 0.5625 bytes a weight).
        self._weights: Optional[ExpertWeights] = (
            weights if any(p is weights for p in self._prepared.values()) else None)
        self._tuned: Dict[str, TuningResult] = {}
        logger.debug("%s: kernels computed=%s routed=%s", type(self).__name__,
                     self._kernels[False].name, self._kernels[True].name)

    @classmethod
    def from_float(cls, w13: torch.Tensor, w2: torch.Tensor, config: MoEConfig, *,
                   correction_bias: Optional[torch.Tensor] = None, kernel: str = "auto",
                   deterministic: bool = False, numerics: str = "accurate", **quantize_options) -> "MoELayer":
        """Quantize float master weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` into this precision
        (``quantize_options`` go to the weight container, e.g. ``ue8m0=True`` for FP8 block)."""
        weights = cls.weights_type.quantize(w13, w2, **quantize_options)
        return cls(weights, config, correction_bias=correction_bias, kernel=kernel, deterministic=deterministic,
                   numerics=numerics)

    # -- properties ---------------------------------------------------------------------
    @property
    def weights(self) -> ExpertWeights:
        """The experts in the canonical layout: the held container, or (when every kernel of the
        layer reads a transformed layout) a copy rebuilt from the kernel's layout on each access."""
        if self._weights is not None:
            return self._weights
        kernel = self._kernels[True]
        return kernel.restore(self._prepared[kernel.name])

    @property
    def precision(self) -> str:
        return self.weights_type.precision

    @property
    def hidden_size(self) -> int:
        return self._shape[0]

    @property
    def device(self) -> torch.device:
        return self._device

    def kernel_name(self, routed: bool) -> str:
        """Name of the kernel serving the routed (True) or computed (False) entry point."""
        return self._kernels[routed].name

    # -- tuning -------------------------------------------------------------------------
    def warmup(self, max_num_tokens: int, *, cache: Optional[TuningCache] = None, force: bool = False,
               progress: bool = True) -> Dict[str, TuningResult]:
        """Tune the layer's kernels for every token bucket up to the engine's ``max_num_tokens``.

        Call it once before CUDA-graph capture (it refuses to run inside one). Results come
        from ``cache`` (default: the user's cache directory) when present; afterwards every
        call maps T -> bucket -> configuration on the host. Kernels that are not tunable,
        or a layer on the CPU, are left as they are. Returns kernel name -> result.
        """
        check_int("max_num_tokens", max_num_tokens, minimum=1)
        kernels = {k.name: k for k in self._kernels.values()
                   if k.tunable and self.device.type == "cuda" and k.name not in self._fixed_configs}
        if not kernels:
            logger.info("%s: nothing to tune (kernels %s on %s)", type(self).__name__,
                        sorted({k.name for k in self._kernels.values()}), self.device)
            self._precompile()
            return {}
        cache = cache if cache is not None else TuningCache()
        hidden_size, inter, num_local = self._shape
        signature = ProblemSignature(self.precision, num_local, self.config.top_k, hidden_size, inter,
                                     self.config.num_experts)
        for name, kernel in kernels.items():
            started = time.perf_counter()
            self._tuned[name] = tune(
                _kernel_runner(kernel, self._prepared[name], self.config), kernel.candidate_configs(),
                max_num_tokens, signature, cache, _input_factory(self), force=force, progress=progress)
            logger.info("%s: tuned %s up to %d tokens in %.1f s", type(self).__name__, name, max_num_tokens,
                        time.perf_counter() - started)
        self._precompile()
        return dict(self._tuned)

    def _precompile(self) -> None:
        """Build every JIT kernel a bucket can use now, before any CUDA-graph capture (a cached
        tuning result times nothing, so its kernels would otherwise compile on first use)."""
        for kernel in {k.name: k for k in self._kernels.values()}.values():
            if kernel.precompile is None or self.device.type != "cuda":
                continue
            if kernel.name in self._fixed_configs:
                configs = [self._fixed_configs[kernel.name]]
            elif kernel.name in self._tuned:
                configs = [e.config for e in self._tuned[kernel.name].entries.values()]
            else:
                configs = [{}]
            built = kernel.precompile(self._prepared[kernel.name], configs)
            logger.info("%s: %s compiled %d kernel(s)", type(self).__name__, kernel.name, built)

    # -- entry points -------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor, *,
                routing_replay_out: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Route ``hidden [T, H]`` bf16 with ``router_logits [T, num_experts]`` fp32 and run the experts.

        Returns ``[T, H]`` bf16 (``out[:T]`` when ``out`` is given).
        """
        t = self._check_hidden(hidden)
        check_tensor("router_logits", router_logits, dtype=torch.float32,
                     shape=(t, self.config.num_experts), device=hidden.device)
        check_replay_out(routing_replay_out, t, self.config.top_k, hidden.device)
        check_out("out", out, rows=t, cols=self.hidden_size, dtype=hidden.dtype, device=hidden.device)
        ids, weights = self.config.routing.select(router_logits, self.config.top_k, self.correction_bias)
        write_routing_replay(ids, routing_replay_out)
        return self._run(self._kernels[False], hidden, ids, weights, out)

    def forward_routed(self, hidden: torch.Tensor, topk: TopK, *,
                       routing_replay_out: Optional[torch.Tensor] = None,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the experts on precomputed top-k.

        ``topk`` is packed int32 ``[T, k]`` (see :mod:`moe_backend.routing.packed`) or
        ``(ids [T, k] int32, weights [T, k] fp32)`` with global ids.
        """
        t = self._check_hidden(hidden)
        ids, weights = self._unpack(topk, t, hidden.device)
        check_replay_out(routing_replay_out, t, self.config.top_k, hidden.device)
        check_out("out", out, rows=t, cols=self.hidden_size, dtype=hidden.dtype, device=hidden.device)
        write_routing_replay(ids, routing_replay_out)
        return self._run(self._kernels[True], hidden, ids, weights, out)

    def experts(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Engine-level call: ``hidden [T, H]`` bf16, ``topk_ids [T, k]`` int32 global,
        ``topk_weights [T, k]`` fp32, optional ``out [R >= T, H]``; returns ``out[:T]``."""
        t = self._check_hidden(hidden)
        ids, weights = self._unpack((topk_ids, topk_weights), t, hidden.device)
        check_out("out", out, rows=t, cols=self.hidden_size, dtype=hidden.dtype, device=hidden.device)
        return self._run(self._kernels[True], hidden, ids, weights, out)

    __call__ = forward

    # -- internals ------------------------------------------------------------------------
    def _check_hidden(self, hidden: torch.Tensor) -> int:
        check_tensor("hidden", hidden, dtype=torch.bfloat16, shape=(None, self.hidden_size),
                     device=self.device)
        return hidden.shape[0]

    def _unpack(self, topk: TopK, t: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        k = self.config.top_k
        if isinstance(topk, torch.Tensor):
            check_tensor("topk", topk, dtype=torch.int32, shape=(t, k), device=device)
            return unpack_topk(topk)
        if not (isinstance(topk, (tuple, list)) and len(topk) == 2):
            raise TypeError(
                f"topk: expected a packed int32 tensor or an (ids, weights) pair, got {type(topk).__name__}"
            )
        ids, weights = topk
        check_tensor("topk_ids", ids, dtype=torch.int32, shape=(t, k), device=device)
        check_tensor("topk_weights", weights, dtype=torch.float32, shape=(t, k), device=device)
        return ids, weights

    def _run(self, kernel: Kernel, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
             out: Optional[torch.Tensor]) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(hidden)
        extra = {}
        if kernel.name in self._fixed_configs:
            extra["config"] = self._fixed_configs[kernel.name]
        elif kernel.name in self._tuned:
            extra["config"] = self._tuned[kernel.name].config_for(hidden.shape[0])
        return kernel.run(self._prepared[kernel.name], hidden, ids, weights,
                          local_expert_offset=self.config.local_expert_offset,
                          apply_router_weight_on_input=self.config.apply_router_weight_on_input,
                          out=out, **extra)


def _kernel_runner(kernel: Kernel, prepared: object, config: MoEConfig) -> Callable[[dict, MoEInputs], None]:
    """``run(config, inputs)`` for the tuner; holds the prepared weights, not the layer."""
    def run(tuning_config: dict, inputs: MoEInputs) -> None:
        out = torch.empty_like(inputs.hidden)
        kernel.run(prepared, inputs.hidden, inputs.topk_ids, inputs.topk_weights,
                   local_expert_offset=config.local_expert_offset,
                   apply_router_weight_on_input=config.apply_router_weight_on_input,
                   out=out, config=tuning_config)
    return run


def _input_factory(layer: MoELayer) -> Callable[[int], MoEInputs]:
    """Seeded max-load profiling inputs for one bucket of this layer's shape (no layer reference kept)."""
    cfg, device = layer.config, layer.device
    hidden_size, _, num_local = layer._shape
    return lambda bucket: moe_inputs(bucket, hidden_size, cfg.top_k, cfg.num_experts, num_local,
                                     cfg.local_expert_offset, device=device)


class BF16MoE(MoELayer):
    """Unquantized bf16 experts."""

    weights_type = BF16Weights


class FP8BlockMoE(MoELayer):
    """DeepSeek-V3 FP8 block-scale experts (128x128 weight blocks, per-token-group activations)."""

    weights_type = FP8BlockWeights


class FP8TensorMoE(MoELayer):
    """FP8 experts with one scale per expert matrix."""

    weights_type = FP8TensorWeights


class NVFP4MoE(MoELayer):
    """ModelOpt NVFP4 experts (W4A16 on Hopper)."""

    weights_type = NVFP4Weights


LAYER_TYPES = {cls.weights_type.precision: cls for cls in (BF16MoE, FP8BlockMoE, FP8TensorMoE, NVFP4MoE)}
