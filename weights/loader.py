"""Build the MoE layers of a DeepSeek-V3 checkpoint (bf16, FP8 block, ModelOpt FP8, NVFP4) as ``MoELayer`` objects.

Per MoE layer ``L`` (``L >= first_k_dense_replace``, every ``moe_layer_freq``) the
checkpoint holds::

    model.layers.L.mlp.experts.{e}.{gate,up,down}_proj.weight (+ scales)   routed experts
    model.layers.L.mlp.gate.weight [E, H]                                  router (never quantized)
    model.layers.L.mlp.gate.e_score_correction_bias [E]                    noaux_tc selection bias
    model.layers.L.mlp.shared_experts.{gate,up,down}_proj.weight (+ scales)

The loader stacks the local experts of an expert-parallel rank (a contiguous
slice of ``E / ep_size`` experts) into the canonical containers: ``w13 [E_local,
2I, ...]`` with rows ``[gate; up]``, ``w2 [E_local, H, ...]``; NVFP4 keeps gate's
and up's ``weight_scale_2`` apart in ``w13_scale_2 [E_local, 2]``; ModelOpt FP8
(per-tensor) merges gate's and up's ``weight_scale`` into one scale per expert by
requantizing (:func:`merge_w13_scales`) and keeps the largest ``input_scale`` of the
local experts as the layer's static activation scales. Excluded
(unquantized) experts become bf16. Loading streams tensor by tensor into
preallocated buffers and releases the shards after each layer, so the host
memory beyond the result stays near one layer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from moe_backend._checks import check_device, check_int
from moe_backend.expert_weights import WEIGHT_TYPES, ExpertWeights
from moe_backend.layer import LAYER_TYPES, MoEConfig, MoELayer
from moe_backend.quant import BLOCK, dequantize_fp8_per_tensor, quantize_fp8_per_tensor

from .checkpoint import Checkpoint
from .linear import CheckpointLinear, read_tensor
from .model_config import DeepSeekV3Spec
from .quant_config import BF16, FP8_BLOCK, FP8_TENSOR

logger = logging.getLogger(__name__)

Device = Union[str, torch.device]
PathLike = Union[str, os.PathLike]


@dataclass
class SharedExperts:
    """The shared experts of one MoE layer as stored (one MLP of ``I * n_shared_experts`` rows):
    ``gate_proj``/``up_proj [I_s, H]``, ``down_proj [H, I_s]``, each in its checkpoint format."""

    gate_proj: CheckpointLinear
    up_proj: CheckpointLinear
    down_proj: CheckpointLinear


@dataclass
class MoELayerWeights:
    """What one MoE layer of a checkpoint holds, for one expert-parallel rank.

    ``experts``: the local experts ``[local_expert_offset, local_expert_offset + E_local)``
    in the canonical layout; ``router_weight [E, H]`` (all experts, stored dtype, usually
    bf16); ``correction_bias [E]`` fp32; ``shared_experts`` (None when the model has none).
    """

    layer: int
    experts: ExpertWeights
    local_expert_offset: int
    router_weight: torch.Tensor
    correction_bias: torch.Tensor
    shared_experts: Optional[SharedExperts]


def local_experts(num_experts: int, ep_rank: int, ep_size: int) -> range:
    """Global ids of the experts rank ``ep_rank`` of ``ep_size`` owns: a contiguous ``E / ep_size`` slice."""
    check_int("ep_size", ep_size, minimum=1)
    check_int("ep_rank", ep_rank, minimum=0)
    if ep_rank >= ep_size:
        raise ValueError(f"ep_rank: expected a rank in [0, {ep_size}), got {ep_rank}")
    if num_experts % ep_size:
        raise ValueError(f"ep_size: expected a divisor of the expert count {num_experts}, got {ep_size}")
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def _owned(linear: CheckpointLinear, device: Device) -> CheckpointLinear:
    """Copy a linear's tensors out of the shard mapping onto ``device``."""

    def copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(device, copy=True)

    return CheckpointLinear(
        linear.format,
        linear.weight.to(device, copy=True),
        copy(linear.scale),
        copy(linear.scale_2),
        copy(linear.input_scale),
    )


