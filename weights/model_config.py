"""The DeepSeek-V3 architecture fields of a checkpoint's ``config.json`` that the MoE layers need.

Only what the expert layers use is read (docs/design.md §5.5); attention and vocabulary
fields are left to the engine. Unsupported routing (anything but sigmoid scores
with ``noaux_tc`` top-k) is refused with a ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Tuple

from moe_backend.routing import MAX_PACKED_ID, RoutingConfig

#: ``model_type`` values whose MoE blocks follow DeepSeek-V3 (Kimi K2 reuses the architecture).
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2")

_REQUIRED = object()
CONFIG_FILE = "config.json"


def _field(
    config: Mapping[str, Any], name: str, kinds: Tuple[type, ...], default: Any = _REQUIRED, source: str = CONFIG_FILE
) -> Any:
    """``config[name]`` checked against ``kinds``; ``default`` when absent or null (required if none)."""
    value = config.get(name)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"{source}: missing field {name!r} (needed for the MoE layers)")
        return default
    # bool is an int subclass: a flag where a count is expected is an error, not 0/1
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"{source}: field {name!r} expected {expected}, got {value!r}")
    return value


@dataclass(frozen=True)
class DeepSeekV3Spec:
    """MoE-relevant architecture of a DeepSeek-V3 checkpoint.

    ``hidden_size`` H, ``moe_intermediate_size`` I (per routed expert; a shared
    expert block has ``I * n_shared_experts`` rows), ``n_routed_experts`` E (global).
    Layer ``L`` is an MoE layer when ``L >= first_k_dense_replace`` and
    ``L % moe_layer_freq == 0`` (DeepSeek's own modeling code).
    """

    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    num_hidden_layers: int
    first_k_dense_replace: int
    n_shared_experts: int = 0
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str = CONFIG_FILE) -> "DeepSeekV3Spec":
        """Read and validate the fields of a parsed ``config.json`` (``source`` names the file in errors)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"{source}: expected a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported, expected one of {SUPPORTED_MODEL_TYPES}"
            )
        scoring = config.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ValueError(f"{source}: scoring_func {scoring!r} is not supported, expected 'sigmoid'")
        method = config.get("topk_method", "noaux_tc")
        if method != "noaux_tc":
            raise ValueError(f"{source}: topk_method {method!r} is not supported, expected 'noaux_tc'")

        def field(name: str, kinds: Tuple[type, ...], default: Any = _REQUIRED) -> Any:
            return _field(config, name, kinds, default, source)

        spec = cls(
            hidden_size=field("hidden_size", (int,)),
            moe_intermediate_size=field("moe_intermediate_size", (int,)),
            n_routed_experts=field("n_routed_experts", (int,)),
            num_experts_per_tok=field("num_experts_per_tok", (int,)),
            n_group=field("n_group", (int,)),
            topk_group=field("topk_group", (int,)),
            num_hidden_layers=field("num_hidden_layers", (int,)),
            first_k_dense_replace=field("first_k_dense_replace", (int,), 0),
            n_shared_experts=field("n_shared_experts", (int,), 0),
            moe_layer_freq=field("moe_layer_freq", (int,), 1),
            routed_scaling_factor=float(field("routed_scaling_factor", (int, float), 1.0)),
            norm_topk_prob=field("norm_topk_prob", (bool,), True),
        )
        for name in (
            "hidden_size",
            "moe_intermediate_size",
            "n_routed_experts",
            "num_experts_per_tok",
            "num_hidden_layers",
            "moe_layer_freq",
        ):
            if getattr(spec, name) < 1:
                raise ValueError(f"{source}: field {name!r} expected a positive int, got {getattr(spec, name)}")
        if spec.n_routed_experts > MAX_PACKED_ID:
            raise ValueError(
                f"{source}: field 'n_routed_experts' expected at most {MAX_PACKED_ID}, got {spec.n_routed_experts}"
            )
        for name in ("first_k_dense_replace", "n_shared_experts"):
            if getattr(spec, name) < 0:
                raise ValueError(f"{source}: field {name!r} expected an int >= 0, got {getattr(spec, name)}")
        # the routing rules (grouping, a finite positive scaling factor) live with the routing; check
        # them now so a bad config fails at load, naming the file
        try:
            spec.routing_config().check(spec.n_routed_experts, spec.num_experts_per_tok, True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from exc
        return spec

    @property
    def moe_layers(self) -> Tuple[int, ...]:
        """Indices of the decoder layers whose MLP is an MoE block, ascending."""
        return tuple(
            layer
            for layer in range(self.first_k_dense_replace, self.num_hidden_layers)
            if layer % self.moe_layer_freq == 0
        )

    @property
    def shared_intermediate_size(self) -> int:
        """Rows of the shared experts' gate/up projections (0 when there are none)."""
        return self.moe_intermediate_size * self.n_shared_experts

    def routing_config(self) -> RoutingConfig:
        """DeepSeek-V3 ``noaux_tc`` routing with the routed scaling applied inside the layer."""
        routing = RoutingConfig.deepseek_v3(
            self.n_group, self.topk_group, self.routed_scaling_factor, apply_routed_scaling=True
        )
        return dataclasses.replace(routing, norm_topk_prob=self.norm_topk_prob)
