"""SM90 FP8 fused-experts Triton kernels against the torch reference.

On a CPU the same kernels run under ``TRITON_INTERPRET=1`` (set by
``tests/conftest.py`` before anything imports Triton kernels) on tiny shapes;
the ``gpu`` tests cover the DeepSeek-V3 sizes, CUDA-graph replay and host syncs.
Every run poisons ``out`` with NaN first: rows ``[:T]`` must all be written and
rows ``>= T`` left untouched.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from moe_checks import (
    DEVICE,
    INTERPRET,
    REL_TOL,
    Problem,
    assert_matches_reference,
    call_fp8_kernel,
    random_ids,
    run_fp8_kernel,
    runs_here,
)
from vllm_numerics import vllm_triton_fused_experts

from moe_backend.expert_weights import FP8BlockWeights, FP8TensorWeights
from moe_backend.kernels.sm90.align import align_block_size
from moe_backend.kernels.sm90.fp8_moe import NUMERICS_CONFIGS, SWAPAB_ONE_BLOCK_CONFIG

#: Forced paths for the interpreter (tiny tiles, both code paths).
DECODE_SMALL = dict(path="decode", BLOCK_M=16, BLOCK_N1=64, BLOCK_N2=32, SPLIT_K2=2)
PREFILL_SMALL = dict(
    path="prefill", BLOCK_M=16, BLOCK_N1=128, BLOCK_N2=64, GROUP_M1=2, GROUP_M2=2, num_warps1=4, num_warps2=4
)
#: One program per pair, GEMM2 waiting for all of GEMM1 (the default waits per expert on a grid
#: of local experts: ``SWAPAB_EXPERT``).
PAIRS_GRID = dict(WAIT2="grid", GRID="pairs")
SWAPAB_SMALL = dict(
    path="swapab",
    BLOCK_M=16,
    BLOCK_N1=32,
    BLOCK_N2=64,
    SPLIT_K2=2,
    QUANT_ON_LOAD1=True,
    QUANT_OUT1=False,
    **PAIRS_GRID,
)
#: Swap-AB with pre-quantized hidden states and an e4m3 intermediate from GEMM1's epilogue.
SWAPAB_PREQ = dict(SWAPAB_SMALL, QUANT_ON_LOAD1=False, QUANT_OUT1=True, BLOCK_N1=128, SPLIT_K2=1)
#: The default's synchronization and grid: per-expert waits, one program per local expert.
SWAPAB_EXPERT = dict(SWAPAB_PREQ, WAIT2="expert", GRID="experts")
#: The down projection inside GEMM1's programs, GEMM2's launch knobs off (the default's are on).
FUSED_DOWN = dict(FUSED_DOWN=True, WAIT2="grid", UNROLL2=1, PREFETCH2=0)
SWAPAB_DOWN = dict(SWAPAB_PREQ, BLOCK_N2=64, **FUSED_DOWN)
#: The other combine and GEMM1-input variants of each path.
DECODE_ALT = dict(DECODE_SMALL, COMBINE="sum", QUANT_ON_LOAD1=False, SPLIT_K2=1)
PREFILL_ALT = dict(PREFILL_SMALL, COMBINE="atomic", SPLIT_K2=2)


def _quantized_experts(e: int, i: int, h: int, block: bool, ue8m0: bool, seed: int):
    """Random experts drawn and quantized on the device a few at a time (the fp32 masters
    of 256 DeepSeek-V3 experts would not fit)."""
    from moe_backend.quant import fp8

    dev = torch.device(DEVICE)
    g = torch.Generator(device=dev).manual_seed(seed)
    q13 = torch.empty(e, 2 * i, h, dtype=fp8.FP8_DTYPE, device=dev)
    q2 = torch.empty(e, h, i, dtype=fp8.FP8_DTYPE, device=dev)
    s13 = torch.empty((e, 2 * i // 128, h // 128) if block else (e,), device=dev)
    s2 = torch.empty((e, h // 128, i // 128) if block else (e,), device=dev)
    quant = fp8.quantize_fp8_block if block else fp8.quantize_fp8_per_tensor
    for lo in range(0, e, 8):
        hi = min(e, lo + 8)
        w13 = torch.randn(hi - lo, 2 * i, h, generator=g, device=dev) / h**0.5
        w2 = torch.randn(hi - lo, h, i, generator=g, device=dev) / i**0.5
        (q13[lo:hi], s13[lo:hi]), (q2[lo:hi], s2[lo:hi]) = quant(w13), quant(w2)
    if block:
        return FP8BlockWeights(q13, s13, q2, s2, ue8m0)
    return FP8TensorWeights(q13, s13, q2, s2)


def make_problem(
    t: int,
    h: int,
    i: int,
    e: int,
    k: int,
    *,
    block: bool,
    offset: int = 0,
    static: bool = False,
    ue8m0: bool = False,
    invalid: bool = True,
    one_expert: bool = False,
    seed: int = 0,
) -> Problem:
    """Random non-zero inputs; ids drawn from a global range wider than the local experts."""
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(DEVICE)
    hidden = torch.randn(t, h, generator=g).to(torch.bfloat16)
    weights = _quantized_experts(e, i, h, block, ue8m0, seed)
    if static and not block:
        weights.a13_scale = torch.tensor([hidden.float().abs().max().item() / 448.0], device=dev)
        weights.a2_scale = torch.tensor([4.0 / 448.0], device=dev)
    ids = random_ids(t, k, e, offset, g, invalid=invalid, one_expert=one_expert)
    topk_w = torch.rand(t, k, generator=g) + 0.1
    return Problem(hidden.to(dev), weights, ids.to(dev), topk_w.to(dev), offset)


def check(p: Problem, *, weight_on_input: bool = False, config: Optional[dict] = None) -> float:
    return assert_matches_reference(
        run_fp8_kernel(p, weight_on_input=weight_on_input, config=config), p, weight_on_input, REL_TOL
    )


# ----------------------------------------------------------------------------- alignment
@runs_here
@pytest.mark.parametrize(
    "t,k,e,offset,bm", [(1, 8, 16, 0, 16), (7, 2, 4, 3, 16), (33, 3, 8, 0, 64), (400, 4, 8, 5, 16)]
)
def test_align_groups_pairs_by_expert(t, k, e, offset, bm):
    g = torch.Generator().manual_seed(t)
    ids = torch.randint(-1, offset + e + 2, (t, k), generator=g, dtype=torch.int32).to(DEVICE)
    r = align_block_size(ids, e, offset, bm)
    n = int(r.num_padded)
    flat = ids.flatten().long().cpu()
    local = flat - offset
    valid = (flat >= 0) & (local >= 0) & (local < e)
    rows = r.sorted_ids[:n].cpu().long()
    assert n % bm == 0 and n <= r.max_tiles * bm
    assert sorted(rows[rows < t * k].tolist()) == torch.nonzero(valid).flatten().tolist()
    assert ((rows < t * k) | (rows == t * k)).all()
    for tile in range(n // bm):
        tr = rows[tile * bm : (tile + 1) * bm]
        tr = tr[tr < t * k]
        assert len(tr) > 0 and (local[tr] == int(r.tile_expert[tile])).all()


# ----------------------------------------------------------------------------- interpreter-sized
@runs_here
@pytest.mark.parametrize(
    "config",
    [SWAPAB_SMALL, SWAPAB_PREQ, SWAPAB_EXPERT, SWAPAB_DOWN, DECODE_SMALL, PREFILL_SMALL, DECODE_ALT, PREFILL_ALT],
    ids=["swapab", "swapab-preq", "swapab-expert", "swapab-down", "decode", "prefill", "decode-alt", "prefill-alt"],
)
@pytest.mark.parametrize("t,k,e,offset,ue8m0", [(1, 1, 4, 0, False), (7, 2, 4, 3, False), (17, 3, 6, 0, True)])
def test_block_scaled_small(config, t, k, e, offset, ue8m0):
    check(make_problem(t, 256, 128, e, k, block=True, offset=offset, ue8m0=ue8m0), config=config)


@runs_here
@pytest.mark.parametrize(
    "config",
    [SWAPAB_SMALL, SWAPAB_PREQ, SWAPAB_EXPERT, SWAPAB_DOWN, DECODE_SMALL, PREFILL_SMALL, PREFILL_ALT],
    ids=["swapab", "swapab-preq", "swapab-expert", "swapab-down", "decode", "prefill", "prefill-alt"],
)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("h,i", [(64, 32), (160, 144)])
def test_per_tensor_small(config, static, h, i):
    check(make_problem(5, h, i, 4, 2, block=False, offset=2, static=static), config=config)


@runs_here
@pytest.mark.parametrize(
    "config",
    [SWAPAB_SMALL, SWAPAB_PREQ, SWAPAB_EXPERT, SWAPAB_DOWN, DECODE_SMALL, PREFILL_SMALL],
    ids=["swapab", "swapab-preq", "swapab-expert", "swapab-down", "decode", "prefill"],
)
@pytest.mark.parametrize("block", [True, False], ids=["block", "tensor"])
def test_weight_on_input(config, block):
    check(make_problem(6, 256, 128, 4, 1, block=block, invalid=False), weight_on_input=True, config=config)


@runs_here
@pytest.mark.parametrize(
    "config", [SWAPAB_SMALL, SWAPAB_EXPERT, PREFILL_SMALL], ids=["swapab", "swapab-expert", "prefill"]
)
def test_all_tokens_one_expert_and_no_local_expert(config):
    """40 pairs on one expert: the swap-AB leader loops over 3 chunks of 16."""
    check(make_problem(40, 256, 128, 4, 2, block=True, offset=8, one_expert=True), config=config)
    p = make_problem(5, 256, 128, 4, 2, block=True, offset=100, invalid=False)
    p.ids = torch.full_like(p.ids, -1)
    assert run_fp8_kernel(p, config=config).float().abs().sum() == 0


#: Swap-AB's GEMM2 variants: the bf16 output written by GEMM2 (no cast launch), several w2 tiles a
#: program (H = 256 with 32-row tiles: 8 tiles, so 3 a program leaves a masked tail), both. (The
#: L2 prefetches, ``PREFETCH1`` / ``PREFETCH2``, are hints the interpreter skips: here they only
#: pass through the launcher; the GPU tests run them.)
SWAPAB_FUSED = dict(SWAPAB_SMALL, BLOCK_N2=32, FUSED_CAST2=True)
SWAPAB_TILES = dict(SWAPAB_SMALL, BLOCK_N2=32, N_TILES2=3)


def _swapab_edge_problem(seed: int) -> Problem:
    """8 tokens, k = 3, local experts 4..7 of 8 (EP offset 4): token 0 has no local pair (-1 and
    foreign ids), token 1 names local expert 5 twice, tokens 2..7 put several pairs on expert 4 and
    6 next to -1 and foreign ids."""
    p = make_problem(8, 256, 128, 4, 3, block=True, offset=4, seed=seed)
    p.ids = torch.tensor(
        [[-1, 2, 9], [5, 5, 7], [4, -1, 6], [4, 6, 0], [6, 4, -1], [4, 11, 6], [-1, -1, 4], [6, 7, 4]],
        dtype=torch.int32,
        device=p.ids.device,
    )
    return p


@runs_here
@pytest.mark.parametrize(
    "config",
    [
        SWAPAB_FUSED,
        dict(SWAPAB_FUSED, SPLIT_K2=1),
        dict(SWAPAB_TILES, N_TILES2=2),
        SWAPAB_TILES,
        dict(SWAPAB_FUSED, N_TILES2=3),
        dict(SWAPAB_PREQ, BLOCK_N2=32, FUSED_CAST2=True, N_TILES2=2),
        dict(SWAPAB_PREQ, PREFETCH1=4, PREFETCH2=16),
        dict(SWAPAB_PREQ, WAIT2="expert"),
        dict(SWAPAB_TILES, WAIT2="expert"),
        dict(SWAPAB_PREQ, GRID="experts"),
        dict(SWAPAB_TILES, GRID="experts", WAIT2="expert"),
        dict(SWAPAB_PREQ, UNROLL1=2, UNROLL2=2),
        dict(SWAPAB_TILES, UNROLL1=4, UNROLL2=4),
        SWAPAB_DOWN,
        dict(SWAPAB_DOWN, BLOCK_N2=256, QUANT_ON_LOAD1=True, GRID="experts"),
        dict(SWAPAB_DOWN, BLOCK_N2=32, UNROLL1=2, PDL=True, PREFETCH1=4, PREFETCH2=2),
    ],
    ids=[
        "fused-split2",
        "fused",
        "tiles2",
        "tiles3",
        "fused-tiles3",
        "preq-fused-tiles2",
        "preq-prefetch",
        "preq-expert-wait",
        "tiles3-split2-expert-wait",
        "preq-expert-grid",
        "tiles3-split2-expert-grid-wait",
        "preq-unroll2",
        "tiles3-split2-unroll4",
        "fused-down",
        "fused-down-n256-quant-on-load-expert-grid",
        "fused-down-n32-unroll2-pdl-prefetch",
    ],
)
def test_swapab_gemm2_variants(config):
    """The fused cast, multi-tile GEMM2 programs, GEMM2 waiting per expert and programs per local
    expert (with fewer pairs than experts: per pair), GEMM2 inside GEMM1's programs (w2 tiles
    taller than H, and partial ones) on EP offsets, -1 and foreign ids, a token
    without a local pair (its row must be written: 0), a token naming one expert twice, several
    pairs per expert, two K slices, and BLOCK_T = 16 chunks (24 pairs on one expert)."""
    p = _swapab_edge_problem(0)
    out = run_fp8_kernel(p, config=config)
    assert out[0].float().abs().sum() == 0
    assert_matches_reference(out, p, False, REL_TOL)
    check(make_problem(24, 256, 128, 4, 2, block=True, offset=8, one_expert=True), config=config)
    if config.get("WAIT2") == "expert":  # the cast returned the expert counters to 0
        from moe_backend.runtime import counters

        assert not counters(5, p.hidden.device, "moe_expert_ready").any()
    check(make_problem(5, 160, 144, 4, 2, block=False, offset=2, static=True), config=config)
    check(make_problem(3, 256, 128, 4, 1, block=True, offset=1, seed=1), config=config)


@runs_here
@pytest.mark.parametrize(
    "config",
    [dict(SWAPAB_PREQ, UNROLL1=2, UNROLL2=2), dict(SWAPAB_SMALL, UNROLL1=4, UNROLL2=2)],
    ids=["preq-unroll2", "quant-on-load-unroll4-split2"],
)
def test_swapab_unrolled_loops_iterate(config):
    """Five K blocks in both GEMMs (H = I = 640): GEMM1 three iterations of two blocks (or two of
    four), the last part empty; GEMM2 the same, or with two K slices (three blocks and two)."""
    check(make_problem(4, 640, 640, 4, 2, block=True, offset=1), config=config)
    check(make_problem(3, 640, 640, 4, 2, block=False, offset=0, static=True), config=config)


@runs_here
def test_swapab_fused_cast_writes_zero_rows_without_local_experts():
    p = make_problem(5, 256, 128, 4, 2, block=True, offset=100, invalid=False)
    p.ids = torch.full_like(p.ids, -1)
    assert run_fp8_kernel(p, config=dict(SWAPAB_FUSED, N_TILES2=2)).float().abs().sum() == 0


@runs_here
def test_swapab_refuses_more_pairs_than_it_scans():
    from moe_backend.kernels.sm90.fp8_swapab import MAX_PAIRS

    p = make_problem(MAX_PAIRS // 2 + 1, 256, 128, 4, 2, block=True)
    with pytest.raises(ValueError, match="path='swapab' serves at most"):
        run_fp8_kernel(p, config=SWAPAB_SMALL)
    with pytest.raises(ValueError, match="path must be one of"):
        run_fp8_kernel(p, config=dict(SWAPAB_SMALL, path="fast"))


@runs_here
def test_swapab_refuses_configurations_it_cannot_honour():
    p = make_problem(3, 256, 128, 4, 2, block=True)
    with pytest.raises(ValueError, match="QUANT_OUT1 with dynamic activation scales needs BLOCK_N1 = 128"):
        run_fp8_kernel(p, config=dict(SWAPAB_PREQ, BLOCK_N1=64, QUANT_OUT1=True))
    with pytest.raises(ValueError, match="must divide the weight scale block 128"):
        run_fp8_kernel(p, config=dict(SWAPAB_SMALL, BLOCK_N2=256))
    with pytest.raises(ValueError, match="path='swapab' combines with atomics"):
        run_fp8_kernel(p, config=dict(SWAPAB_SMALL, COMBINE="sum"))
    with pytest.raises(ValueError, match="FUSED_CAST2 needs ZERO='fused'"):
        run_fp8_kernel(p, config=dict(SWAPAB_FUSED, ZERO="sync"))
    with pytest.raises(ValueError, match="FUSED_CAST2 must be a bool"):
        run_fp8_kernel(p, config=dict(SWAPAB_SMALL, FUSED_CAST2=1))
    for tiles in (0, 1.5, True):
        with pytest.raises(ValueError, match="N_TILES2 must be an int >= 1"):
            run_fp8_kernel(p, config=dict(SWAPAB_SMALL, N_TILES2=tiles))
    for name in ("PREFETCH1", "PREFETCH2"):
        for blocks in (3, -1, 32, True, 4.0):
            with pytest.raises(ValueError, match=rf"{name} must be one of \(0, 1, 2, 4, 8, 16\), got {blocks!r}"):
                run_fp8_kernel(p, config={**SWAPAB_SMALL, name: blocks})
    with pytest.raises(ValueError, match="WAIT2 must be 'grid' or 'expert', got 'all'"):
        run_fp8_kernel(p, config=dict(SWAPAB_SMALL, WAIT2="all"))
    with pytest.raises(ValueError, match="GRID must be 'pairs' or 'experts', got 'tokens'"):
        run_fp8_kernel(p, config=dict(SWAPAB_SMALL, GRID="tokens"))
    for name in ("UNROLL1", "UNROLL2"):
        for blocks in (0, 3, 8, True, 2.0):
            with pytest.raises(ValueError, match=rf"{name} must be one of \(1, 2, 4\), got {blocks!r}"):
                run_fp8_kernel(p, config={**SWAPAB_SMALL, name: blocks})
    for knob in (dict(FUSED_CAST2=True), dict(ZERO="sync")):
        with pytest.raises(ValueError, match="WAIT2='expert' needs ZERO='fused' and FUSED_CAST2=False"):
            run_fp8_kernel(p, config=dict(SWAPAB_SMALL, WAIT2="expert", **knob))
    with pytest.raises(ValueError, match="FUSED_DOWN must be a bool, got 1"):
        run_fp8_kernel(p, config=dict(SWAPAB_DOWN, FUSED_DOWN=1))
    for n1 in (64, 256):
        with pytest.raises(
            ValueError, match=rf"BLOCK_N1 must divide 128 \(be 128 with dynamic activation scales\), got {n1}"
        ):
            run_fp8_kernel(p, config=dict(SWAPAB_DOWN, BLOCK_N1=n1))
    for n2 in (96, 384, 0):
        with pytest.raises(ValueError, match=rf"BLOCK_N2 \(w2 rows a tile\) must be a power of two, got {n2}"):
            run_fp8_kernel(p, config=dict(SWAPAB_DOWN, BLOCK_N2=n2))
    for knob in (
        dict(SPLIT_K2=2),
        dict(N_TILES2=2),
        dict(UNROLL2=2),
        dict(WAIT2="expert"),
        dict(FUSED_CAST2=True),
    ):
        with pytest.raises(ValueError, match="FUSED_DOWN has no GEMM2 launch"):
            run_fp8_kernel(p, config=dict(SWAPAB_DOWN, **knob))
    for other in (DECODE_SMALL, PREFILL_SMALL):
        knobs = (
            dict(FUSED_CAST2=True),
            dict(N_TILES2=2),
            dict(PREFETCH1=4),
            dict(PREFETCH2=4),
            dict(WAIT2="expert"),
            dict(GRID="experts"),
            dict(UNROLL1=2),
            dict(UNROLL2=2),
            dict(FUSED_DOWN=True),
        )
        for knob in knobs:
            with pytest.raises(
                ValueError,
                match="FUSED_CAST2, N_TILES2, PREFETCH1, PREFETCH2, WAIT2, GRID, UNROLL1, UNROLL2 and FUSED_DOWN apply",
            ):
                run_fp8_kernel(p, config=dict(other, **knob))


@runs_here
def test_zero_tokens():
    p = make_problem(0, 256, 128, 4, 2, block=True)
    assert run_fp8_kernel(p).shape == (0, 256)


@runs_here
def test_default_config_both_paths():
    """The heuristic picks swap-AB up to the pairs its scan holds while the expected pairs an
    expert stay within one chunk (16) up to 128 pairs and within 8 above (GEMM2 inside GEMM1's
    programs up to 16 pairs), the aligned decode path for at most one row per expert beyond the
    scan, and prefill for more."""
    from moe_backend.kernels.sm90 import default_config

    assert default_config(1, 8, 256)["path"] == "swapab"
    assert default_config(2, 8, 32)["FUSED_DOWN"] and not default_config(3, 8, 256)["FUSED_DOWN"]
    # the fused down loop's w2 prefetch at T=1 only (one wave of GEMM1 programs)
    assert default_config(1, 8, 256)["PREFETCH2"] == 4 and default_config(2, 8, 256)["PREFETCH2"] == 0
    assert default_config(16, 8, 8)["path"] == "swapab"  # 128 pairs, 16 an expert
    assert default_config(17, 8, 8)["path"] == "prefill"
    assert default_config(32, 8, 32)["path"] == "swapab"  # 256 pairs, 8 an expert
    assert default_config(33, 8, 32)["path"] == "prefill"
    assert default_config(128, 8, 256)["path"] == "swapab"  # 1024 pairs: the scan's limit
    assert default_config(129, 8, 256)["path"] == "prefill"
    assert default_config(160, 8, 2048)["path"] == "decode"  # 1280 pairs: past the scan
    assert default_config(8192, 8, 32)["path"] == "prefill"


# ----------------------------------------------------------------------------- vLLM numerics
VLLM_NUMERICS = NUMERICS_CONFIGS["vllm_triton"]


def check_vllm_numerics(p: Problem) -> float:
    """``vllm_triton`` numerics equal vLLM's steps bit for bit; returns the fraction of output
    elements the default numerics leave equal (they round differently)."""
    want = vllm_triton_fused_experts(p.hidden, p.weights, p.ids, p.topk_w, p.offset)
    assert want.float().abs().sum() > 0
    got = run_fp8_kernel(p, config=VLLM_NUMERICS)
    assert torch.equal(got.cpu(), want)
    accurate = run_fp8_kernel(p, config=dict(VLLM_NUMERICS, NUMERICS="accurate"))
    return (accurate.cpu() == want).float().mean().item()


@pytest.mark.skipif(
    not INTERPRET,
    reason="the float64 model of vLLM's steps holds under the interpreter; on a GPU "
    "(fewer-bit FP8 wgmma accumulation) scripts/vllm_layer_compare.py checks against vLLM itself",
)
@pytest.mark.parametrize("t,k,e,offset", [(1, 1, 4, 0), (5, 4, 6, 2), (9, 8, 12, 0), (70, 3, 5, 1)])
def test_vllm_triton_numerics_match_vllms_steps_bit_for_bit(t, k, e, offset):
    """Both scaling orders (T <= 64 and T > 64), EP offsets and ids outside the local range."""
    p = make_problem(t, 256, 256, e, k, block=True, offset=offset, invalid=t > 1, seed=t)
    assert check_vllm_numerics(p) < 0.9


@runs_here
def test_vllm_triton_numerics_refuse_what_vllm_does_not_compute():
    p = make_problem(3, 256, 256, 4, 2, block=False)
    with pytest.raises(ValueError, match="needs FP8 block-scale weights"):
        run_fp8_kernel(p, config=VLLM_NUMERICS)
    p = make_problem(3, 256, 256, 4, 2, block=True, ue8m0=True)
    with pytest.raises(ValueError, match="no ue8m0"):
        run_fp8_kernel(p, config=VLLM_NUMERICS)
    p = make_problem(3, 256, 256, 4, 2, block=True)
    with pytest.raises(ValueError, match="needs FP8 block-scale weights"):
        run_fp8_kernel(p, config=VLLM_NUMERICS, weight_on_input=True)
    with pytest.raises(ValueError, match="needs path='prefill', COMBINE='sum'"):
        run_fp8_kernel(p, config=dict(VLLM_NUMERICS, COMBINE="atomic"))
    with pytest.raises(ValueError, match="BLOCK_M >= 64"):
        run_fp8_kernel(p, config=dict(VLLM_NUMERICS, BLOCK_M=16))
    with pytest.raises(ValueError, match="NUMERICS must be one of"):
        run_fp8_kernel(p, config=dict(VLLM_NUMERICS, NUMERICS="fast"))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "variant",
    [dict(COMBINE="atomic", SPLIT_K2=2), dict(COMBINE="sum", SPLIT_K2=1), dict(QUANT_ON_LOAD1=False)],
    ids=["atomic", "sum", "prequant"],
)
@pytest.mark.parametrize("t,e,path", [(3, 256, "decode"), (700, 32, "prefill")])
def test_gpu_config_variants(variant, t, e, path):
    """Knobs of the aligned paths (the swap-AB path, T=3's default, refuses COMBINE='sum')."""
    check(make_problem(t, 7168, 512, e, 8, block=True, offset=4), config=dict(variant, path=path))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [
        {},
        dict(BLOCK_N1=64, BLOCK_N2=128, num_warps1=8, num_warps2=8, QUANT_OUT1=False),
        dict(SPLIT_K2=2, PDL=True),
        dict(QUANT_ON_LOAD1=False, QUANT_OUT1=True, BLOCK_N1=128, num_warps1=8, PDL=True),
        dict(FUSED_CAST2=True, **PAIRS_GRID),
        dict(N_TILES2=2),
        dict(N_TILES2=3, BLOCK_N2=64, num_warps2=4),
        dict(FUSED_CAST2=True, N_TILES2=4, **PAIRS_GRID),
        dict(FUSED_CAST2=True, SPLIT_K2=2, N_TILES2=3, **PAIRS_GRID),
        dict(PREFETCH2=0),
        dict(PREFETCH2=16),
        dict(PREFETCH2=4, SPLIT_K2=2, N_TILES2=3, BLOCK_N2=64, num_warps2=4),
        dict(PREFETCH1=8),
        dict(PREFETCH1=4, QUANT_ON_LOAD1=True, QUANT_OUT1=False),
        dict(GRID="pairs"),
        dict(QUANT_OUT1=False, BLOCK_N1=64, num_warps1=4, SPLIT_K2=2),
        dict(WAIT2="grid"),
        PAIRS_GRID,
        dict(N_TILES2=3, BLOCK_N2=64, num_warps2=4, **PAIRS_GRID),
        SWAPAB_ONE_BLOCK_CONFIG,
        FUSED_DOWN,
        dict(FUSED_DOWN, BLOCK_N2=256),
        dict(FUSED_DOWN, num_stages2=6, GRID="pairs", PREFETCH1=0),
        dict(FUSED_DOWN, QUANT_ON_LOAD1=True),
        dict(FUSED_DOWN, PREFETCH2=4, BLOCK_N2=64),
        # four 128-wide blocks a stage need 272 KB at two stages (an SM has 227): 64-wide tiles,
        # GEMM1's output in bf16 (its FP8 requantization needs 128-wide tiles)
        dict(
            UNROLL1=4,
            num_stages1=2,
            UNROLL2=4,
            num_stages2=2,
            SPLIT_K2=2,
            QUANT_OUT1=False,
            BLOCK_N1=64,
            num_warps1=4,
            BLOCK_N2=64,
            num_warps2=4,
        ),
    ],
    ids=[
        "default",
        "wide",
        "split-pdl",
        "prequant-pdl",
        "fused",
        "tiles2",
        "tiles3-n64",
        "fused-tiles4",
        "fused-split-tiles3",
        "no-prefetch",
        "prefetch16",
        "prefetch4-split-tiles3",
        "gemm1-prefetch8",
        "gemm1-prefetch4-quant-on-load",
        "expert-wait",
        "expert-wait-grid-fp32-split2",
        "expert-grid",
        "pairs-grid-wait",
        "pairs-grid-wait-tiles3",
        "one-block",
        "fused-down",
        "fused-down-n256",
        "fused-down-s6-pairs-grid-no-prefetch",
        "fused-down-quant-on-load",
        "fused-down-w2-prefetch4-n64",
        "unroll4-n64-bf16-split2",
    ],
)
@pytest.mark.parametrize(
    "t,e,offset,block",
    [
        (1, 256, 0, True),
        (3, 32, 64, True),
        (16, 256, 0, True),
        (64, 32, 0, True),
        (100, 16, 8, True),
        (2, 32, 0, False),
        (16, 32, 4, False),
    ],
)
def test_gpu_swapab(config, t, e, offset, block):
    """The swap-AB decode path at DeepSeek-V3 widths: EP offsets, foreign and -1 ids, several
    pairs per expert (T=64 E=32: 16 each; T=100 E=16: 50, three chunks)."""
    from moe_backend.kernels.sm90.fp8_moe import SWAPAB_CONFIG

    p = make_problem(t, 7168, 2048, e, 8, block=block, offset=offset, static=not block and t % 2 == 0)
    check(p, config=dict(SWAPAB_CONFIG, **config))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "variant",
    [
        dict(FUSED_CAST2=True, SPLIT_K2=2, **PAIRS_GRID),
        dict(FUSED_CAST2=True, N_TILES2=4, **PAIRS_GRID),
        dict(GRID="pairs"),
        {},
        dict(SPLIT_K2=2, N_TILES2=3),
        FUSED_DOWN,
    ],
    ids=[
        "fused-split2",
        "fused-tiles4",
        "expert-wait",
        "expert-wait-grid",
        "expert-wait-grid-split2-tiles3",
        "fused-down",
    ],
)
def test_gpu_gemm2_synchronization_has_no_race(variant):
    """GEMM2's own synchronization against the plain launches, 300 runs: the fused cast's
    arrival counts (a missed or early arrival shows as a row segment with a missing
    contribution), the per-expert waits on GEMM1 (an early start reads a stale ``y``) and the
    fused down projection's wait on act_quant's zeroing (an early add is lost).
    Every element within 1% (plus 0.1% of the largest) of the plain result, which the atomic
    order moves by a bf16 rounding at most."""
    from moe_backend.kernels.sm90.fp8_moe import SWAPAB_CONFIG

    for seed in range(3):
        p = make_problem(16, 7168, 2048, 32, 8, block=True, invalid=seed == 2, seed=seed)
        want = run_fp8_kernel(p, config=dict(SWAPAB_CONFIG, **PAIRS_GRID)).float()
        bound = 1e-2 * want.abs() + 1e-3 * want.abs().max()
        for _ in range(100):
            got = run_fp8_kernel(p, config=dict(SWAPAB_CONFIG, **variant)).float()
            assert ((got - want).abs() <= bound).all()