def merge_w13_scales(gate: CheckpointLinear, up: CheckpointLinear) -> Tuple[torch.Tensor, torch.Tensor]:
    """One expert's FP8 per-tensor ``gate_proj`` and ``up_proj`` as one ``w13 [2I, H]`` e4m3 matrix
    with ONE fp32 scale: ``(w13, scale)``, ``scale`` 0-d.

    ModelOpt stores a ``weight_scale`` per projection, but :class:`FP8TensorWeights` (and the
    kernels) hold one scale per expert for w13. As vLLM's ``process_fp8_weight_tensor_strategy_moe``
    does, the scale is the larger of the two, and each half is dequantized with its own scale and
    requantized with that one (``e4m3(clamp(q * s / max(s_gate, s_up)))``, computed in fp32). The
    half that holds the larger scale comes back bit for bit; the other loses at most the bits its
    smaller scale gave it (none when both scales are equal).
    """
    assert gate.scale is not None and up.scale is not None  # FP8 per-tensor linears carry one (read_linear)
    scale = torch.maximum(gate.scale, up.scale)
    halves = [
        quantize_fp8_per_tensor(dequantize_fp8_per_tensor(w, s), scale)[0]
        for w, s in ((gate.weight, gate.scale), (up.weight, up.scale))
    ]
    return torch.cat(halves), scale


def _expert_parts(
    gate: CheckpointLinear, up: CheckpointLinear, down: CheckpointLinear
) -> Dict[str, Tuple[torch.Tensor, ...]]:
    """Container field -> the stored tensors making up one expert's slot of it, stacked along the
    slot's first dim: the w13 fields take ``(gate, up)`` (rows ``[gate; up]``, and NVFP4's two
    global scales side by side), the w2 fields take ``(down,)``. FP8 per-tensor experts get their
    w13 requantized to one scale (:func:`merge_w13_scales`)."""
    # the three linears share one format, so the scales one holds the others hold (read_linear)
    if gate.format == FP8_TENSOR:
        w13, w13_scale = merge_w13_scales(gate, up)
        assert down.scale is not None
        return {"w13": (w13,), "w13_scale": (w13_scale,), "w2": (down.weight,), "w2_scale": (down.scale,)}
    parts: Dict[str, Tuple[torch.Tensor, ...]] = {"w13": (gate.weight, up.weight), "w2": (down.weight,)}
    if gate.scale is not None:
        assert up.scale is not None and down.scale is not None
        parts.update(w13_scale=(gate.scale, up.scale), w2_scale=(down.scale,))
    if gate.scale_2 is not None:
        assert up.scale_2 is not None and down.scale_2 is not None
        # 0-d scalars: gate's and up's become the two entries of w13_scale_2's [2] slot
        parts.update(w13_scale_2=(gate.scale_2.reshape(1), up.scale_2.reshape(1)), w2_scale_2=(down.scale_2,))
    return parts


def _slot_shape(parts: Tuple[torch.Tensor, ...]) -> Tuple[int, ...]:
    if len(parts) == 1:
        return tuple(parts[0].shape)
    return (sum(p.shape[0] for p in parts), *parts[0].shape[1:])


def _copy_slot(slot: torch.Tensor, parts: Tuple[torch.Tensor, ...]) -> None:
    """Copy ``parts`` into ``slot`` stacked along its first dim, straight from the shard mapping
    (no concatenated temporary: it would cost host memory per expert)."""
    if len(parts) == 1:
        slot.copy_(parts[0])
        return
    row = 0
    for part in parts:
        slot[row : row + part.shape[0]].copy_(part)
        row += part.shape[0]


def _static_input_scale(
    prefix: str, field: str, projs: str, scales: Sequence[Optional[torch.Tensor]], device: Device
) -> Optional[torch.Tensor]:
    """The layer's one static activation scale ``[1]`` from the local experts' ``input_scale``s: their
    maximum (vLLM does the same, so no calibrated activation clips); None when none is stored."""
    present = [s for s in scales if s is not None]
    if not present:
        return None
    if len(present) != len(scales):
        raise ValueError(
            f"{prefix}.experts: {len(scales) - len(present)} of the local experts' {projs} have no "
            f"input_scale and {len(present)} have one; {field} needs all or none"
        )
    return torch.stack(present).max().reshape(1).to(device)


