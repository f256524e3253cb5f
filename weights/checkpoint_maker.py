"""Write small DeepSeek-V3 checkpoints (bf16, FP8 block, ModelOpt FP8, NVFP4) from one set of seeded weights.

The checkpoints have the real tensor names and files of the published ones —
``config.json`` (every field transformers' ``DeepseekV3Config`` reads),
``model.safetensors.index.json`` and one shard per decoder layer — with
MLA attention (``q_a_proj``/``q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa``,
``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), dense first layers, routed
experts, shared experts, the router and its correction bias, norms, embeddings
and ``lm_head``. Dimensions are tiny but keep grouped routing meaningful
(:data:`TINY`: 16 experts in 4 groups, 2 groups kept, top-4, one shared expert).

Every tensor's float master comes from its own generator seeded by the seed and
the tensor's name, so the three formats hold the same weights: the bf16
checkpoint stores them rounded to bf16, and the quantized ones quantize that
bf16 copy with :mod:`moe_backend.quant`:

* FP8 block (DeepSeek-V3 official): every linear (attention, dense MLP, shared
  and routed experts) e4m3 with 128x128-block ``weight_scale_inv``; embeddings,
  norms, the router and ``lm_head`` stay bf16.
* NVFP4 (ModelOpt): the MLP linears (dense, shared and routed experts) in NVFP4;
  attention and ``lm_head`` are excluded (listed in ``exclude_modules`` /
  ``ignore``) and stay bf16. ``input_scale`` is not calibrated: it holds
  :data:`NOMINAL_ACTIVATION_AMAX` / (6 * 448); W4A16 serving never reads it.
* FP8 per-tensor (ModelOpt FP8, flavour ``fp8_tensor``): every linear but the router
  and ``lm_head`` (listed in ``exclude_modules`` / ``ignore``) e4m3 with one fp32
  ``weight_scale`` per matrix (``amax / 448``; gate and up get their own, as ModelOpt
  writes them) and a scalar ``input_scale`` of :data:`NOMINAL_ACTIVATION_AMAX` / 448
  (uncalibrated, but the static activation scale the loaded layers use).
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file

from moe_backend.quant import FP8_MAX, NVFP4_GROUP, quantize_fp8_block, quantize_fp8_per_tensor, quantize_nvfp4

from .checkpoint import CONFIG_FILE
from .model_config import DeepSeekV3Spec
from .quant_config import BF16, FP8_BLOCK, FP8_TENSOR, HF_QUANT_CONFIG, NVFP4, QuantSpec
from .reader import INDEX_FILE

logger = logging.getLogger(__name__)

#: Checkpoint flavours by their directory name -> the storage format of their quantized linears.
CHECKPOINT_FORMATS = {"bf16": BF16, "fp8": FP8_BLOCK, "fp8_tensor": FP8_TENSOR, "nvfp4": NVFP4}
#: Stand-in activation amax behind the uncalibrated ``input_scale`` of NVFP4 and FP8 per-tensor.
NOMINAL_ACTIVATION_AMAX = 16.0
#: Standard deviation of the router's correction bias: large enough to change some selections.
BIAS_STD = 0.1
#: ``lm_head`` gain: logits of standard deviation ~4 give peaked next-token distributions, as a
#: trained model's are, instead of near-uniform ones whose top-1 is decided by noise.
HEAD_GAIN = 4.0


@dataclass(frozen=True)
class ModelShape:
    """DeepSeek-V3 architecture sizes, named as in ``config.json``.

    FP8 block experts need ``hidden_size`` and ``moe_intermediate_size`` to be
    multiples of 128; NVFP4 needs every linear's input size to be a multiple of 16.
    ``q_lora_rank=None`` gives a plain ``q_proj`` (DeepSeek-V2-Lite style).
    """

    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 512
    moe_intermediate_size: int = 128
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    q_lora_rank: Optional[int] = 128
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    max_position_embeddings: int = 1024

    def config(self) -> Dict[str, Any]:
        """``config.json`` contents (without a quantization config)."""
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **asdict(self),
            "num_key_value_heads": self.num_attention_heads,
            "moe_layer_freq": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "num_nextn_predict_layers": 0,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }


#: The default test model: runs through transformers on a CPU in well under a second.
TINY = ModelShape()
#: A medium model for memory measurements: 4 MoE layers of 64 experts, H 1024, I 512 (~0.8 GB in bf16).
MEDIUM = ModelShape(
    vocab_size=2048,
    hidden_size=1024,
    intermediate_size=2048,
    moe_intermediate_size=512,
    num_hidden_layers=5,
    n_routed_experts=64,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
)

# kinds of tensors: how the master is drawn and whether the formats may quantize it
LINEAR, EMBED, NORM, ROUTER, BIAS, HEAD = "linear", "embed", "norm", "router", "bias", "head"


def _layer_tensors(shape: ModelShape, layer: int) -> Iterator[Tuple[str, Tuple[int, ...], str]]:
    """``(name, shape, kind)`` of every tensor of decoder layer ``layer``."""
    s, h = shape, shape.hidden_size
    p = f"model.layers.{layer}"
    qk_head = s.qk_nope_head_dim + s.qk_rope_head_dim
    yield f"{p}.input_layernorm.weight", (h,), NORM
    yield f"{p}.post_attention_layernorm.weight", (h,), NORM
    if s.q_lora_rank is None:
        yield f"{p}.self_attn.q_proj.weight", (s.num_attention_heads * qk_head, h), LINEAR
    else:
        yield f"{p}.self_attn.q_a_proj.weight", (s.q_lora_rank, h), LINEAR
        yield f"{p}.self_attn.q_a_layernorm.weight", (s.q_lora_rank,), NORM
        yield f"{p}.self_attn.q_b_proj.weight", (s.num_attention_heads * qk_head, s.q_lora_rank), LINEAR
    yield f"{p}.self_attn.kv_a_proj_with_mqa.weight", (s.kv_lora_rank + s.qk_rope_head_dim, h), LINEAR
    yield f"{p}.self_attn.kv_a_layernorm.weight", (s.kv_lora_rank,), NORM
    yield (
        f"{p}.self_attn.kv_b_proj.weight",
        (s.num_attention_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank),
        LINEAR,
    )
    yield f"{p}.self_attn.o_proj.weight", (h, s.num_attention_heads * s.v_head_dim), LINEAR
    mlps: List[Tuple[str, int]]
    if layer < s.first_k_dense_replace:
        mlps = [(f"{p}.mlp", s.intermediate_size)]
    else:
        yield f"{p}.mlp.gate.weight", (s.n_routed_experts, h), ROUTER
        yield f"{p}.mlp.gate.e_score_correction_bias", (s.n_routed_experts,), BIAS
        mlps = [(f"{p}.mlp.experts.{e}", s.moe_intermediate_size) for e in range(s.n_routed_experts)]
        if s.n_shared_experts:
            mlps.append((f"{p}.mlp.shared_experts", s.moe_intermediate_size * s.n_shared_experts))
    for prefix, inter in mlps:
        yield f"{prefix}.gate_proj.weight", (inter, h), LINEAR
        yield f"{prefix}.up_proj.weight", (inter, h), LINEAR
        yield f"{prefix}.down_proj.weight", (h, inter), LINEAR


def shard_tensors(shape: ModelShape) -> List[List[Tuple[str, Tuple[int, ...], str]]]:
    """The tensors of each shard: one shard per decoder layer, the embeddings with the first,
    the final norm and ``lm_head`` with the last."""
    shards = [list(_layer_tensors(shape, layer)) for layer in range(shape.num_hidden_layers)]
    shards[0].insert(0, ("model.embed_tokens.weight", (shape.vocab_size, shape.hidden_size), EMBED))
    shards[-1] += [
        ("model.norm.weight", (shape.hidden_size,), NORM),
        ("lm_head.weight", (shape.vocab_size, shape.hidden_size), HEAD),
    ]
    return shards


def master_tensor(name: str, size: Tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    """The fp32 master of tensor ``name``: drawn from a generator seeded by ``seed`` and the name.

    Linears ``[N, K]`` and the router are N(0, 1/K), so activations keep unit scale through
    the layers; ``lm_head`` is HEAD_GAIN times that; embeddings N(0, 1); norms 1 + N(0, 0.1^2);
    the correction bias N(0, BIAS_STD^2).
    """
    # the CPU generator keeps 32 bits of a seed: hash the seed and the name together
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    x = torch.randn(size, generator=gen)
    if kind in (LINEAR, ROUTER):
        return x / size[-1] ** 0.5
    if kind == HEAD:
        return HEAD_GAIN * x / size[-1] ** 0.5
    if kind == NORM:
        return 1.0 + 0.1 * x
    if kind == BIAS:
        return BIAS_STD * x
    return x


def _stored(name: str, master: torch.Tensor, kind: str, quant: QuantSpec) -> Dict[str, torch.Tensor]:
    """The checkpoint tensors of one master in ``quant``'s format (keyed by full tensor name)."""
    if kind == BIAS:
        return {name: master.float()}
    weight = master.to(torch.bfloat16)
    module = name[: -len(".weight")]
    fmt = quant.format_of(module) if kind in (LINEAR, ROUTER, HEAD) else BF16
    if fmt == FP8_BLOCK:
        q, scale = quantize_fp8_block(weight)
        return {name: q, f"{module}.weight_scale_inv": scale}
    if fmt == FP8_TENSOR:
        q, scale = quantize_fp8_per_tensor(weight)  # scale: 0-d, as ModelOpt writes it
        return {
            name: q,
            f"{module}.weight_scale": scale,
            f"{module}.input_scale": torch.tensor(NOMINAL_ACTIVATION_AMAX / FP8_MAX),
        }
    if fmt == NVFP4:
        if weight.shape[-1] % NVFP4_GROUP:
            raise ValueError(
                f"{name}: NVFP4 needs in_features to be a multiple of {NVFP4_GROUP}, "
                f"got {weight.shape[-1]} (exclude the module or change the size)"
            )
        packed, block_scale, global_scale = quantize_nvfp4(weight)
        return {
            name: packed,
            f"{module}.weight_scale": block_scale,
            f"{module}.weight_scale_2": global_scale,
            f"{module}.input_scale": torch.tensor(NOMINAL_ACTIVATION_AMAX / (6.0 * 448.0)),
        }
    return {name: weight}