# ----------------------------------------------------------------------------- GPU
GPU_CASES = [
    # t, h, i, e, k, block, offset
    (1, 7168, 2048, 256, 8, True, 0),
    (2, 7168, 2048, 32, 8, True, 64),
    (3, 7168, 256, 8, 2, True, 0),
    (16, 7168, 2048, 32, 8, True, 0),
    (33, 7168, 512, 32, 8, True, 32),
    (128, 7168, 1024, 256, 8, True, 0),
    (1000, 7168, 512, 32, 8, True, 0),
    (4096, 7168, 256, 8, 2, True, 0),
    (8192, 7168, 2048, 32, 8, True, 0),
    (7, 7168, 2048, 8, 1, False, 0),
    (128, 7168, 512, 32, 8, False, 16),
    (4096, 7168, 256, 8, 2, False, 0),
    (9, 384, 272, 5, 3, False, 1),  # odd per-tensor shapes: partial 128-groups
    (37, 1152, 384, 7, 2, True, 3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("t,h,i,e,k,block,offset", GPU_CASES)
def test_gpu_matches_reference(t, h, i, e, k, block, offset):
    p = make_problem(
        t, h, i, e, k, block=block, offset=offset, static=not block and t % 2 == 0, ue8m0=block and t % 2 == 1
    )
    check(p)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [4096, 16])
def test_gpu_one_expert(t):
    check(make_problem(t, 7168, 512, 32, 8, block=True, one_expert=True))


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["random", "power_of_two"])
@pytest.mark.parametrize("t", [4096, 16])
def test_gpu_weight_on_input_at_deepseek_width(t, weights):
    """Router weights that are not powers of two make ``x * w`` inexact and put many quantization
    quotients within an ulp of an e4m3 rounding tie, where the kernels' and the reference's
    quantizers must round alike. With Triton's plain ``/`` the layer was 1.2e-2 to 1.7e-2 away at
    H=7168 on the H200, five times its error with the same weights on the output; the rounding
    of the FP8 intermediate's requantization (3-4e-3 on the prefill and swap-AB paths at this
    width, 1e-5 on the decode path) stays, so the bound is the output-side error's."""
    p = make_problem(t, 7168, 512, 32, 1, block=True, invalid=False)
    if weights == "power_of_two":
        p.topk_w.copy_(torch.exp2(torch.round(torch.log2(p.topk_w))))
    on_output = check(p)
    assert check(p, weight_on_input=True) < 1.5 * on_output + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 2048])
