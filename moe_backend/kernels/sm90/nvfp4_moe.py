"""NVFP4 fused experts on Hopper (SM90), W4A16: the launcher, its configuration space and path choice.

Hopper has no FP4 tensor cores: the weights stay NVFP4 in memory (0.5625 bytes a
weight, the decode bandwidth floor) and are dequantized to bf16 in registers,
straight into wgmma's register operand (the layout of ``NVFP4KernelWeights``
makes each thread's dequantized pairs its MMA fragment); activations stay bf16.
One call runs, all on the GPU with no host sync (CUDA-graph capturable):

1. ``align`` (shared with FP8): group the (token, slot) pairs by local expert in tiles of BLOCK_M rows;
2. ``permute_activations``: hidden states into the weights' per-256-K dot order (at decode sizes
   in the same launch as step 1: ``nvfp4_act.align_and_permute``);
3. ``gemm1``: gate/up GEMM + SiLU-and-mul, bf16 intermediate ``[P, Ip]``; also zeroes
   the fp32 accumulator ``[T, H]``;
4. ``gemm2``: down GEMM + router weight, atomically summed over the top-k into the accumulator;
5. ``cast`` (shared with FP8): accumulator -> ``out[:T]`` bf16.

The weights always sit on the MMA's 64-row side and the tokens on its N side
(``BLOCK_M`` = 16 ... 128); paths, chosen by the expected rows per local expert
``T * k / E``: ``decode`` (BLOCK_M = 16, 64-row weight blocks spread the active
experts over every SM) and ``prefill`` (larger BLOCK_M: each dequantized weight
tile serves more tokens). ``swapab`` (``config`` only, until the H200 times it against
``decode``) is the decode tiling without steps 1 and 2: each expert's leader pair gathers its
pairs (up to ``tiles.MAX_GATHER_PAIRS`` pairs), GEMM1 reads the hidden states in natural order,
and GEMM2 and the cast are programmatic dependent launches.
``bf16_grouped`` (prefill, with QuACK / CuTe DSL on sm_90): the active experts dequantized from
this layout to bf16 into the shared pool (``nvfp4_dequant.dequantize_kernel_layout_segments``),
then the bf16 grouped GEMMs (``bf16_moe.run_segments``; ``TILE1`` / ``TILE2`` from
``bf16_grouped.TILES``). The heuristic default from ``GROUPED_MIN_ROWS`` rows per expert where
:func:`grouped_path_defect` finds nothing against it; asked for by name where it cannot run, a
ValueError says why.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from ..._checks import check_routed_call
from ...expert_weights import NVFP4Weights
from ...runtime import workspace
from ..interpret import pdl_available
from . import bf16_grouped
from .align import AlignedRouting, GatheredPairs
from .bf16_moe import checked_tile, run_segments
from .combine import cast_out
from .config import resolve_path_config
from .cute_env import sm90_cute_defect
from .nvfp4_act import align_and_permute
from .nvfp4_gemm1 import gemm1_nvfp4
from .nvfp4_gemm2 import gemm2_nvfp4
from .nvfp4_layout import NVFP4KernelWeights, nvfp4_to_kernel_layout
from .nvfp4_tile import MMA_ISSUES
from .tiles import MAX_GATHER_PAIRS

#: Every knob (``config=`` may give any subset; the rest come from the heuristic). ``*1`` are
#: GEMM1's, ``*2`` GEMM2's; ``BLOCK_N*`` divide 256 (GEMM1) or are powers of two >= 16. ``UNROLL*``
#: (one of :data:`UNROLL_GROUPS`): 256-K groups a main-loop iteration, so that the pipeline's
#: barriers, waits and address work are paid once for them (fewer instructions a group).
#: ``MAXNREG*``: register cap a thread, 0 for the compiler's choice (the gathered path then caps at
#: ``tiles.GATHER_MAXNREG``), else 24 to 255. ``WGMMA*`` (one of ``nvfp4_tile.MMA_ISSUES``): how
#: each 256-K group's 16 warpgroup MMAs are issued.
CONFIG_KEYS = (
    "path",
    "BLOCK_M",
    "BLOCK_N1",
    "GROUP_M1",
    "num_warps1",
    "num_stages1",
    "BLOCK_N2",
    "SPLIT_K2",
    "GROUP_M2",
    "num_warps2",
    "num_stages2",
    "PDL",
    "UNROLL1",
    "UNROLL2",
    "MAXNREG1",
    "MAXNREG2",
    "WGMMA1",
    "WGMMA2",
    "TILE1",
    "TILE2",
)
#: Values ``UNROLL1`` / ``UNROLL2`` may take.
UNROLL_GROUPS = (1, 2, 4)
#: The keys ``path='bf16_grouped'`` reads; the other paths do not read ``TILE1`` / ``TILE2``.
GROUPED_KEYS = ("path", "TILE1", "TILE2")

#: The main-loop knobs as every base configuration starts them: Triton's own MMA issue, one
#: group an iteration, no register cap, plain launches.
_LOOP_DEFAULTS: Dict[str, Any] = dict(
    PDL=False,
    UNROLL1=1,
    UNROLL2=1,
    MAXNREG1=0,
    MAXNREG2=0,
    WGMMA1="pieces",
    WGMMA2="pieces",
)

# Defaults: the best of an H100 sweep (docs/performance.md), DeepSeek-V3 shapes. Each group's 16
# MMAs as one synchronous warpgroup MMA (``WGMMA* = "sync"``): faster than Triton's pieces at every
# decode point of three H100 runs (2026-12-05 and -06: 0.2-2.0%; the 2026-12-06 bench, code 2fc46a0,
# T=1 100.1 against 101.7 us at E=256, 98.4 against 100.4 at E=32).
DECODE_CONFIG: Dict[str, Any] = dict(
    path="decode",
    BLOCK_M=16,
    BLOCK_N1=32,
    GROUP_M1=1,
    num_warps1=4,
    num_stages1=3,
    BLOCK_N2=64,
    SPLIT_K2=1,
    GROUP_M2=1,
    num_warps2=4,
    num_stages2=3,
    **dict(_LOOP_DEFAULTS, WGMMA1="sync", WGMMA2="sync"),
)
#: The decode tiling with GEMM2 and the cast as programmatic dependent launches (each starts while
#: the launch before it finishes, and waits for it before reading its output): the default up to
#: ``DECODE_PDL_MAX_PAIRS`` pairs, a tuner candidate. H200, 2026-12-04, one bench run against
#: ``DECODE_CONFIG``: T=1 87.5 against 89.1 us (E=256) and 85.9 against 87.3 (E=32), level from T=2
#: to 8 (-1.1 to +0.2%), E=256 T=16 1033.1 against 990.4. H100, 2026-12-06, two runs (with the
#: synchronous MMAs): faster at every point, T=1 97.7 / 98.0 against 100.3 us (E=256) and 96.5
#: against 98.6-98.7 (E=32), T=2 1.3%, T=4 0.6%, T=8 0.2-0.6%, T=16 0.2-0.5% (E=256 too).
DECODE_PDL_CONFIG: Dict[str, Any] = dict(DECODE_CONFIG, PDL=True)
#: Up to this many pairs (T = 8 at top-8) the decode default is ``DECODE_PDL_CONFIG``: above, at
#: E=256 T=16 (128 active experts, GEMM1 in 16 waves) it was 4.3% slower on the H200.
DECODE_PDL_MAX_PAIRS = 64
#: Decode variants (``moe-backend bench --variants nvfp4_decode_<name>``), not tuner candidates (the
#: bench's ``nvfp4_decode_pdl`` and ``nvfp4_decode_no_pdl`` time the two candidate tilings, each the
#: default on one side of ``DECODE_PDL_MAX_PAIRS``). The ninth session read the decode GEMMs as
#: bound by instruction issue, yet fewer instructions did not make them faster. Two 256-K groups a
#: main-loop iteration on two stages (``UNROLL1`` / ``UNROLL2`` = 2, the same shared memory as three
#: stages of one group) took GEMM1 from 422 to 348 warp instructions a group (sm_90a; 25.2M to 20.9M
#: executed at T=1, ncu) and measured 10-13% slower from T=1 to 8 and 4% at E=256 T=16 (H200,
#: 2026-12-05: T=1 E=256 100.8 against 90.0 us): the warps waited on the iteration's CTA barrier
#: (1.66 cycles an issued instruction against 0.11) and on memory (1.67 against 0.45), 7.5 cycles an
#: issued instruction against 5.2. Capped at 168 registers (three programs an SM) or uncapped (two)
#: they were 20-30% slower. The 8-token, 32-row tiles on two warps that Triton runs on ``mma.sync``
#: (290-334 instructions a group) measured 1.6-1.9x slower (T=1 E=256 146.5-152.6 against 90.2 us;
#: the threads wait on their own shared-memory loads) and live on branch ``nvfp4-mma-sync``.
#: ``wgmma_pieces`` / ``wgmma_overlap``: Triton's own issue of a group's 16 MMAs (six instructions
#: an MMA) and the whole group's MMAs left in flight under the next group's dequantization, against
#: the default's one synchronous warpgroup MMA a group (``nvfp4_tile.mma``; sm_90a, GEMM1 422 / 354
#: instructions a group against 348, GEMM2 425 / 354 against 347, four programs an SM all three).
#: H100, 2026-12-05, code c58090c, E=256: ``sync`` level with ``pieces`` (T=1 107.0 against 107.7
#: us, T=2 179.9 against 180.8, T=8 608.4 against 611.0), 0.2-2.0% faster on 2026-12-06; ncu at T=1:
#: the same GEMM1 duration, 7.0 cycles an issued instruction against 5.85 (the waits grew by what
#: the instructions shrank). Cutting each group into two or four dots so that five to eight programs
#: fit an SM (56-95 registers), with or without GEMM1's K split over two programs, measured 3-41%
#: slower there (T=1 114.5-143.2 us) and lives on branch ``nvfp4-dots-split``. ``st4`` / ``st4_g1``:
#: four pipeline stages in both GEMMs / in GEMM1 (60 KB of shared memory: three programs an SM, the
#: weights buffered three deep). H100, 2026-12-06, code f54bcf2: T=1 E=256 113.4 / 111.5 against
#: 98.1 us (GEMM1 75.4 against 61.8), level at T=16; kept to ask the H200 whether it is short of
#: bytes in flight.
_PIECES = dict(DECODE_CONFIG, WGMMA1="pieces", WGMMA2="pieces")
_OVERLAP = dict(DECODE_CONFIG, WGMMA1="overlap", WGMMA2="overlap")
DECODE_VARIANTS: Dict[str, Dict[str, Any]] = {
    "wgmma_pieces": _PIECES,
    "wgmma_overlap": _OVERLAP,
    "st4": dict(DECODE_CONFIG, num_stages1=4, num_stages2=4),
    "st4_g1": dict(DECODE_CONFIG, num_stages1=4),
}
#: ``swapab``: the decode tiling without the ``align`` and ``permute`` launches (each expert's
#: leader pair gathers its pairs, GEMM1 reads the hidden states in natural order) and
#: with GEMM2 and the cast as programmatic dependent launches. ``BLOCK_M``: pairs per MMA.
SWAPAB_CONFIG: Dict[str, Any] = dict(DECODE_CONFIG, path="swapab", PDL=True)
# GEMM1's weight tile stacks BLOCK_N gate rows on BLOCK_N up rows (2 BLOCK_N rows). With
# BLOCK_M = 64 tokens, 128 rows a warpgroup (BLOCK_N1 = 128 on 8 warps) still fit in
# registers (254); 128 tokens would not (ptxas serializes the wgmmas, C7512). Weights
# through shared memory (wgmma operand B, 128 tokens a tile) never won an H100 tuning run.
PREFILL_CONFIG: Dict[str, Any] = dict(
    path="prefill",
    BLOCK_M=64,
    BLOCK_N1=128,
    GROUP_M1=8,
    num_warps1=8,
    num_stages1=3,
    BLOCK_N2=128,
    SPLIT_K2=1,
    GROUP_M2=8,
    num_warps2=8,
    num_stages2=3,
    **_LOOP_DEFAULTS,
)


#: Prefill with narrow weight blocks on 4 warps, 32 tokens a tile.
PREFILL_32_CONFIG: Dict[str, Any] = dict(
    PREFILL_CONFIG, BLOCK_M=32, BLOCK_N1=32, BLOCK_N2=64, num_warps1=4, num_warps2=4
)

#: The bf16 grouped GEMMs on the active experts dequantized to bf16 (tiles as lists: JSON).
GROUPED_CONFIG: Dict[str, Any] = dict(
    path="bf16_grouped", TILE1=list(bf16_grouped.DEFAULT_TILE), TILE2=list(bf16_grouped.DEFAULT_TILE)
)
#: From this many expected rows per local expert the heuristic default takes ``bf16_grouped``
#: where it can run. H200, 2026-12-02, one bench run, E=32: 3434 against 3903 us at 512 rows
#: (T=2048), 5676 against 7691 at 1024, 10.0-10.5 against 15.3 ms at 2048; 2417 against 2012 at
#: 256 (T=1024). At E=256 it never won (every expert dequantized: 18-19 ms).
GROUPED_MIN_ROWS = 512

#: Each path's base configuration (``config={"path": ...}`` starts from it).
PATH_CONFIGS: Dict[str, Dict[str, Any]] = {
    "decode": DECODE_CONFIG,
    "prefill": PREFILL_CONFIG,
    "swapab": SWAPAB_CONFIG,
    "bf16_grouped": GROUPED_CONFIG,
}

#: The heuristic default: (most expected rows per local expert, configuration), first match.
#: At 64 rows the 64-token tiles won (H200, E=256 T=2048: 4263 against 6160 us for 32-token
#: tiles), at 32 the 32-token ones (E=256 T=1024: 3292 against 3884).
DEFAULT_TIERS = ((16, DECODE_CONFIG), (32, PREFILL_32_CONFIG), (float("inf"), PREFILL_CONFIG))

#: Version of this kernel's tuned configurations: the tuning cache keeps a configuration only
#: for the version it was tuned for. Bump it when the kernels, their weight layout
#: (``NVFP4KernelWeights``) or the configuration schema (CONFIG_KEYS, their meaning) change.
#: 12: the decode default's ``WGMMA*`` became ``"sync"``; ``PREFETCH*`` removed. 13: the decode
#: tiling with PDL joined the candidates.
KERNEL_VERSION = 13

#: What the tuner times per token bucket (each overrides the heuristic default of that size):
#: the decode path, prefill tilings from skinny to square, and the bf16 grouped GEMMs (the
#: QuACK tiles measured fastest at T=8192: 128x192 pingpong, 128x256 cooperative).
CANDIDATE_CONFIGS = (
    DECODE_CONFIG,
    DECODE_PDL_CONFIG,
    dict(DECODE_CONFIG, BLOCK_N1=64, num_warps1=8, BLOCK_N2=128),
    dict(DECODE_CONFIG, num_stages1=2, num_stages2=2),
    PREFILL_32_CONFIG,
    dict(PREFILL_32_CONFIG, BLOCK_M=64),
    PREFILL_CONFIG,
    GROUPED_CONFIG,
    dict(GROUPED_CONFIG, TILE1=list(bf16_grouped.TILES[1]), TILE2=list(bf16_grouped.TILES[1])),
)


def default_config(num_tokens: int, top_k: int, num_experts: int, grouped: bool = False) -> Dict[str, Any]:
    """Heuristic configuration from the expected rows per local expert (balanced routing);
    from ``GROUPED_MIN_ROWS`` the ``bf16_grouped`` path when ``grouped`` (it can serve the layer);
    the decode tier with PDL up to ``DECODE_PDL_MAX_PAIRS`` pairs."""
    rows_per_expert = num_tokens * top_k / num_experts
    if grouped and rows_per_expert >= GROUPED_MIN_ROWS:
        return dict(GROUPED_CONFIG)
    cfg = next(cfg for limit, cfg in DEFAULT_TIERS if rows_per_expert <= limit)
    if cfg is DECODE_CONFIG and num_tokens * top_k <= DECODE_PDL_MAX_PAIRS:
        cfg = DECODE_PDL_CONFIG
    return dict(cfg)


def resolve_config(
    config: Optional[dict], num_tokens: int, top_k: int, num_experts: int, grouped: bool = False
) -> Dict[str, Any]:
    """``config``'s keys over a base: the base configuration of the path ``config`` names, else
    the heuristic default for this size (``grouped``: as :func:`default_config`)."""
    return resolve_path_config(
        config,
        lambda: default_config(num_tokens, top_k, num_experts, grouped),
        PATH_CONFIGS,
        CONFIG_KEYS,
        ("bf16_grouped", GROUPED_KEYS, ("TILE1", "TILE2")),
    )


#: The most the ``bf16_grouped`` path may claim of the shared workspace pool for its bf16 copies
#: of the active experts. The pool keeps its size for every later layer and call: at E=256 all
#: experts' copies would take 21 GiB (DeepSeek-V3), which an engine has already given to its KV
#: cache, and the path loses there anyway (18-19 ms against 4-16 ms for the Triton kernels).
GROUPED_MAX_POOL_BYTES = 4 << 30


def grouped_path_defect(device: torch.device, apply_router_weight_on_input: bool) -> Optional[str]:
    """Why the ``bf16_grouped`` path cannot serve a layer on ``device``, or None."""
    if apply_router_weight_on_input:
        return "its router weight scales the expert output only"
    return sm90_cute_defect(device)


def grouped_pool_defect(w: NVFP4KernelWeights, num_pairs: int) -> Optional[str]:
    """Why the ``bf16_grouped`` path's bf16 copies of up to ``min(E, T * k)`` active experts
    would take too much of the workspace pool (:data:`GROUPED_MAX_POOL_BYTES`), or None."""
    need = min(w.num_experts, num_pairs) * 3 * w.hidden_size * w.intermediate_size * 2
    if need > GROUPED_MAX_POOL_BYTES:
        return (
            f"its bf16 copies of {min(w.num_experts, num_pairs)} experts would take {need / 2**30:.1f} GiB of the "
            f"workspace pool (at most {GROUPED_MAX_POOL_BYTES / 2**30:.0f} GiB)"
        )
    return None


def _grouped_tiles(cfg: Dict[str, Any]) -> Tuple[Tuple[int, int, int, bool], ...]:
    """GEMM1's and GEMM2's tile of a ``bf16_grouped`` configuration, each one of ``bf16_grouped.TILES``."""
    return checked_tile("TILE1", cfg["TILE1"]), checked_tile("TILE2", cfg["TILE2"])


def precompile(w: NVFP4KernelWeights, configs: Sequence[dict]) -> int:
    """Compile the bf16 grouped GEMMs the ``configs`` can run: those of each ``bf16_grouped``
    configuration, and the default tiles for an empty one (the heuristic takes that path at
    prefill sizes) where :func:`grouped_path_defect` finds nothing against it. The Triton kernels
    compile on first use. Returns the number built or loaded now."""
    tiles: set = set()
    for config in configs:
        if not config:
            # the default takes the path only where its copies fit the pool at its largest
            if grouped_path_defect(w.device, False) is None and grouped_pool_defect(w, w.num_experts) is None:
                tiles.update(_grouped_tiles(GROUPED_CONFIG))
        elif config.get("path") == "bf16_grouped":
            tiles.update(_grouped_tiles(resolve_config(config, 1, 1, 1)))
    if not tiles:
        return 0
    return bf16_grouped.compile_plans(w.hidden_size, w.intermediate_size, tuple(sorted(tiles)), w.device)


def _run_grouped(
    hidden: torch.Tensor,
    w: NVFP4KernelWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local_expert_offset: int,
    result: torch.Tensor,
    cfg: Dict[str, Any],
) -> torch.Tensor:
    """The ``bf16_grouped`` path: active experts dequantized into the shared pool, bf16 grouped GEMMs."""
    tile1, tile2 = _grouped_tiles(cfg)
    return run_segments(hidden, w, topk_ids, topk_weights, local_expert_offset, result, tile1, tile2)


def _check_loop_knobs(cfg: Dict[str, Any]) -> None:
    """ValueError naming ``UNROLL1`` / ``UNROLL2`` outside :data:`UNROLL_GROUPS`, ``MAXNREG1`` /
    ``MAXNREG2`` neither 0 nor an int from 24 to 255, ``WGMMA1`` / ``WGMMA2`` not one of
    ``nvfp4_tile.MMA_ISSUES``."""
    for key in ("UNROLL1", "UNROLL2"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value not in UNROLL_GROUPS:
            raise ValueError(f"config: {key} must be one of {UNROLL_GROUPS}, got {value!r}")
    for key in ("MAXNREG1", "MAXNREG2"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or 24 <= value <= 255):
            raise ValueError(f"config: {key} must be 0 (the compiler's choice) or an int from 24 to 255, got {value!r}")
    for key in ("WGMMA1", "WGMMA2"):
        if not isinstance(cfg[key], str) or cfg[key] not in MMA_ISSUES:
            raise ValueError(f"config: {key} must be one of {MMA_ISSUES}, got {cfg[key]!r}")


def gemm_launch_args(cfg: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The keyword arguments a resolved Triton-path configuration gives ``gemm1_nvfp4`` and
    ``gemm2_nvfp4`` (tiles, pipeline and main-loop knobs; not the call's pairs, top-k, router-weight
    placement or PDL)."""

    def knobs(n: int) -> Dict[str, Any]:
        """GEMM ``n``'s keys (``BLOCK_N{n}``, ...), as the launchers' keyword arguments."""
        return dict(
            BLOCK_N=cfg[f"BLOCK_N{n}"],
            GROUP_M=cfg[f"GROUP_M{n}"],
            num_warps=cfg[f"num_warps{n}"],
            num_stages=cfg[f"num_stages{n}"],
            unroll=cfg[f"UNROLL{n}"],
            maxnreg=cfg[f"MAXNREG{n}"],
            mma_issue=cfg[f"WGMMA{n}"],
        )

    return knobs(1), dict(knobs(2), SPLIT_K=cfg["SPLIT_K2"])


