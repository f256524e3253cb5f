"""Which format each linear of a checkpoint is stored in: parsed from its quantization config.

Four checkpoint formats (docs/design.md §5.5):

* ``bf16``: no quantization config; every linear is a float ``weight``.
* ``fp8_block`` (DeepSeek-V3 official): ``config.json:quantization_config``
  ``{quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128], activation_scheme: dynamic}``
  (``scale_fmt: ue8m0`` for DeepSeek V3.1's power-of-two activation scales);
  optional exclusions in ``modules_to_not_convert`` / ``ignored_layers``.
* ``nvfp4`` (ModelOpt): ``hf_quant_config.json`` ``{"quantization": {quant_algo: NVFP4,
  group_size: 16, exclude_modules: [...]}}`` or ``config.json:quantization_config``
  ``{quant_method: modelopt, quant_algo: NVFP4, ignore | exclude_modules: [...]}``.
* ``fp8_tensor`` (ModelOpt FP8, what vLLM serves as ``quant_method: modelopt``):
  ``hf_quant_config.json`` ``{"quantization": {quant_algo: FP8, exclude_modules: [...]}}``
  or ``config.json:quantization_config`` ``{quant_method: modelopt, quant_algo: FP8,
  ignore | exclude_modules: [...]}``: e4m3 weights with one fp32 scale per matrix and
  a static (calibrated) fp32 ``input_scale`` per linear. ``kv_cache_quant_algo`` is
  accepted and ignored (no KV cache here); a ``group_size`` is refused (that would be
  a block format). ModelOpt's other FP8 algorithms (``FP8_PER_CHANNEL_PER_TOKEN``,
  ``FP8_PB_WO``, ...) are refused.

Excluded modules stay unquantized. Exclusion patterns are shell-style (``*``
crosses dots, as ModelOpt writes them) and match a module or any dotted prefix
of it, so ``model.layers.3.mlp.experts`` excludes every expert of layer 3.
Anything else is refused with a ``ValueError`` naming the unsupported field.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from moe_backend._checks import check_bool, check_str
from moe_backend.quant import BLOCK, NVFP4_GROUP

from .reader import read_json

BF16, FP8_BLOCK, FP8_TENSOR, NVFP4 = "bf16", "fp8_block", "fp8_tensor", "nvfp4"
FORMATS = (BF16, FP8_BLOCK, FP8_TENSOR, NVFP4)
#: ModelOpt ``quant_algo`` -> format.
MODELOPT_ALGOS = {"FP8": FP8_TENSOR, "NVFP4": NVFP4}

#: Linears no DeepSeek-V3 checkpoint quantizes: the router (DeepSeek's MoEGate is not an
#: nn.Linear, so neither the official FP8 release nor ModelOpt touches it) and the output head.
ALWAYS_UNQUANTIZED = ("lm_head", "*.mlp.gate")

HF_QUANT_CONFIG = "hf_quant_config.json"


def _prefixes(module: str) -> Tuple[str, ...]:
    parts = module.split(".")
    return tuple(".".join(parts[: i + 1]) for i in range(len(parts)))


def matches_any(module: str, patterns: Sequence[str]) -> bool:
    """True when a pattern matches ``module`` or one of its dotted prefixes."""
    return any(fnmatchcase(prefix, pattern) for prefix in _prefixes(module) for pattern in patterns)


def _patterns(source: str, value: Any) -> Tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{source}: expected a list of module-name patterns, got {value!r}")
    return tuple(value)


def _require(source: str, name: str, value: Any, supported: Any) -> None:
    if value != supported:
        raise ValueError(f"{source}: {name} {value!r} is not supported (supported: {supported!r})")


@dataclass(frozen=True)
class QuantSpec:
    """A checkpoint's quantization: its ``method`` (one of :data:`FORMATS`), the module
    patterns it leaves unquantized, and whether FP8 activation scales are ``ue8m0``."""

    method: str = BF16
    exclude_modules: Tuple[str, ...] = ()
    ue8m0: bool = False

    def __post_init__(self) -> None:
        if self.method not in FORMATS:
            raise ValueError(f"method: expected one of {FORMATS}, got {self.method!r}")
        _patterns("exclude_modules", self.exclude_modules)
        check_bool("ue8m0", self.ue8m0)

    # -- reading --------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: Path, config: Mapping[str, Any]) -> "QuantSpec":
        """Parse ``config['quantization_config']``, else ``path/hf_quant_config.json``, else bf16.
        Errors name the file (``path/config.json`` or ``path/hf_quant_config.json``)."""
        if config.get("quantization_config") is not None:
            return cls.from_quantization_config(
                config["quantization_config"], source=f"{Path(path) / 'config.json'}:quantization_config"
            )
        hf_quant = Path(path) / HF_QUANT_CONFIG
        if hf_quant.is_file():
            return cls.from_hf_quant_config(read_json(hf_quant), source=str(hf_quant))
        return cls()

    @classmethod
    def from_quantization_config(
        cls, qc: Mapping[str, Any], *, source: str = "config.json:quantization_config"
    ) -> "QuantSpec":
        """Parse ``config.json:quantization_config`` (``fp8`` block, ``modelopt`` FP8 or NVFP4)."""
        if not isinstance(qc, Mapping):
            raise TypeError(f"{source}: expected a JSON object, got {qc!r}")
        method = qc.get("quant_method")
        if method == "fp8":
            _require(source, "fmt", qc.get("fmt", "e4m3"), "e4m3")
            block_size = qc.get("weight_block_size")
            _require(
                source,
                "weight_block_size",
                list(block_size) if isinstance(block_size, (list, tuple)) else block_size,
                [BLOCK, BLOCK],
            )
            _require(source, "activation_scheme", qc.get("activation_scheme", "dynamic"), "dynamic")
            scale_fmt = qc.get("scale_fmt")
            if scale_fmt not in (None, "ue8m0"):
                raise ValueError(f"{source}: scale_fmt {scale_fmt!r} is not supported (supported: None, 'ue8m0')")
            exclude = _patterns(f"{source}.modules_to_not_convert", qc.get("modules_to_not_convert")) + _patterns(
                f"{source}.ignored_layers", qc.get("ignored_layers")
            )
            return cls(FP8_BLOCK, exclude, ue8m0=scale_fmt == "ue8m0")
        if method == "modelopt":
            nested = qc.get("quantization")
            return cls._modelopt(source, nested if isinstance(nested, Mapping) else qc)
        raise ValueError(
            f"{source}: quant_method {method!r} is not supported "
            "(supported: 'fp8' with 128x128 blocks, 'modelopt' with quant_algo FP8 or NVFP4)"
        )

    @classmethod
    def from_hf_quant_config(cls, hf_quant: Mapping[str, Any], *, source: str = HF_QUANT_CONFIG) -> "QuantSpec":
        """Parse ModelOpt's ``hf_quant_config.json`` (``source`` names the file in errors)."""
        section = hf_quant.get("quantization") if isinstance(hf_quant, Mapping) else None
        if not isinstance(section, Mapping):
            raise ValueError(f"{source}: expected a 'quantization' object, got {hf_quant!r}")
        return cls._modelopt(f"{source}:quantization", section)

    @classmethod
    def _modelopt(cls, source: str, section: Mapping[str, Any]) -> "QuantSpec":
        algo = section.get("quant_algo")
        method = MODELOPT_ALGOS.get(algo) if isinstance(algo, str) else None
        if method is None:
            raise ValueError(f"{source}: quant_algo {algo!r} is not supported (supported: {sorted(MODELOPT_ALGOS)})")
        if method == NVFP4:
            _require(source, "group_size", section.get("group_size", NVFP4_GROUP), NVFP4_GROUP)
        else:  # per-tensor FP8 has no groups: a group size would mean another (block) layout
            _require(source, "group_size", section.get("group_size"), None)
        exclude = _patterns(f"{source}.exclude_modules", section.get("exclude_modules")) + _patterns(
            f"{source}.ignore", section.get("ignore")
        )
        return cls(method, exclude)

    # -- writing (the checkpoint maker) -----------------------------------------------------
    def config_entries(self) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
        """``(config.json quantization_config, hf_quant_config.json)`` describing this spec;
        None where a file or field is not written. ModelOpt formats (FP8 per-tensor, NVFP4) write
        both, as recent ModelOpt does."""
        if self.method == BF16:
            return None, None
        if self.method == FP8_BLOCK:
            qc: Dict[str, Any] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "weight_block_size": [BLOCK, BLOCK],
                "activation_scheme": "dynamic",
            }
            if self.ue8m0:
                qc["scale_fmt"] = "ue8m0"
            if self.exclude_modules:
                qc["modules_to_not_convert"] = list(self.exclude_modules)
            return qc, None
        exclude = list(self.exclude_modules)
        algo = {v: k for k, v in MODELOPT_ALGOS.items()}[self.method]
        group = {"group_size": NVFP4_GROUP} if self.method == NVFP4 else {}
        return (
            {"quant_method": "modelopt", "quant_algo": algo, **group, "ignore": exclude},
            {
                "producer": {"name": "modelopt"},
                "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, **group, "exclude_modules": exclude},
            },
        )

    # -- per module -------------------------------------------------------------------------
    def format_of(self, module: str) -> str:
        """Storage format of the linear ``module`` (e.g. ``model.layers.3.mlp.experts.0.up_proj``)."""
        check_str("module", module)
        if self.method == BF16 or matches_any(module, ALWAYS_UNQUANTIZED + self.exclude_modules):
            return BF16
        return self.method
