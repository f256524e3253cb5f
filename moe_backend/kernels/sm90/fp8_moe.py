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

Paths, chosen by the pair count ``T * k`` and the expected rows per local expert ``T * k / E``
(:func:`default_config`):

* ``swapab`` (decode, up to ``fp8_swapab.MAX_PAIRS`` pairs): no ``align`` launch; each expert's
  leader program gathers its pairs, weights on the MMA's M side (``fp8_swapab``), GEMM2's atomic
  combine, ``cast`` (or, ``FUSED_CAST2``, GEMM2 writes the bf16 output itself);
* ``decode`` (few rows per expert: the layer is a weight stream): the GEMMs quantize
  their input tile as they load it (``QUANT_ON_LOAD1``: no ``act_quant`` launch;
  always in GEMM2, which reads GEMM1's fp32 intermediate),
  BLOCK_M = 16, narrow column blocks and split-K in GEMM2 so the few active
  experts' weights are spread over every SM and read once;
* ``prefill``: pre-quantized input, e4m3 intermediate written by GEMM1's
  epilogue (BLOCK_N = 128: one column block is one scale group), large tiles;
* ``cute_grouped`` (FP8 block scales, dynamic activation scales, sm_90 with CuTe DSL): the CuTe
  DSL FP8 grouped GEMMs (``fp8_grouped_moe``); ``TILE1`` / ``TILE2`` name GEMM1's and GEMM2's
  configuration (``fp8_grouped.TILES``, ``GATED_TILES`` for GEMM1, ``WIDE_TILES`` for GEMM2;
  the heuristic's: :func:`default_grouped_tiles`). The
  heuristic default from ``CUTE_GROUPED_MIN_ROWS`` rows per expert wherever
  ``fp8_grouped_moe.grouped_path_defect`` finds nothing against it (else the Triton prefill
  tiers); asked for by name where it cannot run, a ValueError says why.

``QUANT_ON_LOAD1`` and ``QUANT_OUT1`` (GEMM1's input quantized as it is loaded / its output
quantized in its epilogue, else GEMM2 quantizes it as it loads) apply to every path; ``PDL``
(programmatic dependent launches of GEMM2 and the cast) to ``swapab``.

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

import logging
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import torch

from ...quant.fp8 import BLOCK as SCALE_BLOCK
from ...runtime import counters, workspace
from ..interpret import pdl_available
from .act_quant import act_quant_fp8
from .align import align_block_size
from .combine import cast_out, sum_pairs
from .config import resolve_path_config
from .fp8_gemm1 import gemm1_fp8
from .fp8_gemm2 import gemm2_fp8
from .fp8_grouped import (
    DEFAULT_TILE as GROUPED_DEFAULT_TILE,
    TILES as GROUPED_TILES,
    Tile,
    check_tile,
    fits_width,
    serves,
)
from .fp8_grouped_moe import grouped_path_defect, named_tile, run_fp8_grouped
from .fp8_swapab import swapab_fp8
from .tiles import MAX_GATHER_PAIRS

logger = logging.getLogger(__name__)

#: Every knob of a configuration (``config=`` may give any subset; the rest come from the heuristic).
#: ``*1`` are GEMM1's, ``*2`` GEMM2's; ``BLOCK_K`` must be 128 with dynamic scales or block weights.
#: ``path='swapab'`` only (off by default; decode experiments, docs/performance.md "Next experiments"):
#: ``FUSED_CAST2`` (bool): GEMM2's program that adds a (token, tile)'s last contribution writes its
#: bf16 output itself, counted by per-(token, tile) arrival counters: no ``cast`` launch (~2-3 µs
#: each inside a CUDA graph at T=1). ``N_TILES2`` (int >= 1): each GEMM2 program streams that many
#: consecutive ``BLOCK_N2``-row tiles of ``w2`` in one pipelined loop: fewer, longer programs, so the
#: pipeline ramp of GEMM2's short ones (16 K steps at I = 2048) is paid fewer times.
#: ``PREFETCH2`` (0, 1, 2, 4, 8 or 16): K blocks of each ``w2`` row that a GEMM2 program asks L2 for
#: before it waits on GEMM1 (``PDL``: beside GEMM1's last programs, whose SMs idle 10-15% of GEMM1's
#: time at T=1 on the H200); 0: none. ``PREFETCH1`` (the same values): the same for GEMM1's ``w13``
#: rows; with ``PDL`` and a pre-quantized input GEMM1 is then launched as ``act_quant``'s
#: programmatic dependent, so that it prefetches while the input is quantized. ``WAIT2``: what a
#: GEMM2 program waits for before reading ``y``: ``"grid"``, all of GEMM1 (``griddepcontrol.wait``);
#: ``"expert"``, its own expert's GEMM1 tiles (counters, ``fp8_swapab.swapab_fp8(ready=)``), so
#: that GEMM2 starts on the SMs GEMM1's last wave leaves idle. ``GRID``: what the swap-AB programs
#: stand for: ``"pairs"``, one per (token, slot) pair, the first pair of each local expert computing;
#: ``"experts"``, one per local expert where there are fewer local experts than pairs (at E=32
#: T=16, 32 programs a tile instead of 128, of which 96 only exit). ``UNROLL1`` / ``UNROLL2`` (1, 2 or
#: 4): K blocks of 128 a GEMM1 / GEMM2 pipeline iteration loads and multiplies, so that its CTA barrier
#: and waits are paid once for them (at T=1 the barrier stalled GEMM2 2.1-2.2 cycles an issued
#: instruction of 8.9, GEMM1 1.55 of 7.5: ncu, H200, 2026-12-04). ``FUSED_DOWN`` (bool): no GEMM2
#: launch; each GEMM1 program multiplies its 128 columns of the intermediate by the same 128
#: columns of ``w2`` (``BLOCK_N2`` rows a tile, ``num_stages2`` stages) and adds the result into
#: the accumulator atomically (``fp8_swapab.down_slice``): one weight stream with no launch
#: boundary, GEMM2's separate ramp and tail gone. The accumulator is then zeroed by ``act_quant``'s
#: launch with ``ZERO='fused'`` (a memset where GEMM1 quantizes its input on load); GEMM2's launch
#: knobs must stay off (``SPLIT_K2=1``, ``N_TILES2=1``, ``UNROLL2=1``, ``WAIT2='grid'``,
#: ``FUSED_CAST2=False``), and ``PREFETCH2`` counts the ``BLOCK_N2``-row tiles of the program's
#: ``w2`` columns it asks L2 for one K iteration before GEMM1's loop ends.
CONFIG_KEYS = (
    "path",
    "NUMERICS",
    "COMBINE",
    "ZERO",
    "QUANT_ON_LOAD1",
    "BLOCK_M",
    "BLOCK_N1",
    "BLOCK_K1",
    "GROUP_M1",
    "num_warps1",
    "num_stages1",
    "BLOCK_N2",
    "BLOCK_K2",
    "SPLIT_K2",
    "GROUP_M2",
    "num_warps2",
    "num_stages2",
    "PDL",
    "QUANT_OUT1",
    "FUSED_CAST2",
    "N_TILES2",
    "PREFETCH1",
    "PREFETCH2",
    "WAIT2",
    "GRID",
    "UNROLL1",
    "UNROLL2",
    "FUSED_DOWN",
    "TILE1",
    "TILE2",
)
#: The keys ``path='cute_grouped'`` reads; the other paths do not read ``TILE1`` / ``TILE2``.
GROUPED_KEYS = ("path", "NUMERICS", "COMBINE", "TILE1", "TILE2")

#: The keys only ``path='swapab'`` reads, at the values that leave them off (every other path's).
SWAPAB_ONLY_OFF: Dict[str, Any] = dict(
    FUSED_CAST2=False,
    N_TILES2=1,
    PREFETCH1=0,
    PREFETCH2=0,
    WAIT2="grid",
    GRID="pairs",
    UNROLL1=1,
    UNROLL2=1,
    FUSED_DOWN=False,
)

DECODE_CONFIG: Dict[str, Any] = dict(
    path="decode",
    NUMERICS="accurate",
    COMBINE="atomic",
    ZERO="fused",
    QUANT_ON_LOAD1=True,
    BLOCK_M=16,
    BLOCK_N1=64,
    BLOCK_K1=128,
    GROUP_M1=1,
    num_warps1=4,
    num_stages1=4,
    BLOCK_N2=64,
    BLOCK_K2=128,
    SPLIT_K2=2,
    GROUP_M2=1,
    num_warps2=4,
    num_stages2=4,
    PDL=False,
    QUANT_OUT1=False,
    **SWAPAB_ONLY_OFF,
)
#: ``swapab``: no alignment launch, weights on the MMA's M side (``fp8_swapab``); BLOCK_M is the
#: pairs per MMA (its N side), BLOCK_N1 the gate (and up) rows of a GEMM1 tile. The one-block tiling
#: below was the fastest of an H200 scan at T = 1 .. 16 (docs/performance.md, "FP8 decode"):
#: pre-quantized input, an e4m3 intermediate from GEMM1's epilogue (both GEMMs stream FP8 operands
#: through shared memory without a register round trip), 128-row weight tiles on 8 warps, GEMM1
#: launched as ``act_quant``'s programmatic dependent and GEMM2 as GEMM1's, each asking L2 for the
#: first four K blocks of its weight rows before it waits on its input (``PREFETCH1``,
#: ``PREFETCH2``, below), and six pipeline stages of one K block in both GEMMs: GEMM1's one program
#: an SM (215 registers a thread) keeps five 34 KB weight tiles in flight (204 KB of shared memory),
#: GEMM2's two keep five 18 KB each. Against four stages (H200, 2026-12-03, two bench runs): 1-3%
#: faster from T=2 to 32, level at T=1. Each GEMM2 program waits for its own expert's GEMM1 tiles
#: only (``WAIT2='expert'``), and with fewer local experts than pairs there is one program per local
#: expert (``GRID='experts'``). Against one program per pair waiting for all of GEMM1 (H200,
#: 2026-12-03, one run with vLLM): 0.6-3.4% faster at E=256 from T=1 to 32 and 0.6-3.8% at E=32
#: from T=1 to 16; either key alone gained less. A tuner candidate, and ``moe-backend bench
#: --variants swapab_one_block``.
SWAPAB_ONE_BLOCK_CONFIG: Dict[str, Any] = dict(
    DECODE_CONFIG,
    path="swapab",
    QUANT_ON_LOAD1=False,
    QUANT_OUT1=True,
    PDL=True,
    BLOCK_M=16,
    BLOCK_N1=128,
    num_warps1=8,
    num_stages1=6,
    BLOCK_N2=128,
    SPLIT_K2=1,
    num_warps2=8,
    num_stages2=6,
    PREFETCH1=4,
    PREFETCH2=4,
    WAIT2="expert",
    GRID="experts",
)
#: The swap-AB default: the one-block tiling with two K blocks a pipeline iteration in both GEMMs on
#: three stages (the same shared memory and the same bytes a stage ahead): half the CTA barriers a
#: K block (at T=1 GEMM2 stalled on them 2.1-2.2 cycles an issued instruction of 8.9, GEMM1 1.55 of
#: 7.5) and 73-94 instructions a K block in GEMM2's loop instead of 88-134 (sm_90a builds). H200,
#: 2026-12-05, three bench runs, the last with vLLM: 1.0-2.8% faster than the one-block tiling from
#: T=1 to 64 at E=256 and E=32 (T=1 103.0-103.3 against 105.8-106.1 us; E=32 T=64, on the
#: swap-AB path, 357.4 against 380.5 on the aligned one) except T=2 (0.6-0.7% slower). Two blocks
#: in GEMM1 alone or GEMM2 alone gained less (0-1.9%).
SWAPAB_CONFIG: Dict[str, Any] = dict(SWAPAB_ONE_BLOCK_CONFIG, UNROLL1=2, num_stages1=3, UNROLL2=2, num_stages2=3)
#: The swap-AB variants, not tuner candidates: ``scripts/decode_breakdown.py`` and ``moe-backend
#: bench --variants swapab_<name>`` time them against ``SWAPAB_CONFIG``. ``pairs_grid_wait``: the
#: one-block default before the per-expert wait and grid (one program per pair, GEMM2 waits for all
#: of GEMM1). Settled and dropped (H200, docs/performance.md): the per-expert wait alone was
#: 0.6-3.4% faster than ``pairs_grid_wait`` at T=1-32 but for E=32 T=16 (0.8% slower) and T=32
#: (7%); the per-expert grid alone level at E=256 and 0.6-3.3% faster at E=32 from T=8. GEMM1's L2
#: prefetch of four K blocks was 0.5-1.2% faster than none at 11 of 12 points from T=1 to 32 and
#: level at the twelfth, eight blocks level with none; GEMM2's four blocks 0.3-0.9% faster than none
#: at T=1-16, sixteen 3-8% slower. GEMM2 on four warps, on three stages and four warps (all 448
#: programs of T=1 in one wave) and on two K slices were slower at every T from 1 to 16 in two
#: sessions, as were the fused cast and two or four tiles a program. So were more GEMM1 programs an
#: SM: capped at 128 registers on three stages (two an SM; uncapped it takes 215 registers, one an
#: SM), and 64 gate + 64 up rows on four warps with an fp32 intermediate, capped at 168 registers
#: (three an SM) or not (two): 1-10% slower at every T from 1 to 32. GEMM2 on a persistent grid
#: stays on the branch ``fp8-gemm2-stream`` (1-3% slower).
SWAPAB_VARIANTS: Dict[str, Dict[str, Any]] = {
    "pairs_grid_wait": dict(SWAPAB_ONE_BLOCK_CONFIG, WAIT2="grid", GRID="pairs"),
}
#: The down projection inside GEMM1's programs (``FUSED_DOWN``): GEMM1's tiling, then 128 rows of ``w2`` a tile on four
#: stages (sm_90a: 251 registers, no spill, GEMM1's 204 KB of shared memory reused by the second loop). The default up
#: to ``SWAPAB_FUSED_DOWN_MAX_PAIRS`` pairs, a tuner candidate. H100, 2026-12-06, four runs: T=1 133.1-133.2 against
#: 134.6-135.0 us, T=2 244.0-244.5 against 247.6-247.9 (E=256 and 32); a fifth run on a slower H100 (3117 GB/s read):
#: 0.1-0.2% at T=1, 0.6% at T=2. 0.3-2.5% slower from T=4 (each expert's 16 programs stream 2.75 MB: 3.9 waves of one
#: program an SM at T=4 E=256, whose last-wave idle SMs GEMM2's per-expert wait filled). Taken apart
#: (``scripts/gpu_probe_fp8_decode_launches.py``, T=1): its one GEMM launch alone 130.8 against the two launches' 129.6
#: (the read stream of the same bytes 127.3); the act_quant and cast launches around it cost 2.1 against 5.0. Variants:
#: 256-row tiles (level), the first two ``w2`` tiles asked of L2 before GEMM1's loop ends (``PREFETCH2``; one run:
#: 0.7-1.0 us faster at T=1, level at T=2, 0.4% slower at T=4; four tiles: below). Settled and dropped (one run each,
#: docs/performance.md): six down-loop stages, the hidden states quantized as GEMM1 loads them (no ``act_quant`` launch;
#: a memset zeroes the accumulator: 0.5-1.1 us slower), eight K blocks of GEMM1's L2 prefetch (1.1-1.9 us slower).
SWAPAB_FUSED_DOWN_CONFIG: Dict[str, Any] = dict(
    SWAPAB_CONFIG, FUSED_DOWN=True, WAIT2="grid", UNROLL2=1, PREFETCH2=0, BLOCK_N2=128, num_stages2=4
)
SWAPAB_VARIANTS.update(
    fused_down_n256=dict(SWAPAB_FUSED_DOWN_CONFIG, BLOCK_N2=256),
    fused_down_w2_prefetch2=dict(SWAPAB_FUSED_DOWN_CONFIG, PREFETCH2=2),
)
#: ``FUSED_DOWN`` with the first four ``w2`` tiles of each program asked of L2 one K iteration before GEMM1's loop
#: ends (``PREFETCH2``): the default up to ``SWAPAB_DOWN_PREFETCH_MAX_PAIRS`` pairs, a tuner candidate. There all
#: programs are one wave that leaves GEMM1's loop together, and the down loop's first loads would wait on DRAM while
#: none streams. H100, three runs (2026-12-06): T=1 0.7-1.2 us faster at E=256 and E=32 (the default 137.7 against
#: 138.6 at E=256 in the third), T=2 0.2-0.6 us slower.
SWAPAB_FUSED_DOWN_PREFETCH_CONFIG: Dict[str, Any] = dict(SWAPAB_FUSED_DOWN_CONFIG, PREFETCH2=4)
#: The one-block swap-AB tiling on four stages in both GEMMs (H200, 2026-12-03, with one program
#: per pair waiting for all of GEMM1: E=256 T=16 1342.8 against 1310.8 us on six; five stages in
#: GEMM1 alone, or six in one GEMM alone, gained less than six in both): a tuner candidate, and
#: ``moe-backend bench --variants swapab_stages4``.
SWAPAB_STAGES4_CONFIG: Dict[str, Any] = dict(SWAPAB_ONE_BLOCK_CONFIG, num_stages1=4, num_stages2=4)
#: The swap-AB default serves up to ``MAX_GATHER_PAIRS`` pairs while the expected pairs per local
#: expert stay at most ``SWAPAB_DEFAULT_MAX_ROWS``, and up to one full 16-pair chunk an expert below
#: ``SWAPAB_DEFAULT_FULL_CHUNK_PAIRS`` pairs. An expert past one chunk streams its weights once a
#: chunk: at E=32 the default took 376 us at T=64 (16 pairs an expert, balanced) against 380 on the
#: aligned path, and 708 against 407 at T=96 (24); at E=256 it was 1.05x the aligned path at T=128
#: (4 an expert; H200, 2026-12-03). Uneven routing pushes some experts past one chunk well before
#: the balanced mean reaches 16, hence the margin above ``SWAPAB_DEFAULT_FULL_CHUNK_PAIRS``: with
#: uniformly drawn experts, 7% of them get a second chunk at 12 an expert, 43% at 16. Measured
#: (H200, 2026-12-05, ``moe-backend bench --routing random``, the two-block swap-AB tiling against
#: the default): E=32 T=32 346.2 against 351.5 us (both swap-AB), T=64 499.8 against 445.2 and T=96
#: 682.0 against 407.3 on the aligned path, though balanced T=64 took 357.4 against 380.5.
SWAPAB_DEFAULT_MAX_ROWS = 8
SWAPAB_DEFAULT_FULL_CHUNK_PAIRS = 128
#: Up to this many pairs (T = 2 at top-8) the swap-AB default runs GEMM2 inside GEMM1's programs
#: (``SWAPAB_FUSED_DOWN_CONFIG``).
SWAPAB_FUSED_DOWN_MAX_PAIRS = 16
#: Up to this many pairs (T = 1 at top-8) the fused down loop's first ``w2`` tiles are prefetched
#: (``SWAPAB_FUSED_DOWN_PREFETCH_CONFIG``).
SWAPAB_DOWN_PREFETCH_MAX_PAIRS = 8
#: The swap-AB default by pair count, first match (where the swap-AB path serves, ``default_config``).
SWAPAB_PAIR_TIERS = (
    (SWAPAB_DOWN_PREFETCH_MAX_PAIRS, SWAPAB_FUSED_DOWN_PREFETCH_CONFIG),
    (SWAPAB_FUSED_DOWN_MAX_PAIRS, SWAPAB_FUSED_DOWN_CONFIG),
    (float("inf"), SWAPAB_CONFIG),
)
PREFILL_CONFIG: Dict[str, Any] = dict(
    path="prefill",
    NUMERICS="accurate",
    COMBINE="sum",
    ZERO="fused",
    QUANT_ON_LOAD1=False,
    BLOCK_M=128,
    BLOCK_N1=128,
    BLOCK_K1=128,
    GROUP_M1=8,
    num_warps1=8,
    num_stages1=3,
    BLOCK_N2=128,
    BLOCK_K2=128,
    SPLIT_K2=1,
    GROUP_M2=8,
    num_warps2=8,
    num_stages2=3,
    PDL=False,
    QUANT_OUT1=True,
    **SWAPAB_ONLY_OFF,
)


#: The CuTe DSL grouped GEMMs: deterministic (each pair's row summed in slot order), tiles as lists
#: (configurations are stored as JSON).
CUTE_GROUPED_CONFIG: Dict[str, Any] = dict(
    path="cute_grouped",
    NUMERICS="accurate",
    COMBINE="sum",
    TILE1=list(GROUPED_DEFAULT_TILE),
    TILE2=list(GROUPED_DEFAULT_TILE),
)


def cute_grouped_config(tile1: Tile = GROUPED_DEFAULT_TILE, tile2: Tile = GROUPED_DEFAULT_TILE) -> Dict[str, Any]:
    """:data:`CUTE_GROUPED_CONFIG` with GEMM1 on ``tile1`` and GEMM2 on ``tile2`` (stored as lists)."""
    return dict(CUTE_GROUPED_CONFIG, TILE1=list(tile1), TILE2=list(tile2))


#: The overlapping twin of the default tile (two wave accumulators; K a multiple of 256). As
#: GEMM2's tile it won every H200 measurement of 2026-12-02: 1015 against 929 TFLOP/s alone, and
#: 30-95 us less inside the layer in each of four runs at T=1024 and 8192. As GEMM1's it won
#: about half of them. So the heuristic default takes it for GEMM2 wherever I allows
#: (:func:`default_grouped_tiles`); the named base configuration keeps the plain tiles.
GROUPED_OVERLAP_TILE = [t for t in GROUPED_TILES if t[:4] == GROUPED_DEFAULT_TILE[:4] and t[4]][0]
#: From this many expected rows per local expert the heuristic default takes ``cute_grouped``
#: where it can run. H200, 2026-12-02, one bench run (DeepSeek-V3 widths, top-8): at 128 rows it
#: beat the Triton tiers (E=32 T=512: 578 against 628 us; E=256 T=4096: 4760 against 5007), at 64
#: it lost (E=256 T=2048: 3803 against 3328), at 32 too (E=32 T=128: 512 against 410).
CUTE_GROUPED_MIN_ROWS = 128
#: The default tile's twins in clusters of two M tiles of one expert (its weight tiles multicast
#: to both: half the weight reads from L2), overlapping and plain (for a K without an even number
#: of K tiles). From :data:`GROUPED_CLUSTER_MIN_ROWS` expected rows per expert the heuristic takes
#: them for both GEMMs. H200, 2026-12-03, against the one-CTA tiles (docs/performance.md, eighth
#: session): faster at E=32 in every run but one (T=1024: 820-862 vs 837-871 us in four runs;
#: T=8192: 5977-6449 vs 6380-6619 in five, a sixth 7003 vs 6473 with one slow pass); E=256
#: T=8192 level (two runs each way, gaps of 0.6-3.4%). With one M tile an expert the cluster's second
#: half idles: at 32 rows an expert (E=256 T=1024) the grouped GEMMs took twice as long.
GROUPED_CLUSTER_TILE = check_tile((128, 128, 2, False, True))
GROUPED_CLUSTER_PLAIN_TILE = check_tile((128, 128, 2, False, False))
GROUPED_CLUSTER_MIN_ROWS = 256
#: GEMM1 with SiLU-and-mul and the FP8 requantization in its epilogue (``fp8_grouped.GATED_TILES``:
#: 128 rows by gate and up of one 128-wide group), one CTA or a cluster of two M tiles. From
#: :data:`GATED_MIN_ROWS` expected rows per expert the heuristic takes the cluster tile for GEMM1
#: (GEMM2 on :data:`WIDE_CLUSTER_TILE` where H allows it, else on the cluster tile). Since its codes
#: leave in 16-byte pieces (2026-12-04, sixteenth session; the two-byte stores had cost GEMM1
#: 15-20%), the gated GEMM1 beat the plain cluster tile plus ``silu_mul_quant`` in the layer at 256
#: rows an expert (H200, `moe-backend bench`, one run: E=32 T=1024 710.8 against 805.3 us, E=256
#: T=8192 6095.7 against 6590.5) and the one-CTA gated tile at 2048 (E=32 T=8192 5712.8 against
#: 5847.5). Before that fix the cluster tile had lost at E=256 T=8192 twice (+10%, fourteenth and
#: fifteenth sessions). The one-CTA and plain tiles stay tuner candidates.
GATED_TILE = check_tile((128, 256, 1, False, False), gated=True)
GATED_CLUSTER_TILE = check_tile((128, 256, 2, False, False), gated=True)
GATED_MIN_ROWS = GROUPED_CLUSTER_MIN_ROWS
#: GEMM2 on the 128 x 256 cluster tile (two 128-wide N halves, ``fp8_grouped.WIDE_TILES``): a K
#: tile carries twice the MMA work of the 128 x 128 tile's, so its four stages keep twice the
#: time of weight stream in flight, and the per-tile epilogue (10-13% of GEMM2 at T=8192,
#: ``scripts/gpu_probe_gemm2_epilogue.py``) comes half as often. The heuristic takes it for GEMM2
#: from GROUPED_CLUSTER_MIN_ROWS rows an expert where H allows it (a multiple of 256). H200,
#: 2026-12-04, seventeenth session, one bench run against the cluster tile with the same GEMM1:
#: E=32 T=1024 758.7 against 795.6 us, T=8192 5690.3 against 5893.1, E=256 T=8192 6177.9 against
#: 6204.8.
WIDE_CLUSTER_TILE = check_tile((128, 256, 2, False, False))

#: The base configuration of each path (what a ``config=`` naming the path starts from).
PATH_CONFIGS: Dict[str, Dict[str, Any]] = {
    "swapab": SWAPAB_CONFIG,
    "decode": DECODE_CONFIG,
    "prefill": PREFILL_CONFIG,
    "cute_grouped": CUTE_GROUPED_CONFIG,
}

#: Prefill tilings by rows per expert: skinny tiles with the atomic combine (still a weight
#: stream), then 32 and 64 rows a tile.
SKINNY_CONFIG: Dict[str, Any] = dict(
    PREFILL_CONFIG, COMBINE="atomic", BLOCK_M=16, BLOCK_N2=64, num_warps1=4, num_warps2=4, num_stages1=5, num_stages2=5
)
PREFILL_32_CONFIG: Dict[str, Any] = dict(
    PREFILL_CONFIG, BLOCK_M=32, num_warps1=4, num_warps2=4, num_stages1=4, num_stages2=4
)
PREFILL_64_CONFIG: Dict[str, Any] = dict(PREFILL_32_CONFIG, BLOCK_M=64)

#: The heuristic default: (most expected rows per local expert, configuration), first match.
DEFAULT_TIERS = (
    (1, DECODE_CONFIG),
    (16, SKINNY_CONFIG),
    (32, PREFILL_32_CONFIG),
    (96, PREFILL_64_CONFIG),
    (float("inf"), PREFILL_CONFIG),
)

#: Version of this kernel's tuned configurations: the tuning cache keeps a configuration only
#: for the version it was tuned for. Bump it when the kernels, their weight or activation
#: layout, or the configuration schema (CONFIG_KEYS, their meaning) change.
KERNEL_VERSION = 12

#: What the tuner times per token bucket (each overrides the heuristic default of that size):
#: the swap-AB and aligned decode paths, skinny atomic-combine tiles, and prefill tiles up to 128 rows.
CANDIDATE_CONFIGS = (
    SWAPAB_CONFIG,
    SWAPAB_FUSED_DOWN_CONFIG,
    SWAPAB_FUSED_DOWN_PREFETCH_CONFIG,
    SWAPAB_ONE_BLOCK_CONFIG,
    SWAPAB_STAGES4_CONFIG,
    dict(SWAPAB_ONE_BLOCK_CONFIG, num_stages1=3, BLOCK_N2=64, num_warps2=4, num_stages2=4),
    dict(SWAPAB_ONE_BLOCK_CONFIG, QUANT_OUT1=False, BLOCK_N1=64, num_warps1=4, num_stages1=4, num_stages2=4),
    DECODE_CONFIG,
    dict(DECODE_CONFIG, SPLIT_K2=1),
    SKINNY_CONFIG,
    dict(SKINNY_CONFIG, BLOCK_M=32, num_stages1=4, num_stages2=4),
    PREFILL_32_CONFIG,
    PREFILL_64_CONFIG,
    PREFILL_CONFIG,
    dict(PREFILL_CONFIG, COMBINE="atomic"),
    CUTE_GROUPED_CONFIG,
    cute_grouped_config(tile2=GROUPED_OVERLAP_TILE),
    cute_grouped_config(GROUPED_OVERLAP_TILE, GROUPED_OVERLAP_TILE),
    cute_grouped_config(GROUPED_CLUSTER_TILE, GROUPED_CLUSTER_TILE),
    cute_grouped_config(GATED_TILE, GROUPED_CLUSTER_TILE),
    cute_grouped_config(GATED_TILE, GROUPED_OVERLAP_TILE),
    cute_grouped_config(GATED_CLUSTER_TILE, GROUPED_CLUSTER_TILE),
    cute_grouped_config(GATED_CLUSTER_TILE, WIDE_CLUSTER_TILE),
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


def _check_vllm_numerics(
    cfg: Dict[str, Any], block_scaled: bool, dynamic: bool, ue8m0: bool, weight_on_input: bool
) -> None:
    """Raise ValueError when ``vllm_triton`` numerics cannot hold for this layer or configuration."""
    if not (block_scaled and dynamic and not ue8m0 and not weight_on_input):
        raise ValueError(
            "config: NUMERICS='vllm_triton' needs FP8 block-scale weights with dynamic "
            "activation scales, no ue8m0 and the router weight on the output"
        )
    got = (cfg["path"], cfg["COMBINE"], cfg["BLOCK_N1"], cfg["QUANT_ON_LOAD1"], cfg["BLOCK_M"])
    if got[:4] != ("prefill", "sum", SCALE_BLOCK, False) or got[4] < 64:
        raise ValueError(
            "config: NUMERICS='vllm_triton' needs path='prefill', COMBINE='sum', BLOCK_N1=128, "
            f"QUANT_ON_LOAD1=False and BLOCK_M >= 64 (vLLM's wgmma), got {got}"
        )


def default_config(num_tokens: int, top_k: int, num_experts: int, grouped: bool = False) -> Dict[str, Any]:
    """Heuristic configuration from the expected rows per local expert (balanced routing);
    ``grouped``: the ``cute_grouped`` path can serve this layer (``grouped_path_defect``).

    From ``CUTE_GROUPED_MIN_ROWS`` rows per expert, ``cute_grouped`` when ``grouped``.

    The swap-AB path up to ``MAX_GATHER_PAIRS`` pairs (what its leader scan holds) while the
    expected pairs per local expert stay within ``SWAPAB_DEFAULT_MAX_ROWS``, or within one 16-pair
    chunk below ``SWAPAB_DEFAULT_FULL_CHUNK_PAIRS`` pairs (H200 scans); up to
    ``SWAPAB_FUSED_DOWN_MAX_PAIRS`` pairs with GEMM2 inside GEMM1's programs, up to
    ``SWAPAB_DOWN_PREFETCH_MAX_PAIRS`` with its first ``w2`` tiles prefetched (H100 runs). Above,
    tuned on an H100 with H=7168, I=2048 (a config sweep, docs/performance.md): up to one row per
    expert the aligned decode path; up to 16 the prefill kernels with BLOCK_M=16 and atomic
    combine (still a weight stream); above, larger tiles and the ``sum`` combine, which beats
    atomics once the workspace is large.
    """
    pairs = num_tokens * top_k
    rows_per_expert = pairs / num_experts
    if grouped and rows_per_expert >= CUTE_GROUPED_MIN_ROWS:
        return dict(CUTE_GROUPED_CONFIG)
    if pairs <= MAX_GATHER_PAIRS and rows_per_expert <= (
        16 if pairs <= SWAPAB_DEFAULT_FULL_CHUNK_PAIRS else SWAPAB_DEFAULT_MAX_ROWS
    ):
        return dict(next(cfg for limit, cfg in SWAPAB_PAIR_TIERS if pairs <= limit))
    return dict(next(cfg for limit, cfg in DEFAULT_TIERS if rows_per_expert <= limit))


def resolve_config(
    config: Optional[dict], num_tokens: int, top_k: int, num_experts: int, grouped: bool = False
) -> Dict[str, Any]:
    """``config``'s keys over a base: the base configuration of the path ``config`` names, else
    the heuristic default for this size (``grouped``: as :func:`default_config`)."""
    cfg = resolve_path_config(
        config,
        lambda: default_config(num_tokens, top_k, num_experts, grouped),
        PATH_CONFIGS,
        CONFIG_KEYS,
        ("cute_grouped", GROUPED_KEYS, ("TILE1", "TILE2")),
    )
    if cfg["path"] == "cute_grouped" and (cfg["NUMERICS"] != "accurate" or cfg["COMBINE"] != "sum"):
        raise ValueError(
            "config: path='cute_grouped' has NUMERICS='accurate' and COMBINE='sum' only, got "
            f"NUMERICS={cfg['NUMERICS']!r}, COMBINE={cfg['COMBINE']!r}"
        )
    return cfg


_LOGGED_DEFECTS: Set[str] = set()


def _grouped_defect(
    device: torch.device,
    block_scaled: bool,
    a13_scale: Optional[torch.Tensor],
    a2_scale: Optional[torch.Tensor],
    ue8m0: bool,
    weight_on_input: bool,
) -> Optional[str]:
    """``grouped_path_defect`` for a layer on ``device`` with the launcher's scale arguments,
    logged once per reason (the heuristic then keeps prefill on the Triton kernels)."""
    defect = grouped_path_defect(
        device,
        block_scaled=block_scaled,
        static_activation_scales=a13_scale is not None or a2_scale is not None,
        ue8m0=ue8m0,
        apply_router_weight_on_input=weight_on_input,
    )
    if defect is not None and defect not in _LOGGED_DEFECTS:
        _LOGGED_DEFECTS.add(defect)
        logger.info("FP8 prefill stays on the Triton kernels, the CuTe DSL grouped path cannot serve it: %s", defect)
    return defect


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


def default_grouped_tiles(hidden_size: int, inter: int, rows_per_expert: float) -> Dict[str, Any]:
    """The heuristic default's ``TILE1`` / ``TILE2`` for GEMM1 (K = ``hidden_size``) and GEMM2
    (K = ``inter``) at ``rows_per_expert`` expected rows per local expert.

    From :data:`GROUPED_CLUSTER_MIN_ROWS` rows the cluster-of-two tile for both GEMMs
    (overlapping where K allows it, else plain; for GEMM2 the wide :data:`WIDE_CLUSTER_TILE`
    where H is a multiple of 256), and from :data:`GATED_MIN_ROWS` the gated GEMM1
    (:data:`GATED_CLUSTER_TILE`) instead; below, the plain default tile for GEMM1 and its overlapping twin
    for GEMM2 where K allows it, else the plain one.
    """
    if rows_per_expert >= GROUPED_CLUSTER_MIN_ROWS:
        pick = [
            GROUPED_CLUSTER_TILE if serves(GROUPED_CLUSTER_TILE, k) else GROUPED_CLUSTER_PLAIN_TILE
            for k in (hidden_size, inter)
        ]
        if fits_width(WIDE_CLUSTER_TILE, hidden_size):
            pick[1] = WIDE_CLUSTER_TILE
        if rows_per_expert >= GATED_MIN_ROWS:
            pick[0] = GATED_CLUSTER_TILE
        return dict(TILE1=list(pick[0]), TILE2=list(pick[1]))
    tile2 = GROUPED_OVERLAP_TILE if serves(GROUPED_OVERLAP_TILE, inter) else GROUPED_DEFAULT_TILE
    return dict(TILE1=list(GROUPED_DEFAULT_TILE), TILE2=list(tile2))


def grouped_tiles(cfg: Dict[str, Any], hidden_size: int, inter: int) -> Tuple[Tile, Tile]:
    """GEMM1's and GEMM2's tiles of a ``cute_grouped`` configuration, checked for K = H and I."""
    return (
        named_tile("config: TILE1", cfg["TILE1"], hidden_size, gemm1=True),
        named_tile("config: TILE2", cfg["TILE2"], inter, n=hidden_size),
    )


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
        config: tuning knobs (keys :data:`CONFIG_KEYS`); None: :func:`default_config`, with the
            ``cute_grouped`` path from ``CUTE_GROUPED_MIN_ROWS`` rows per expert where
            ``grouped_path_defect`` finds nothing against it. That path's GEMMs must be compiled
            (:func:`precompile`) before a CUDA-graph capture.

    Returns:
        ``out[:T]``.
    """
    num_tokens, hidden_size = hidden.shape
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    result = out[:num_tokens]
    if num_tokens == 0:
        return result
    # The grouped path is asked for by name, or is the heuristic's choice for a call without
    # overrides (overrides of Triton knobs mean the Triton kernels); only then is it checked.
    named = (config or {}).get("path") == "cute_grouped"
    defect = None
    if named or (not config and num_tokens * top_k >= CUTE_GROUPED_MIN_ROWS * num_experts):
        defect = _grouped_defect(hidden.device, block_scaled, a13_scale, a2_scale, ue8m0, apply_router_weight_on_input)
    cfg = resolve_config(config, num_tokens, top_k, num_experts, grouped=not config and defect is None)
    if cfg["path"] == "cute_grouped":
        if defect is not None:
            raise ValueError(f"config: path='cute_grouped' cannot serve this layer: {defect}")
        if not config:  # the heuristic's choice: its tiles for H, I and the rows per expert
            cfg.update(default_grouped_tiles(hidden_size, w2.shape[2], num_tokens * top_k / num_experts))
        tile1, tile2 = grouped_tiles(cfg, hidden_size, w2.shape[2])
        return run_fp8_grouped(
            hidden,
            w13,
            w13_scale,
            w2,
            w2_scale,
            topk_ids.contiguous(),
            topk_weights.contiguous(),
            local_expert_offset=local_expert_offset,
            result=result,
            tile1=tile1,
            tile2=tile2,
        )
    if cfg["NUMERICS"] not in ("accurate", *NUMERICS_CONFIGS):
        raise ValueError(f"config: NUMERICS must be one of {('accurate', *NUMERICS_CONFIGS)}, got {cfg['NUMERICS']!r}")
    vllm = cfg["NUMERICS"] == "vllm_triton"
    if vllm:
        _check_vllm_numerics(
            cfg, block_scaled, a13_scale is None and a2_scale is None, ue8m0, apply_router_weight_on_input
        )
    swapab_only = {k: cfg[k] for k in SWAPAB_ONLY_OFF}
    if cfg["path"] != "swapab" and swapab_only != SWAPAB_ONLY_OFF:
        raise ValueError(
            "config: FUSED_CAST2, N_TILES2, PREFETCH1, PREFETCH2, WAIT2, GRID, UNROLL1, UNROLL2 and FUSED_DOWN "
            f"apply to path='swapab' only, got path={cfg['path']!r} with {swapab_only}"
        )
    num_pairs = num_tokens * top_k
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    if cfg["path"] == "swapab":
        pdl = bool(cfg["PDL"]) and pdl_available(hidden)
        if cfg["COMBINE"] != "atomic":
            raise ValueError(f"config: path='swapab' combines with atomics (COMBINE='atomic'), got {cfg['COMBINE']!r}")
        for name in ("FUSED_CAST2", "FUSED_DOWN"):
            if not isinstance(cfg[name], bool):
                raise ValueError(f"config: {name} must be a bool, got {cfg[name]!r}")
        if cfg["WAIT2"] not in ("grid", "expert"):
            raise ValueError(f"config: WAIT2 must be 'grid' or 'expert', got {cfg['WAIT2']!r}")
        if cfg["GRID"] not in ("pairs", "experts"):
            raise ValueError(f"config: GRID must be 'pairs' or 'experts', got {cfg['GRID']!r}")
        ready = counters(num_experts + 1, hidden.device, "moe_expert_ready") if cfg["WAIT2"] == "expert" else None
        acc = workspace(num_tokens, hidden_size, torch.float32, hidden.device, "moe_combine")
        zeroed = _start_zeroing(acc, cfg["ZERO"])
        swapab_fp8(
            hidden,
            w13,
            w13_scale,
            w2,
            w2_scale,
            topk_ids,
            topk_weights,
            acc,
            local_expert_offset=local_expert_offset,
            block_scaled=block_scaled,
            a13_static=a13_scale,
            a2_static=a2_scale,
            ue8m0=ue8m0,
            weight_on_input=apply_router_weight_on_input,
            BLOCK_T=cfg["BLOCK_M"],
            BLOCK_N1=cfg["BLOCK_N1"],
            BLOCK_N2=cfg["BLOCK_N2"],
            SPLIT_K2=cfg["SPLIT_K2"],
            num_warps1=cfg["num_warps1"],
            num_stages1=cfg["num_stages1"],
            num_warps2=cfg["num_warps2"],
            num_stages2=cfg["num_stages2"],
            quant_on_load=cfg["QUANT_ON_LOAD1"],
            quant_out=cfg["QUANT_OUT1"],
            pdl=pdl,
            zeroed=zeroed,
            zero_in_gemm1=cfg["ZERO"] == "fused",
            N_TILES2=cfg["N_TILES2"],
            result=result if cfg["FUSED_CAST2"] else None,
            PREFETCH1=cfg["PREFETCH1"],
            PREFETCH2=cfg["PREFETCH2"],
            ready=ready,
            by_expert=cfg["GRID"] == "experts",
            UNROLL1=cfg["UNROLL1"],
            UNROLL2=cfg["UNROLL2"],
            fused_down=cfg["FUSED_DOWN"],
        )
        if not cfg["FUSED_CAST2"]:
            cast_out(acc, result, pdl=pdl, reset=ready)
        return result

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
        acc = workspace(
            routing.max_tiles * routing.block_m, hidden_size, torch.bfloat16, hidden.device, "moe_pair_rows"
        )
    # vLLM's scaling order: 0 not vLLM's numerics, 1 activation scale first, 2 weight scale first.
    vllm_order = 0 if not vllm else 2 if num_tokens <= VLLM_SWAP_AB_MAX_TOKENS else 1
    common: Dict[str, Any] = dict(
        num_pairs=num_pairs,
        top_k=top_k,
        block_scaled=block_scaled,
        ue8m0=ue8m0,
        weight_on_input=apply_router_weight_on_input,
        vllm_order=vllm_order,
    )
    y, y_scale = gemm1_fp8(
        a,
        a_scale,
        w13,
        w13_scale,
        routing,
        topk_weights,
        acc if atomic and cfg["ZERO"] == "fused" else acc[:0],
        quant_on_load=quant_on_load,
        a13_static=a13_scale,
        quant_out=cfg["QUANT_OUT1"],
        a2_static=a2_scale,
        BLOCK_N=cfg["BLOCK_N1"],
        BLOCK_K=cfg["BLOCK_K1"],
        GROUP_M=cfg["GROUP_M1"],
        num_warps=cfg["num_warps1"],
        num_stages=cfg["num_stages1"],
        **common,
    )
    if atomic and joined is not None:
        torch.cuda.current_stream().wait_event(joined)
    gemm2_fp8(
        y,
        y_scale,
        w2,
        w2_scale,
        routing,
        topk_weights,
        acc,
        quant_on_load=not cfg["QUANT_OUT1"],
        a2_static=a2_scale,
        atomic=atomic,
        BLOCK_N=cfg["BLOCK_N2"],
        BLOCK_K=cfg["BLOCK_K2"],
        SPLIT_K=cfg["SPLIT_K2"],
        GROUP_M=cfg["GROUP_M2"],
        num_warps=cfg["num_warps2"],
        num_stages=cfg["num_stages2"],
        **common,
    )
    if atomic:
        cast_out(acc, result)
    else:
        sum_pairs(acc, routing.row_of_pair, top_k, result)
    return result


def precompile(
    w13: torch.Tensor,
    w2: torch.Tensor,
    configs: Sequence[dict],
    *,
    block_scaled: bool,
    a13_scale: Optional[torch.Tensor],
    a2_scale: Optional[torch.Tensor],
    ue8m0: bool,
) -> int:
    """Compile the CuTe DSL GEMMs the ``configs`` can run for the layer :func:`fused_experts_fp8`
    gets these weights and scale arguments for (``w13 [E, 2I, H]``, ``w2 [E, H, I]``):
    those of each ``cute_grouped`` configuration, and both of the heuristic's tilings for an
    empty one (it takes that path at prefill sizes, the cluster tiles at the largest) where
    ``grouped_path_defect`` finds nothing against it. The Triton kernels compile on first use.
    Returns the number built or loaded now."""
    from .fp8_grouped_moe import compile_grouped_plans

    hidden_size, inter = w2.shape[1], w2.shape[2]
    tiles = set()
    for config in configs:
        if not config:
            if _grouped_defect(w13.device, block_scaled, a13_scale, a2_scale, ue8m0, False) is None:
                # each of the heuristic's tilings
                for rows in (CUTE_GROUPED_MIN_ROWS, GROUPED_CLUSTER_MIN_ROWS, GATED_MIN_ROWS):
                    default = dict(CUTE_GROUPED_CONFIG, **default_grouped_tiles(hidden_size, inter, rows))
                    tiles.add(grouped_tiles(default, hidden_size, inter))
        elif config.get("path") == "cute_grouped":
            tiles.add(grouped_tiles(resolve_config(config, 1, 1, 1), hidden_size, inter))
    return sum(compile_grouped_plans(hidden_size, inter, t1, t2, w13.device) for t1, t2 in sorted(tiles))