def prepare_nvfp4(weights: NVFP4Weights) -> NVFP4KernelWeights:
    """Put canonical NVFP4 experts in this kernel's layout (see :class:`NVFP4KernelWeights`)."""
    return nvfp4_to_kernel_layout(weights)


def _check_inputs(
    hidden: torch.Tensor,
    w: NVFP4KernelWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local_expert_offset: int,
    out: torch.Tensor,
) -> None:
    if not isinstance(w, NVFP4KernelWeights):
        raise TypeError(f"prepared_weights: expected NVFP4KernelWeights (from prepare_nvfp4), got {type(w).__name__}")
    check_routed_call(
        hidden, topk_ids, topk_weights, local_expert_offset, out, hidden_size=w.hidden_size, device=w.device
    )


def fused_experts_nvfp4(
    hidden: torch.Tensor,
    prepared_weights: NVFP4KernelWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    local_expert_offset: int,
    apply_router_weight_on_input: bool,
    out: torch.Tensor,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * expert(ids[t, j])(hidden[t])`` over the local experts, W4A16.

    Args:
        hidden: ``[T, H]`` bf16, contiguous; T may be 0.
        prepared_weights: the local experts from :func:`prepare_nvfp4`.
        topk_ids: ``[T, k]`` int32 global expert ids, contiguous; -1 or ids outside
            ``[local_expert_offset, local_expert_offset + E)`` contribute nothing.
        topk_weights: ``[T, k]`` fp32 router weights, contiguous.
        local_expert_offset: global id of local expert 0.
        apply_router_weight_on_input: scale the GEMM1 input by the router weight
            (exactly: GEMM1 scales its fp32 sums) instead of the output.
        out: ``[R >= T, H]`` bf16 contiguous; rows ``[:T]`` are all written (0 for a
            token without a local expert), rows ``>= T`` untouched.
        config: tuning knobs (keys :data:`CONFIG_KEYS`); None: :func:`default_config`.

    Returns:
        ``out[:T]``. The intermediate ``silu(gate) * up`` is rounded to bf16, as
        ``reference_fused_experts(..., quantize_activations=True)`` does.
    """
    _check_inputs(hidden, prepared_weights, topk_ids, topk_weights, local_expert_offset, out)
    w = prepared_weights
    num_tokens, top_k = topk_ids.shape
    result = out[:num_tokens]
    if num_tokens == 0:
        return result
    if top_k == 0:
        return result.zero_()
    # The grouped path is asked for by name, or is the heuristic's choice for a call without
    # overrides (overrides of Triton knobs mean the Triton kernels); only then is it checked.
    named = (config or {}).get("path") == "bf16_grouped"
    defect = None
    if named or (not config and num_tokens * top_k >= GROUPED_MIN_ROWS * w.num_experts):
        defect = grouped_path_defect(hidden.device, apply_router_weight_on_input) or grouped_pool_defect(
            w, num_tokens * top_k
        )
    cfg = resolve_config(config, num_tokens, top_k, w.num_experts, grouped=not config and defect is None)
    if cfg["path"] == "bf16_grouped":
        if defect is not None:
            raise ValueError(f"config: path='bf16_grouped' cannot serve this layer: {defect}")
        return _run_grouped(hidden, w, topk_ids, topk_weights, local_expert_offset, result, cfg)
    num_pairs = num_tokens * top_k
    _check_loop_knobs(cfg)
    routing: Union[AlignedRouting, GatheredPairs]
    if cfg["path"] == "swapab":
        if num_pairs > MAX_GATHER_PAIRS:
            raise ValueError(
                f"config: path='swapab' serves at most {MAX_GATHER_PAIRS} (token, slot) pairs, got T * k = {num_pairs}"
            )
        routing = GatheredPairs(topk_ids.reshape(-1), local_expert_offset, w.num_experts, cfg["BLOCK_M"])
        x = hidden
    else:
        routing, x = align_and_permute(
            topk_ids, w.num_experts, local_expert_offset, cfg["BLOCK_M"], hidden, w.padded_hidden
        )
    pdl = bool(cfg["PDL"]) and pdl_available(hidden)
    acc = workspace(num_tokens, w.hidden_size, torch.float32, hidden.device, "moe_combine")
    common: Dict[str, Any] = dict(
        num_pairs=num_pairs,
        top_k=top_k,
        weight_on_input=apply_router_weight_on_input,
        pdl=pdl,
    )
    g1, g2 = gemm_launch_args(cfg)
    y = gemm1_nvfp4(
        x,
        w.w13,
        w.w13_scale,
        w.w13_scale_2,
        routing,
        topk_weights,
        acc,
        **g1,
        **common,
    )
    gemm2_nvfp4(
        y,
        w.w2,
        w.w2_scale,
        w.w2_scale_2,
        routing,
        topk_weights,
        acc,
        **g2,
        **common,
    )
    cast_out(acc, result, pdl=pdl)
    return result