def _read_experts(ckpt: Checkpoint, prefix: str, experts: range, device: Device) -> ExpertWeights:
    """Stack experts ``experts`` of the MoE block ``prefix`` into their format's container.

    FP8 per-tensor (ModelOpt FP8): w13 is requantized to one scale per expert
    (:func:`merge_w13_scales`), and the static activation scales ``a13_scale`` / ``a2_scale`` are
    the largest ``input_scale`` of the local experts' gate/up resp. down projections (ModelOpt
    calibrates gate and up on the same input, so theirs agree; vLLM refuses them unequal, we take
    the larger). A checkpoint without ``input_scale`` gets dynamic activation quantization.
    """
    spec = ckpt.spec
    h, i = spec.hidden_size, spec.moe_intermediate_size
    modules = {
        e: {proj: f"{prefix}.experts.{e}.{proj}" for proj in ("gate_proj", "up_proj", "down_proj")} for e in experts
    }
    formats = {ckpt.quant.format_of(m) for names in modules.values() for m in names.values()}
    if len(formats) != 1:
        raise ValueError(
            f"{prefix}.experts: the local experts are stored in mixed formats {sorted(formats)}; "
            "a layer's experts must share one format (check the exclusion list)"
        )
    fmt = formats.pop()
    if fmt == FP8_BLOCK and (h % BLOCK or i % BLOCK):
        raise ValueError(
            f"{prefix}.experts: FP8 block experts need hidden_size and moe_intermediate_size "
            f"that are multiples of {BLOCK}, got H={h}, I={i}"
        )
    container = WEIGHT_TYPES[fmt]
    # bf16 containers hold bf16 whatever float the file stores; quantized ones keep the stored dtypes
    cast = torch.bfloat16 if fmt == BF16 else None
    buffers: Dict[str, Any] = {}  # container field -> [E_local, *slot] tensor
    input_scales: Dict[str, list] = {"a13_scale": [], "a2_scale": []}
    for slot, e in enumerate(experts):
        names = modules[e]
        gate = ckpt.linear(names["gate_proj"], (i, h))
        up = ckpt.linear(names["up_proj"], (i, h))
        down = ckpt.linear(names["down_proj"], (h, i))
        for field, parts in _expert_parts(gate, up, down).items():
            if field not in buffers:
                buffers[field] = torch.empty(
                    (len(experts), *_slot_shape(parts)), dtype=cast or parts[0].dtype, device=device
                )
            _copy_slot(buffers[field][slot], parts)
        if fmt == FP8_TENSOR:  # scalars, copied out of the shard mapping
            input_scales["a13_scale"] += [None if p.input_scale is None else p.input_scale.clone() for p in (gate, up)]
            input_scales["a2_scale"].append(None if down.input_scale is None else down.input_scale.clone())
    extra: Dict[str, Any] = {"ue8m0": ckpt.quant.ue8m0} if fmt == FP8_BLOCK else {}
    if fmt == FP8_TENSOR:
        extra.update(
            a13_scale=_static_input_scale(prefix, "a13_scale", "gate_proj/up_proj", input_scales["a13_scale"], device),
            a2_scale=_static_input_scale(prefix, "a2_scale", "down_proj", input_scales["a2_scale"], device),
        )
    return container(**buffers, **extra)