def test_gpu_cuda_graph_replay_and_no_sync(t):
    """Capture at one size, replay with new data in the same buffers: equals eager."""
    p = make_problem(t, 7168, 512, 32, 8, block=True)
    out = torch.empty(t, 7168, dtype=torch.bfloat16, device="cuda")

    def call():
        return call_fp8_kernel(p, out)

    call()  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    fresh = make_problem(t, 7168, 512, 32, 8, block=True, seed=1)
    p.hidden.copy_(fresh.hidden)
    p.ids.copy_(fresh.ids)
    p.topk_w.copy_(fresh.topk_w)
    graph.replay()
    replayed = out.clone()
    eager = call().clone()
    assert ((replayed.float() - eager.float()).norm() / eager.float().norm()).item() < 1e-3


@runs_here
@pytest.mark.parametrize("zero", ["sync", "stream"])
@pytest.mark.parametrize("path", ["swapab", "decode", "swapab-fused-down"])
def test_zeroing_modes_of_the_atomic_combine(zero, path):
    """Every zeroing mode leaves the same result on both atomic paths (CPU: 'stream' falls back
    to 'sync')."""
    p = make_problem(9, 256, 128, 4, 2, block=True, offset=1)
    base = {"swapab": SWAPAB_SMALL, "decode": DECODE_SMALL, "swapab-fused-down": SWAPAB_DOWN}[path]
    check(p, config=dict(base, COMBINE="atomic", ZERO=zero))