def quant_spec_for(flavour: str, shape: ModelShape, extra_exclusions: Sequence[str] = ()) -> QuantSpec:
    """The quantization of checkpoint flavour ``flavour`` (a key of :data:`CHECKPOINT_FORMATS`).

    NVFP4 lists its exclusions the way ModelOpt exports do: each layer's attention, and ``lm_head``;
    ModelOpt FP8 lists ``lm_head`` (the router is never quantized either way).
    """
    method = CHECKPOINT_FORMATS[flavour]
    if method == NVFP4:
        exclude = (*(f"model.layers.{layer}.self_attn*" for layer in range(shape.num_hidden_layers)), "lm_head")
        return QuantSpec(NVFP4, (*exclude, *extra_exclusions))
    if method == FP8_TENSOR:
        return QuantSpec(FP8_TENSOR, ("lm_head", *extra_exclusions))
    return QuantSpec(method, tuple(extra_exclusions) if method == FP8_BLOCK else ())


def _write_metadata(
    out: Path, shape: ModelShape, quant: QuantSpec, weight_map: Dict[str, str], total_size: int
) -> None:
    config = shape.config()
    quantization_config, hf_quant = quant.config_entries()
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if hf_quant is not None:
        (out / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=2) + "\n")
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def make_checkpoints(
    out_dir: Path,
    shape: ModelShape = TINY,
    flavours: Sequence[str] = tuple(CHECKPOINT_FORMATS),
    seed: int = 0,
    extra_exclusions: Sequence[str] = (),
) -> Dict[str, Path]:
    """Write one checkpoint per flavour into ``out_dir/<flavour>`` from the same seeded weights.

    ``extra_exclusions`` are module patterns the quantized flavours leave unquantized
    (besides their defaults). Shards are written one at a time, so memory stays near
    one decoder layer. Returns flavour -> checkpoint directory.
    """
    unknown = [f for f in flavours if f not in CHECKPOINT_FORMATS]
    if unknown or not flavours:
        raise ValueError(f"flavours: expected a non-empty subset of {tuple(CHECKPOINT_FORMATS)}, got {list(flavours)}")
    DeepSeekV3Spec.from_config(shape.config())  # the loader's checks, before anything is written
    out_dir = Path(out_dir)
    specs = {f: quant_spec_for(f, shape, extra_exclusions) for f in flavours}
    dirs = {f: out_dir / f for f in flavours}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    weight_maps: Dict[str, Dict[str, str]] = {f: {} for f in flavours}
    sizes = dict.fromkeys(flavours, 0)
    shards = shard_tensors(shape)
    for index, tensors in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        stored: Dict[str, Dict[str, torch.Tensor]] = {f: {} for f in flavours}
        for name, size, kind in tensors:
            master = master_tensor(name, size, kind, seed)
            for f in flavours:
                stored[f].update(_stored(name, master, kind, specs[f]))
        for f in flavours:
            save_file(stored[f], str(dirs[f] / file_name), metadata={"format": "pt"})
            weight_maps[f].update(dict.fromkeys(stored[f], file_name))
            sizes[f] += sum(t.numel() * t.element_size() for t in stored[f].values())
        logger.info("wrote shard %d/%d", index + 1, len(shards))
    for f in flavours:
        _write_metadata(dirs[f], shape, specs[f], weight_maps[f], sizes[f])
    return dirs
