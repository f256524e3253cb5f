"""The fused-experts layer: one object per precision holding weights, config and kernel.

Two entry points (docs/design.md §1, §3)::

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
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Dict, Optional, Tuple, Type, Union

import torch

from ._checks import capturing, check_bool, check_finite, check_int, check_out, check_str, check_tensor, overlaps
from .expert_weights import (
    BF16Weights,
    ExpertWeights,
    FP8BlockWeights,
    FP8TensorWeights,
    NVFP4Weights,
)
from .kernels.registry import Kernel, LayerContext, select_kernel
from .routing import MAX_PACKED_ID, RoutingConfig, check_replay_out, unpack_topk, write_routing_replay
from .routing.packed import check_id_range
from .tuning import MoEInputs, ProblemSignature, TuningCache, TuningResult, moe_inputs, tune

logger = logging.getLogger(__name__)

TopK = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

#: Environment variable giving :attr:`MoEConfig.check_values` its default ("1": on, "0" or unset: off).
CHECK_VALUES_ENV = "MOE_BACKEND_CHECK_VALUES"


def check_values_default() -> bool:
    """The default of :attr:`MoEConfig.check_values`, read from ``$MOE_BACKEND_CHECK_VALUES``."""
    value = os.environ.get(CHECK_VALUES_ENV, "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"{CHECK_VALUES_ENV}: expected '0' or '1', got {value!r}")
    return value == "1"


@dataclass(frozen=True)
class MoEConfig:
    """Static description of one MoE layer.

    ``num_experts`` is the global expert count (the router's width); the layer holds
    experts ``[local_expert_offset, local_expert_offset + E_local)`` where E_local
    comes from its weights. ``apply_router_weight_on_input`` scales the GEMM1
    input by the router weight instead of the expert output. ``num_experts`` is at most
    32768, so every global id fits the packed format and the int16 replay buffer.

    ``check_values`` (default: ``$MOE_BACKEND_CHECK_VALUES == "1"``) makes every eager call
    read its inputs' values and refuse non-finite hidden states, router logits or top-k weights
    and ids outside ``[-1, num_experts)`` (a host sync per call: for debugging; skipped inside a
    CUDA-graph capture). Off, the forward path reads no values: non-finite inputs make the
    affected tokens' outputs undefined (other tokens are untouched) and ids outside the local
    range contribute nothing.
    """

    num_experts: int
    top_k: int
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    local_expert_offset: int = 0
    apply_router_weight_on_input: bool = False
    check_values: bool = field(default_factory=check_values_default)

    def __post_init__(self) -> None:
        check_int("num_experts", self.num_experts, minimum=1)
        if self.num_experts > MAX_PACKED_ID:
            raise ValueError(
                f"num_experts: expected at most {MAX_PACKED_ID} (ids are 16-bit in the packed "
                f"format and the replay buffer), got {self.num_experts}"
            )
        check_int("top_k", self.top_k, minimum=1)
        check_int("local_expert_offset", self.local_expert_offset, minimum=0)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected at most num_experts ({self.num_experts}), got {self.top_k}")
        if not isinstance(self.routing, RoutingConfig):
            raise TypeError(f"routing: expected a RoutingConfig, got {type(self.routing).__name__}")
        check_bool("apply_router_weight_on_input", self.apply_router_weight_on_input)
        check_bool("check_values", self.check_values)


#: ``numerics`` -> the precisions it is offered for (None: all).
NUMERICS: Dict[str, Optional[Tuple[str, ...]]] = {"accurate": None, "vllm_triton": ("fp8_block",)}


class MoELayer:
    """Fused experts of one precision. Subclasses fix the weight container type."""

    weights_type: ClassVar[Type[ExpertWeights]] = ExpertWeights

    def __init__(
        self,
        weights: ExpertWeights,
        config: MoEConfig,
        *,
        correction_bias: Optional[torch.Tensor] = None,
        kernel: str = "auto",
        deterministic: bool = False,
        numerics: str = "accurate",
    ) -> None:
        """``deterministic``: combine the top-k without atomics in a fixed order and use one kernel
        configuration for every batch size, so outputs are bitwise reproducible across runs and
        batch compositions (for RL rollouts and debugging; slower at large T).

        ``numerics`` (one of :data:`NUMERICS`): ``accurate`` (default) keeps intermediates in
        fp32; ``vllm_triton`` rounds them as vLLM's Triton fused-MoE does, so a model decodes the
        same tokens as on that backend (FP8 block-scale on the sm90_triton_fp8 kernel; deterministic,
        one configuration for every T, less accurate).
        """
        if not isinstance(weights, self.weights_type):
            raise TypeError(f"weights: expected {self.weights_type.__name__}, got {type(weights).__name__}")
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected MoEConfig, got {type(config).__name__}")
        check_str("kernel", kernel)
        check_bool("deterministic", deterministic)
        check_str("numerics", numerics)
        if config.local_expert_offset + weights.num_experts > config.num_experts:
            raise ValueError(
                f"local_expert_offset: experts [{config.local_expert_offset}, "
                f"{config.local_expert_offset + weights.num_experts}) exceed num_experts={config.num_experts}"
            )
        config.routing.check(config.num_experts, config.top_k, correction_bias is not None)
        if correction_bias is not None:
            check_tensor(
                "correction_bias",
                correction_bias,
                dtype=torch.float32,
                shape=(config.num_experts,),
                device=weights.device,
            )
            check_finite("correction_bias", correction_bias)  # a configuration value: read once, here
        self.config = config
        self._shape = (weights.hidden_size, weights.intermediate_size, weights.num_experts)
        self._device = weights.device
        self.correction_bias = correction_bias
        self._context = LayerContext(config.num_experts, config.top_k, config.routing, correction_bias)
        self.requested_kernel = kernel
        self._kernels = {
            routed: select_kernel(
                weights.precision, weights.device, routed, kernel, weight_on_input=config.apply_router_weight_on_input
            )
            for routed in (False, True)
        }
        if numerics not in NUMERICS:
            raise ValueError(f"numerics: expected one of {sorted(NUMERICS)}, got {numerics!r}")
        allowed = NUMERICS[numerics]
        if allowed is not None and weights.precision not in allowed:
            raise ValueError(
                f"numerics: {numerics!r} is available for {', '.join(allowed)} weights, got {weights.precision}"
            )
        ue8m0 = isinstance(weights, FP8BlockWeights) and weights.ue8m0
        if numerics == "vllm_triton" and (ue8m0 or config.apply_router_weight_on_input):
            raise ValueError(
                "numerics: 'vllm_triton' needs scales that are not ue8m0 and the router weight "
                "on the output (apply_router_weight_on_input=False)"
            )
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
                    f"it is available with the sm90_triton_fp8 kernel (FP8 on Hopper)"
                )
            self._fixed_configs[k.name] = fixed
        self._prepared = {k.name: k.prepare(weights) for k in self._kernels.values()}
        # Keep the checkpoint layout only if a kernel reads it: a transformed copy beside it would
        # double the layer's memory (NVFP4 must stay at 0.5625 bytes a weight).
        self._weights: Optional[ExpertWeights] = weights if any(p is weights for p in self._prepared.values()) else None
        self._tuned: Dict[str, TuningResult] = {}
        logger.debug(
            "%s: kernels computed=%s routed=%s",
            type(self).__name__,
            self._kernels[False].name,
            self._kernels[True].name,
        )

    @classmethod
    def from_float(
        cls,
        w13: torch.Tensor,
        w2: torch.Tensor,
        config: MoEConfig,
        *,
        correction_bias: Optional[torch.Tensor] = None,
        kernel: str = "auto",
        deterministic: bool = False,
        numerics: str = "accurate",
        **quantize_options,
    ) -> "MoELayer":
        """Quantize float master weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` into this precision
        (``quantize_options`` go to the weight container, e.g. ``ue8m0=True`` for FP8 block)."""
        weights = cls.weights_type.quantize(w13, w2, **quantize_options)
        return cls(
            weights,
            config,
            correction_bias=correction_bias,
            kernel=kernel,
            deterministic=deterministic,
            numerics=numerics,
        )

    # -- properties ---------------------------------------------------------------------
    @property
    def weights(self) -> ExpertWeights:
        """The experts in the canonical layout: the held container, or (when every kernel of the
        layer reads a transformed layout) a copy rebuilt from the kernel's layout on each access."""
        if self._weights is not None:
            return self._weights
        kernel = self._kernels[True]
        assert kernel.restore is not None  # no held container: the kernel transformed the layout
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
    def warmup(
        self, max_num_tokens: int, *, cache: Optional[TuningCache] = None, force: bool = False, progress: bool = True
    ) -> Dict[str, TuningResult]:
        """Tune the layer's kernels for every token bucket up to the engine's ``max_num_tokens``.

        Call it once before CUDA-graph capture (it refuses to run inside one). Results come
        from ``cache`` (default: the user's cache directory) when present; afterwards every
        call maps T -> bucket -> configuration on the host. Kernels that are not tunable,
        or a layer on the CPU, are left as they are. Kernels with a warm-up of their own
        (FlashInfer's on Blackwell) first check they can start, then tune for ``max_num_tokens``
        themselves. Returns kernel name -> result.
        """
        check_int("max_num_tokens", max_num_tokens, minimum=1)
        if cache is not None and not isinstance(cache, TuningCache):
            raise TypeError(f"cache: expected a TuningCache or None, got {type(cache).__name__}")
        check_bool("force", force)
        check_bool("progress", progress)
        self._context = replace(self._context, max_num_tokens=max_num_tokens)
        for name, kernel in {k.name: k for k in self._kernels.values() if k.warmup is not None}.items():
            computed = self._kernels[False] is kernel and kernel.routes(self._context)
            assert kernel.warmup is not None  # filtered above
            kernel.warmup(
                self._prepared[name],
                self._context,
                _input_factory(self)(max_num_tokens),
                computed,
                local_expert_offset=self.config.local_expert_offset,
                apply_router_weight_on_input=self.config.apply_router_weight_on_input,
            )
        kernels = {
            k.name: k
            for k in self._kernels.values()
            if k.tunable and self.device.type == "cuda" and k.name not in self._fixed_configs
        }
        if not kernels:
            logger.info(
                "%s: nothing to tune (kernels %s on %s)",
                type(self).__name__,
                sorted({k.name for k in self._kernels.values()}),
                self.device,
            )
            self._precompile()
            return {}
        cache = cache if cache is not None else TuningCache()
        hidden_size, inter, num_local = self._shape
        for name, kernel in kernels.items():
            started = time.perf_counter()
            space = kernel.tuning_space()
            assert space is not None  # ``kernels`` holds tunable kernels only
            signature = ProblemSignature(
                self.precision,
                num_local,
                self.config.top_k,
                hidden_size,
                inter,
                self.config.num_experts,
                kernel=name,
                kernel_version=space.version,
            )
            self._tuned[name] = tune(
                _kernel_runner(kernel, self._prepared[name], self.config),
                space.candidates,
                max_num_tokens,
                signature,
                cache,
                _input_factory(self),
                force=force,
                progress=progress,
            )
            logger.info(
                "%s: tuned %s up to %d tokens in %.1f s",
                type(self).__name__,
                name,
                max_num_tokens,
                time.perf_counter() - started,
            )
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
    def forward(
        self,
        hidden: torch.Tensor,
        router_logits: torch.Tensor,
        *,
        routing_replay_out: Optional[torch.Tensor] = None,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Route ``hidden [T, H]`` bf16 with ``router_logits [T, num_experts]`` fp32 and run the experts.

        Returns ``[T, H]`` bf16 (``out[:T]`` when ``out`` is given).
        """
        t = self._check_hidden(hidden)
        check_tensor(
            "router_logits",
            router_logits,
            dtype=torch.float32,
            shape=(t, self.config.num_experts),
            device=hidden.device,
        )
        check_replay_out(routing_replay_out, t, self.config.top_k, hidden.device)
        self._check_out(out, hidden)
        if self.config.check_values and not capturing():
            check_finite("hidden", hidden)
            check_finite("router_logits", router_logits)
        kernel = self._kernels[False]
        if kernel.routes(self._context):
            assert kernel.run_computed is not None  # routes() requires it
            return kernel.run_computed(
                self._prepared[kernel.name],
                hidden,
                router_logits,
                routing_replay_out=routing_replay_out,
                **self._run_kwargs(kernel, hidden, out),
            )
        ids, weights = self.config.routing.select(router_logits, self.config.top_k, self.correction_bias)
        return self._run(kernel, hidden, ids, weights, out, routing_replay_out)

    def forward_routed(
        self,
        hidden: torch.Tensor,
        topk: TopK,
        *,
        routing_replay_out: Optional[torch.Tensor] = None,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the experts on precomputed top-k.

        ``topk`` is packed int32 ``[T, k]`` (see :mod:`moe_backend.routing.packed`) or
        ``(ids [T, k] int32, weights [T, k] fp32)`` with global ids; ids of a pair must lie in
        ``[-1, 32768)`` as packed ones do (checked with one host sync, except during a CUDA-graph
        capture), so the replay buffer never records a wrapped id.
        """
        t = self._check_hidden(hidden)
        ids, weights = self._unpack(topk, t, hidden.device)
        if not isinstance(topk, torch.Tensor):
            check_id_range("topk_ids", ids)
        check_replay_out(routing_replay_out, t, self.config.top_k, hidden.device)
        self._check_out(out, hidden)
        self._check_routed_values(hidden, ids, weights)
        return self._run(self._kernels[True], hidden, ids, weights, out, routing_replay_out)

    def experts(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Engine-level call: ``hidden [T, H]`` bf16, ``topk_ids [T, k]`` int32 global,
        ``topk_weights [T, k]`` fp32, optional ``out [R >= T, H]``; returns ``out[:T]``."""
        t = self._check_hidden(hidden)
        ids, weights = self._unpack((topk_ids, topk_weights), t, hidden.device)
        self._check_out(out, hidden)
        self._check_routed_values(hidden, ids, weights)
        return self._run(self._kernels[True], hidden, ids, weights, out)

    __call__ = forward

    # -- internals ------------------------------------------------------------------------
    def _check_hidden(self, hidden: torch.Tensor) -> int:
        check_tensor("hidden", hidden, dtype=torch.bfloat16, shape=(None, self.hidden_size), device=self.device)
        return hidden.shape[0]

    def _check_out(self, out: Optional[torch.Tensor], hidden: torch.Tensor) -> None:
        t = hidden.shape[0]
        check_out("out", out, rows=t, cols=self.hidden_size, dtype=hidden.dtype, device=hidden.device)
        # in-place operation is not part of the contract: a kernel may write out[:T] while it still reads hidden
        if out is not None and overlaps(out[:t], hidden):
            raise ValueError("out: expected a buffer that does not overlap hidden, got one sharing its memory")

    def _check_routed_values(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """The opt-in value checks of the routed entry points (see :attr:`MoEConfig.check_values`)."""
        if not self.config.check_values or capturing():
            return
        check_finite("hidden", hidden)
        check_finite("topk_weights", weights)
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= self.config.num_experts:
                raise ValueError(
                    f"topk_ids: expected global expert ids in [-1, {self.config.num_experts}), "
                    f"got values in [{lo}, {hi}]"
                )

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

    def _run(
        self,
        kernel: Kernel,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        out: Optional[torch.Tensor],
        routing_replay_out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        kw = self._run_kwargs(kernel, hidden, out)
        if kernel.takes_context:
            kw["routing_replay_out"] = routing_replay_out
        else:
            write_routing_replay(ids, routing_replay_out)
        return kernel.run(self._prepared[kernel.name], hidden, ids, weights, **kw)

    def _run_kwargs(self, kernel: Kernel, hidden: torch.Tensor, out: Optional[torch.Tensor]) -> dict:
        """Keyword arguments of ``kernel.run`` / ``run_computed`` besides the replay buffer."""
        kw = dict(
            local_expert_offset=self.config.local_expert_offset,
            apply_router_weight_on_input=self.config.apply_router_weight_on_input,
            out=torch.empty_like(hidden) if out is None else out,
        )
        if kernel.takes_context:
            kw["context"] = self._context
        if kernel.name in self._fixed_configs:
            kw["config"] = self._fixed_configs[kernel.name]
        elif kernel.name in self._tuned:
            kw["config"] = self._tuned[kernel.name].config_for(hidden.shape[0])
        return kw


def _kernel_runner(kernel: Kernel, prepared: object, config: MoEConfig) -> Callable[[dict, MoEInputs], None]:
    """``run(config, inputs)`` for the tuner; holds the prepared weights, not the layer."""

    def run(tuning_config: dict, inputs: MoEInputs) -> None:
        out = torch.empty_like(inputs.hidden)
        kernel.run(
            prepared,
            inputs.hidden,
            inputs.topk_ids,
            inputs.topk_weights,
            local_expert_offset=config.local_expert_offset,
            apply_router_weight_on_input=config.apply_router_weight_on_input,
            out=out,
            config=tuning_config,
        )

    return run


def _input_factory(layer: MoELayer) -> Callable[[int], MoEInputs]:
    """Seeded max-load profiling inputs for one bucket of this layer's shape (no layer reference kept)."""
    cfg, device = layer.config, layer.device
    hidden_size, _, num_local = layer._shape
    return lambda bucket: moe_inputs(
        bucket, hidden_size, cfg.top_k, cfg.num_experts, num_local, cfg.local_expert_offset, device=device
    )


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