@runs_here
@pytest.mark.parametrize("quant_on_load", [False, True], ids=["act-quant-zeroes", "memset"])
def test_swapab_fused_down_zeroes_the_accumulator_before_adding(quant_on_load):
    """GEMM2 inside GEMM1's programs adds into an accumulator that a launch before GEMM1 zeroed
    (act_quant's, or a memset): a second call on the same workspace with other inputs must not
    carry the first call's sums."""
    config = dict(SWAPAB_DOWN, QUANT_ON_LOAD1=quant_on_load)
    check(make_problem(6, 256, 128, 4, 2, block=True, offset=0, seed=3), config=config)
    check(make_problem(6, 256, 128, 4, 2, block=True, offset=0, seed=4), config=config)


@pytest.mark.gpu
def test_gpu_stream_zeroing_over_thousands_of_random_sizes():
    """The auxiliary-stream zeroing of only the active rows gives the single-stream result of the
    same size (both the swap-AB sizes, T * k <= 128, and the aligned ones)."""
    p = make_problem(64, 1024, 256, 16, 8, block=True, invalid=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1000):
        t = int(torch.randint(1, 65, (1,), generator=gen))
        q = Problem(p.hidden[:t], p.weights, p.ids[:t].contiguous(), p.topk_w[:t].contiguous(), p.offset)
        # the swap-AB default's per-expert wait counts GEMM1's own zeroing: it waits for the grid here
        want = run_fp8_kernel(q, config={"COMBINE": "atomic", "ZERO": "sync", "WAIT2": "grid"}).float()
        got = run_fp8_kernel(q, config={"COMBINE": "atomic", "ZERO": "stream", "WAIT2": "grid"}).float()
        assert ((got - want).norm() / want.norm()).item() < 1e-3
