"""FP8 fused experts on Hopper (SM90): the launcher, its configuration space and path choice.

One call runs, all on the GPU with no host sync (CUDA-graph capturable):

1. ``align``: group the (token, slot) pairs by local expert into tiles of BLOCK_M rows;
2. prefill path only: ``act_quant`` of the hidden states (e4m3, per token per 128);
3. ``gemm1``: gate/up GEMM + SiLU-and-mul (+ FP8 requant in the prefill path);
   it also zeroes the fp32 accumulator ``[T, H]``;
4. ``gemm2``: down GEMM + router weight, combined over the top-k either
   (``COMBINE="atomic"``) by atomic adds into the accumulator, then
5. ``cast``: accumulator -> ``out[:T]`` bf16; or (``COMBINE="sum"``) stored as one
   bf16 row per pair, then ``sum_pairs`` adds each token's k rows in a fixed order.

Paths, chosen by the expected rows per local expert ``T * k / E`` (:func:`default_config`):

* ``decode`` (few rows per expert: the layer is a weight stream): the GEMMs quantize
  their input tile as they load it (``QUANT_ON_LOAD1``: no ``act_quant`` launch;
  always in GEMM2, which reads GEMM1's fp32 intermediate),
  BLOCK_M = 16, narrow column blocks and split-K in GEMM2 so the few active
  experts' weights are spread over every SM and read once;
* ``prefill``: pre-quantized input, e4m3 intermediate written by GEMM1's
  epilogue (BLOCK_N = 128: one column block is one scale group), large tiles.

Numerics (``NUMERICS``): ``accurate`` keeps GEMM1's output in fp32 up to the FP8
requantization and sums the top-k in fp32. ``vllm_triton`` (FP8 block scales with
dynamic activation scales, prefill path with the ``sum`` combine) reproduces vLLM's
Triton fused-MoE (``TritonExperts``) bit for bit instead: its activation quantization,
its FP8 MMA (wgmma: BLOCK_M = 64) and K-block scaling order, bf16 rounding of GEMM1's
output before SiLU-and-mul, and bf16 rows per pair summed in fp32 (``moe_sum``), so a
model served with either backend decodes the same tokens. vLLM applies the block scales
weight-first when its tile has fewer than 64 rows (``SWAP_AB``); its default FP8-block
configurations do so up to 64 tokens, and so does this mode.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .act_quant import act_quant_fp8
from ...runtime import workspace
from .align import align_block_size
from .config import merge_config
from .combine import cast_out, sum_pairs
from .fp8_gemm1 import gemm1_fp8
from .fp8_gemm2 import gemm2_fp8

#: Every knob of a configuration (``config=`` may give any subset; the rest come from the heuristic).
#: ``*1`` are GEMM1's, ``*2`` GEMM2's; ``BLOCK_K`` must be 128 with dynamic scales or block weights.
CONFIG_KEYS = ("path", "NUMERICS", "COMBINE", "ZERO", "QUANT_ON_LOAD1", "BLOCK_M", "BLOCK_N1", "BLOCK_K1", "GROUP_M1", "num_warps1", "num_stages1",
               "BLOCK_N2", "BLOCK_K2", "SPLIT_K2", "GROUP_M2", "num_warps2", "num_stages2")

DECODE_CONFIG: Dict[str, Any] = dict(
    path="decode", NUMERICS="accurate", COMBINE="atomic", ZERO="fused", QUANT_ON_LOAD1=True, BLOCK_M=16,
    BLOCK_N1=64, BLOCK_K1=128, GROUP_M1=1, num_warps1=4, num_stages1=4,
    BLOCK_N2=64, BLOCK_K2=128, SPLIT_K2=2, GROUP_M2=1, num_warps2=4, num_stages2=4,
)
PREFILL_CONFIG: Dict[str, Any] = dict(
    path="prefill", NUMERICS="accurate", COMBINE="sum", ZERO="fused", QUANT_ON_LOAD1=False, BLOCK_M=128,
    BLOCK_N1=128, BLOCK_K1=128, GROUP_M1=8, num_warps1=8, num_stages1=3,
    BLOCK_N2=128, BLOCK_K2=128, SPLIT_K2=1, GROUP_M2=8, num_warps2=8, num_stages2=3,
)


#: Version of this kernel's tuned configurations: the tuning cache keeps a configuration only
#: for the version it was tuned for. Bump it when the kernels, their weight or activation
#: layout, or the configuration schema (CONFIG_KEYS, their meaning) change.
KERNEL_VERSION = 1

#: What the tuner times per token bucket (each overrides the heuristic default of that size):
#: the decode path, skinny atomic-combine tiles, and prefill tiles up to 128 rows.
_SKINNY = dict(PREFILL_CONFIG, COMBINE="atomic", BLOCK_M=16, BLOCK_N2=64, num_warps1=4, num_warps2=4,
               num_stages1=5, num_stages2=5)
CANDIDATE_CONFIGS = (
    DECODE_CONFIG,
    dict(DECODE_CONFIG, SPLIT_K2=1),
    _SKINNY,
    dict(_SKINNY, BLOCK_M=32, num_stages1=4, num_stages2=4),
    dict(PREFILL_CONFIG, BLOCK_M=32, num_warps1=4, num_warps2=4, num_stages1=4, num_stages2=4),
    dict(PREFILL_CONFIG, BLOCK_M=64, num_warps1=4, num_warps2=4, num_stages1=4, num_stages2=4),
    PREFILL_CONFIG,
    dict(PREFILL_CONFIG, COMBINE="atomic"),
)

#: Deterministic mode: no atomics (each pair writes its own row, summed in slot order) and one
#: tiling for every T, so a token's bits do not depend on the batch it is computed in.
DETERMINISTIC_CONFIG: Dict[str, Any] = dict(PREFILL_CONFIG, BLOCK_M=16, num_warps1=4, num_warps2=4)

#: Fixed configurations of the numerics other than ``accurate`` (deterministic too).
NUMERICS_CONFIGS: Dict[str, Dict[str, Any]] = {
    "vllm_triton": dict(PREFILL_CONFIG, NUMERICS="vllm_triton", BLOCK_M=64, num_warps1=4, num_warps2=4),
}
#: vLLM's default FP8-block configurations use BLOCK_M = 16 (swapped operands, weight scale
#: applied first) up to this many tokens, BLOCK_M = 64 above.
VLLM_SWAP_AB_MAX_TOKENS = 64


def _check_vllm_numerics(cfg: Dict[str, Any], block_scaled: bool, dynamic: bool, ue8m0: bool,
                         weight_on_input: bool) -> None:
    """Raise ValueError when ``vllm_triton`` numerics cannot hold for this layer or configuration."""
    if not (block_scaled and dynamic and not ue8m0 and not weight_on_input):
        raise ValueError("config: NUMERICS='vllm_triton' needs FP8 block-scale weights with dynamic "
                         "activation scales, no ue8m0 and the router weight on the output")
    got = (cfg["path"], cfg["COMBINE"], cfg["BLOCK_N1"], cfg["QUANT_ON_LOAD1"], cfg["BLOCK_M"])
    if got[:4] != ("prefill", "sum", 128, False) or got[4] < 64:
        raise ValueError("config: NUMERICS='vllm_triton' needs path='prefill', COMBINE='sum', BLOCK_N1=128, "
                         f"QUANT_ON_LOAD1=False and BLOCK_M >= 64 (vLLM's wgmma), got {got}")


def default_config(num_tokens: int, top_k: int, num_experts: int) -> Dict[str, Any]:
    """Heuristic configuration from the expected rows per local expert (balanced routing).

    Tuned on an H100 with H=7168, I=2048 (``scripts/gpu_check_fp8.py --sweep``): up to
    one row per expert the decode path; up to 16 the prefill kernels with BLOCK_M=16
    and atomic combine (still a weight stream); above, larger tiles and the
    ``sum`` combine, which beats atomics once the workspace is large.
    """
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 1:
        return dict(DECODE_CONFIG)
    cfg = dict(PREFILL_CONFIG)
    if rows_per_expert <= 16:
        cfg.update(COMBINE="atomic", BLOCK_M=16, BLOCK_N2=64, num_warps1=4, num_warps2=4,
                   num_stages1=5, num_stages2=5)
    elif rows_per_expert <= 32:
        cfg.update(BLOCK_M=32, num_warps1=4, num_warps2=4, num_stages1=4, num_stages2=4)
    elif rows_per_expert <= 96:
        cfg.update(BLOCK_M=64, num_warps1=4, num_warps2=4, num_stages1=4, num_stages2=4)
    return cfg


def resolve_config(config: Optional[dict], num_tokens: int, top_k: int, num_experts: int) -> Dict[str, Any]:
    """The heuristic default for this size, overridden by the keys of ``config``."""
    return merge_config(default_config(num_tokens, top_k, num_experts), config, CONFIG_KEYS)


def _start_zeroing(acc: torch.Tensor, mode: str) -> Optional[torch.cuda.Event]:
    """Zero the atomic combine's ``acc [T, H]`` fp32 (only the active rows exist in the view).

    ``fused``: GEMM1's programs zero it as they run (no launch; nothing to do here);
    ``sync``: a memset on the current stream before GEMM1;
    ``stream``: a memset on an auxiliary stream overlapped with the quantization and GEMM1,
    joined by the returned event before GEMM2 (``sync`` where CUDA streams are unavailable).
    """
    if mode == "fused":
        return None
    if mode == "stream" and acc.is_cuda:
        main = torch.cuda.current_stream(acc.device)
        aux = _aux_stream(acc.device)
        aux.wait_stream(main)  # acc's previous readers (the last layer's cast) come first
        with torch.cuda.stream(aux):
            acc.zero_()
            done = torch.cuda.Event()
            done.record(aux)
        return done
    if mode not in ("sync", "stream"):
        raise ValueError(f"config: ZERO must be 'fused', 'sync' or 'stream', got {mode!r}")
    acc.zero_()
    return None


_AUX_STREAMS: Dict[torch.device, torch.cuda.Stream] = {}


def _aux_stream(device: torch.device) -> torch.cuda.Stream:
    """One auxiliary stream per device, created once (stream creation is not capturable)."""
    key = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if key not in _AUX_STREAMS:
        _AUX_STREAMS[key] = torch.cuda.Stream(key)
    return _AUX_STREAMS[key]


def fused_experts_fp8(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    block_scaled: bool,
    local_expert_offset: int,
    a13_scale: Optional[torch.Tensor],
    a2_scale: Optional[torch.Tensor],
    ue8m0: bool,
    apply_router_weight_on_input: bool,
    out: torch.Tensor,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * expert(ids[t, j])(hidden[t])`` over the local experts, in FP8.

    Args:
        hidden: ``[T, H]`` bf16, contiguous; T may be 0.
        w13: ``[E, 2I, H]`` float8_e4m3fn, rows ``[gate; up]``.
        w13_scale: block: ``[E, 2I/128, H/128]`` fp32 (dequant ``w * scale``); per-tensor: ``[E]``.
        w2: ``[E, H, I]`` float8_e4m3fn.
        w2_scale: block: ``[E, H/128, I/128]`` fp32; per-tensor: ``[E]``.
        topk_ids: ``[T, k]`` int32 global expert ids; -1 or ids outside
            ``[local_expert_offset, local_expert_offset + E)`` contribute nothing.
        topk_weights: ``[T, k]`` fp32 router weights.
        block_scaled: 128x128 block weight scales (else one scale per expert matrix).
        local_expert_offset: global id of local expert 0.
        a13_scale / a2_scale: ``[1]`` fp32 static scale of the GEMM1 / GEMM2 input, or
            None for dynamic per token per 128 channels.
        ue8m0: round dynamic activation scales up to a power of two.
        apply_router_weight_on_input: scale the GEMM1 input by the router weight
            (each (token, expert) pair quantized separately) instead of the output.
        out: ``[R >= T, H]`` bf16 contiguous; rows ``[:T]`` are all written (0 for a
            token without a local expert), rows ``>= T`` untouched.
        config: tuning knobs (keys :data:`CONFIG_KEYS`); None: :func:`default_config`.

    Returns:
        ``out[:T]``.
    """
    num_tokens, hidden_size = hidden.shape
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    result = out[:num_tokens]
    if num_tokens == 0:
        return result
    cfg = resolve_config(config, num_tokens, top_k, num_experts)
    if cfg["NUMERICS"] not in ("accurate", *NUMERICS_CONFIGS):
        raise ValueError(f"config: NUMERICS must be one of {('accurate', *NUMERICS_CONFIGS)}, got {cfg['NUMERICS']!r}")
    vllm = cfg["NUMERICS"] == "vllm_triton"
    if vllm:
        _check_vllm_numerics(cfg, block_scaled, a13_scale is None and a2_scale is None, ue8m0,
                             apply_router_weight_on_input)
    decode = cfg["path"] == "decode"
    num_pairs = num_tokens * top_k
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()

    routing = align_block_size(topk_ids, num_experts, local_expert_offset, cfg["BLOCK_M"])
    # Router weight on the input: each (token, expert) pair is quantized on its own.
    quant_on_load = cfg["QUANT_ON_LOAD1"] or apply_router_weight_on_input
    if quant_on_load:
        a, a_scale = hidden, None
    else:
        a, a_scale = act_quant_fp8(hidden, a13_scale, ue8m0, vllm=vllm)
    atomic = cfg["COMBINE"] == "atomic"
    if atomic:
        acc = workspace(num_tokens, hidden_size, torch.float32, hidden.device, "moe_combine")
        joined = _start_zeroing(acc, cfg["ZERO"])
    else:
        acc = workspace(routing.max_tiles * routing.block_m, hidden_size, torch.bfloat16, hidden.device,
                        "moe_pair_rows")
    # vLLM's scaling order: 0 not vLLM's numerics, 1 activation scale first, 2 weight scale first.
    vllm_order = 0 if not vllm else 2 if num_tokens <= VLLM_SWAP_AB_MAX_TOKENS else 1
    common = dict(num_pairs=num_pairs, top_k=top_k, block_scaled=block_scaled, ue8m0=ue8m0,
                  weight_on_input=apply_router_weight_on_input, vllm_order=vllm_order)
    y, y_scale = gemm1_fp8(
        a, a_scale, w13, w13_scale, routing, topk_weights, acc if atomic and cfg["ZERO"] == "fused" else acc[:0],
        quant_on_load=quant_on_load, a13_static=a13_scale, quant_out=not decode, a2_static=a2_scale,
        BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K1"], GROUP_M=cfg["GROUP_M1"],
        num_warps=cfg["num_warps1"], num_stages=cfg["num_stages1"], **common)
    if atomic and joined is not None:
        torch.cuda.current_stream().wait_event(joined)
    gemm2_fp8(
        y, y_scale, w2, w2_scale, routing, topk_weights, acc,
        quant_on_load=decode, a2_static=a2_scale, atomic=atomic,
        BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K2"], SPLIT_K=cfg["SPLIT_K2"],
        GROUP_M=cfg["GROUP_M2"], num_warps=cfg["num_warps2"], num_stages=cfg["num_stages2"], **common)
    if atomic:
        cast_out(acc, result)
    else:
        sum_pairs(acc, routing.row_of_pair, top_k, result)
    return result