def read_moe_layer(
    ckpt: Checkpoint, layer: int, *, ep_rank: int = 0, ep_size: int = 1, device: Device = "cpu"
) -> MoELayerWeights:
    """Read MoE layer ``layer`` of ``ckpt`` for expert-parallel rank ``ep_rank`` of ``ep_size``."""
    if not isinstance(ckpt, Checkpoint):
        raise TypeError(f"ckpt: expected a Checkpoint, got {type(ckpt).__name__}")
    check_int("layer", layer)
    device = check_device("device", device)
    spec = ckpt.spec
    if layer not in spec.moe_layers:
        raise ValueError(
            f"layer: {layer} is not an MoE layer of this checkpoint (MoE layers: "
            f"{spec.moe_layers[0] if spec.moe_layers else '-'}..{spec.num_hidden_layers - 1}, "
            f"every {spec.moe_layer_freq})"
        )
    experts = local_experts(spec.n_routed_experts, ep_rank, ep_size)
    prefix = f"model.layers.{layer}.mlp"
    e, h = spec.n_routed_experts, spec.hidden_size
    router = _owned(ckpt.linear(f"{prefix}.gate", (e, h)), device).weight
    bias_key = f"{prefix}.gate.e_score_correction_bias"
    bias = read_tensor(
        ckpt.reader, bias_key, finite=True, dtype=(torch.float32, torch.bfloat16, torch.float16), shape=(e,)
    )
    shared = None
    if spec.n_shared_experts:
        i_s = spec.shared_intermediate_size
        shared = SharedExperts(
            *(
                _owned(ckpt.linear(f"{prefix}.shared_experts.{proj}", shape), device)
                for proj, shape in (("gate_proj", (i_s, h)), ("up_proj", (i_s, h)), ("down_proj", (h, i_s)))
            )
        )
    return MoELayerWeights(
        layer,
        _read_experts(ckpt, prefix, experts, device),
        experts.start,
        router,
        bias.to(device, torch.float32, copy=True),
        shared,
    )


def iter_moe_layers(
    ckpt: Checkpoint,
    *,
    layers: Optional[Sequence[int]] = None,
    ep_rank: int = 0,
    ep_size: int = 1,
    device: Device = "cpu",
    progress: bool = True,
) -> Iterator[MoELayerWeights]:
    """Yield the MoE layers (default: all, ascending) one at a time, releasing the shards
    after each, so a caller that drops each layer holds about one layer of host memory."""
    layers = ckpt.spec.moe_layers if layers is None else tuple(layers)
    for layer in tqdm(layers, desc=f"loading MoE layers ({ckpt.quant.method})", unit="layer", disable=not progress):
        try:
            weights = read_moe_layer(ckpt, layer, ep_rank=ep_rank, ep_size=ep_size, device=device)
        finally:
            ckpt.reader.close()
        logger.info(
            "layer %d: %d experts from %d, %s, %.1f MB",
            layer,
            weights.experts.num_experts,
            weights.local_expert_offset,
            weights.experts.precision,
            weights.experts.nbytes() / 1e6,
        )
        yield weights
        del weights  # or the previous layer stays alive while the next one is read


def build_moe_layer(weights: MoELayerWeights, spec: DeepSeekV3Spec, *, kernel: str = "auto") -> MoELayer:
    """The ``MoELayer`` of ``weights``' precision: DeepSeek-V3 routing (scaling applied inside),
    ``top_k = num_experts_per_tok``, the rank's ``local_expert_offset`` and correction bias."""
    config = MoEConfig(
        num_experts=spec.n_routed_experts,
        top_k=spec.num_experts_per_tok,
        routing=spec.routing_config(),
        local_expert_offset=weights.local_expert_offset,
    )
    return LAYER_TYPES[weights.experts.precision](
        weights.experts, config, correction_bias=weights.correction_bias, kernel=kernel
    )


def load_moe_layers(
    path: PathLike,
    *,
    layers: Optional[Sequence[int]] = None,
    ep_rank: int = 0,
    ep_size: int = 1,
    device: Device = "cpu",
    kernel: str = "auto",
    progress: bool = True,
) -> Dict[int, MoELayer]:
    """Layer index -> ready ``MoELayer`` for the MoE layers of checkpoint directory ``path``."""
    with Checkpoint(path) as ckpt:
        return {
            w.layer: build_moe_layer(w, ckpt.spec, kernel=kernel)
            for w in iter_moe_layers(
                ckpt, layers=layers, ep_rank=ep_rank, ep_size=ep_size, device=device, progress=progress
            )
        }


def load_moe_layer(
    path: PathLike, layer: int, *, ep_rank: int = 0, ep_size: int = 1, device: Device = "cpu", kernel: str = "auto"
) -> MoELayer:
    """The ready ``MoELayer`` of MoE layer ``layer`` of checkpoint directory ``path``."""
    return load_moe_layers(
        path, layers=[layer], ep_rank=ep_rank, ep_size=ep_size, device=device, kernel=kernel, progress=False
    )[layer]
