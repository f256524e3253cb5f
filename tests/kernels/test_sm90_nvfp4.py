"""SM90 NVFP4 (W4A16) fused-experts Triton kernels against the torch reference.

On a CPU the kernels run under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``)
on tiny shapes (the interpreter rounds fp32 -> bf16 by truncation, so its error is
about twice the GPU's, still well inside the tolerance); the ``gpu`` tests cover
DeepSeek-V3 sizes, the inline-PTX dequantization, CUDA-graph replay and the
loaded size. Every run poisons ``out`` with NaN first: rows ``[:T]`` must all be
written and rows ``>= T`` left untouched.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import triton
import triton.language as tl
from moe_checks import (
    DEVICE,
    INTERPRET,
    REL_TOL,
    Problem,
    assert_matches_reference,
    random_ids,
    run_poisoned,
    runs_here,
)

from moe_backend.expert_weights import NVFP4Weights
from moe_backend.kernels.reference import reference_fused_experts
from moe_backend.kernels.sm90.align import align_block_size
from moe_backend.kernels.sm90.nvfp4_act import align_and_permute, permute_activations
from moe_backend.kernels.sm90.nvfp4_gemm1 import gemm1_nvfp4
from moe_backend.kernels.sm90.nvfp4_gemm2 import gemm2_nvfp4
from moe_backend.kernels.sm90.nvfp4_layout import kernel_k_order, nvfp4_to_kernel_layout, rows_of_blocks
from moe_backend.kernels.sm90.nvfp4_moe import (
    CANDIDATE_CONFIGS,
    DECODE_CONFIG,
    DECODE_PDL_CONFIG,
    DECODE_VARIANTS,
    default_config,
    fused_experts_nvfp4,
    prepare_nvfp4,
)
from moe_backend.kernels.sm90.nvfp4_tile import WEIGHT_RESCALE, dequant_group
from moe_backend.quant.fp8 import FP8_DTYPE
from moe_backend.quant.nvfp4 import dequantize_nvfp4

#: Forced paths with tiny tiles for the interpreter (H, I padded to 256-groups, split-K, GROUP_M).
DECODE_SMALL = dict(path="decode", BLOCK_M=16, BLOCK_N1=16, BLOCK_N2=32, SPLIT_K2=2)
#: The decode main loop's MMA issue modes: Triton's pieces, or each group's MMAs as one warpgroup
#: MMA waited for at once (the default) or under the next group (the same sum under the
#: interpreter: these check the knobs' plumbing; the GPU tests check the builds).
DECODE_LOOP_SMALL = {
    "decode-wgmma-pieces": dict(DECODE_SMALL, WGMMA1="pieces", WGMMA2="pieces"),
    "decode-wgmma-overlap": dict(DECODE_SMALL, WGMMA1="overlap", WGMMA2="overlap"),
}
#: No align/permute launches: each expert's leader pair gathers its pairs (16 at a time).
SWAPAB_SMALL = dict(DECODE_SMALL, path="swapab")
PREFILL_SMALL = dict(
    path="prefill", BLOCK_M=32, BLOCK_N1=32, GROUP_M1=2, BLOCK_N2=32, SPLIT_K2=1, GROUP_M2=2, num_warps1=4, num_warps2=4
)
#: Several 256-K groups a main-loop iteration: with fewer groups than that (or a K slice of one
#: group), the loop's last groups load nothing.
UNROLLED = {
    "decode-unroll2": dict(DECODE_SMALL, UNROLL1=2, UNROLL2=2),
    "swapab-unroll2": dict(SWAPAB_SMALL, UNROLL1=2, UNROLL2=2),
    "prefill-unroll4": dict(PREFILL_SMALL, UNROLL1=4, UNROLL2=4, MAXNREG1=168, MAXNREG2=128),
}


def random_nvfp4(e: int, h: int, i: int, g: torch.Generator, *, up_scale: float = 1.0) -> NVFP4Weights:
    """Random codes and block scales (every code, scales over e4m3's range), distinct gate/up global scales."""

    def part(*shape):
        codes = torch.randint(0, 256, (*shape[:-1], shape[-1] // 2), generator=g, dtype=torch.uint8)
        scales = torch.exp2(torch.rand(*shape[:-1], shape[-1] // 16, generator=g) * 16 - 8).to(FP8_DTYPE)
        return codes, scales

    q13, s13 = part(e, 2 * i, h)
    q2, s2 = part(e, h, i)
    g13 = torch.stack([torch.full((e,), 0.02 / h**0.5), torch.full((e,), up_scale * 0.05 / h**0.5)], 1)
    g2 = torch.rand(e, generator=g) * 0.05 / i**0.5 + 0.01 / i**0.5
    return NVFP4Weights(q13, s13, g13.float(), q2, s2, g2.float())


def make_problem(
    t: int,
    h: int,
    i: int,
    e: int,
    k: int,
    *,
    offset: int = 0,
    invalid: bool = True,
    one_expert: bool = False,
    seed: int = 0,
) -> Problem:
    """Random non-zero inputs; ids drawn from a global range wider than the local experts."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(torch.bfloat16)
    weights = random_nvfp4(e, h, i, g, up_scale=3.0)
    ids = random_ids(t, k, e, offset, g, invalid=invalid, one_expert=one_expert)
    topk_w = torch.rand(t, k, generator=g) + 0.1
    dev = torch.device(DEVICE)
    weights = NVFP4Weights(**{n: x.to(dev) for n, x in weights.tensors().items()})
    return Problem(hidden.to(dev), weights, ids.to(dev), topk_w.to(dev), offset)


def run_kernel(
    p: Problem, *, weight_on_input: bool = False, config: Optional[dict] = None, prepared=None
) -> torch.Tensor:
    return run_poisoned(
        lambda out: fused_experts_nvfp4(
            p.hidden,
            prepared or prepare_nvfp4(p.weights),
            p.ids,
            p.topk_w,
            local_expert_offset=p.offset,
            apply_router_weight_on_input=weight_on_input,
            out=out,
            config=config,
        ),
        p.hidden,
    )


def check(p: Problem, *, weight_on_input: bool = False, config: Optional[dict] = None) -> float:
    return assert_matches_reference(
        run_kernel(p, weight_on_input=weight_on_input, config=config), p, weight_on_input, REL_TOL
    )


# ----------------------------------------------------------------------------- interpreter-sized
@runs_here
@pytest.mark.parametrize(
    "config",
    [DECODE_SMALL, PREFILL_SMALL, SWAPAB_SMALL, *UNROLLED.values(), *DECODE_LOOP_SMALL.values()],
    ids=["decode", "prefill", "swapab", *UNROLLED, *DECODE_LOOP_SMALL],
)
@pytest.mark.parametrize(
    "t,h,i,e,k,offset", [(1, 128, 64, 4, 1, 0), (7, 96, 48, 4, 2, 3), (33, 64, 32, 3, 3, 0), (3, 272, 272, 2, 2, 1)]
)
def test_small(config, t, h, i, e, k, offset):
    check(make_problem(t, h, i, e, k, offset=offset), config=config)


@runs_here
@pytest.mark.parametrize("config", UNROLLED.values(), ids=UNROLLED)
def test_unrolled_loops_iterate(config):
    """Three 256-K groups in both GEMMs (H = I = 608, one K slice): two iterations of two groups,
    the second half-empty (of four: one iteration, a quarter empty). Then two whole groups
    (H = I = 512): with two a loop, every load unmasked along K (``EVEN_K``; four: half empty)."""
    check(make_problem(3, 608, 608, 2, 2, offset=1), config=dict(config, SPLIT_K2=1))
    check(make_problem(3, 512, 512, 2, 2, offset=1), config=dict(config, SPLIT_K2=1))


@runs_here
@pytest.mark.parametrize("config", [DECODE_SMALL, PREFILL_SMALL, SWAPAB_SMALL], ids=["decode", "prefill", "swapab"])
def test_weight_on_input(config):
    check(make_problem(6, 64, 32, 4, 1, invalid=False), weight_on_input=True, config=config)


@runs_here
@pytest.mark.parametrize("config", [PREFILL_SMALL, SWAPAB_SMALL], ids=["prefill", "swapab"])
def test_all_tokens_one_expert_and_no_local_expert(config):
    """40 pairs on one expert (the swap-AB leader loops over 3 chunks of 16); then no local pair."""
    check(make_problem(40, 64, 32, 4, 2, offset=8, one_expert=True), config=config)
    p = make_problem(5, 64, 32, 4, 2, offset=100, invalid=False)
    p.ids = torch.full_like(p.ids, -1)
    assert (
        run_kernel(p, config=dict(config, path="decode" if config is PREFILL_SMALL else "swapab")).float().abs().sum()
        == 0
    )


@runs_here
def test_swapab_refuses_more_pairs_than_it_scans_and_unknown_paths():
    from moe_backend.kernels.sm90.tiles import MAX_GATHER_PAIRS

    p = make_problem(MAX_GATHER_PAIRS // 2 + 1, 64, 32, 4, 2)
    with pytest.raises(ValueError, match="path='swapab' serves at most"):
        run_kernel(p, config=SWAPAB_SMALL)
    with pytest.raises(ValueError, match="path must be one of"):
        run_kernel(p, config=dict(SWAPAB_SMALL, path="fast"))


@runs_here
def test_zero_tokens():
    assert run_kernel(make_problem(0, 64, 32, 4, 2)).shape == (0, 64)


def test_default_config_paths():
    assert default_config(1, 8, 256)["path"] == "decode"
    assert default_config(64, 8, 32)["path"] == "decode"
    assert default_config(8192, 8, 32)["path"] == "prefill"


@pytest.mark.parametrize(
    "tokens, experts, pdl", [(1, 256, True), (8, 256, True), (8, 32, True), (9, 256, False), (16, 32, False)]
)
def test_default_decode_is_programmatic_up_to_64_pairs(tokens, experts, pdl):
    cfg = default_config(tokens, 8, experts)
    assert cfg["path"] == "decode" and cfg["PDL"] is pdl


def test_errors_name_the_argument():
    p = make_problem(2, 64, 32, 2, 2)
    prep = prepare_nvfp4(p.weights)
    out = torch.empty(2, 64, dtype=torch.bfloat16, device=DEVICE)
    kw = dict(local_expert_offset=0, apply_router_weight_on_input=False, out=out)
    with pytest.raises(TypeError, match="hidden"):
        fused_experts_nvfp4(p.hidden.float(), prep, p.ids, p.topk_w, **kw)
    with pytest.raises(TypeError, match="prepared_weights"):
        fused_experts_nvfp4(p.hidden, p.weights, p.ids, p.topk_w, **kw)
    with pytest.raises(TypeError, match="topk_ids"):
        fused_experts_nvfp4(p.hidden, prep, p.ids.long(), p.topk_w, **kw)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w[:, :1], **kw)
    with pytest.raises(ValueError, match="out"):
        fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w, **{**kw, "out": out[:1]})
    with pytest.raises(ValueError, match="local_expert_offset"):
        fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w, **{**kw, "local_expert_offset": -1})
    with pytest.raises(ValueError, match="config"):
        fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w, **kw, config={"BLOCK_Q": 1})
    for key in ("UNROLL1", "UNROLL2"):
        for value in (0, 3, 8, True, 2.0):
            with pytest.raises(ValueError, match=rf"{key} must be one of \(1, 2, 4\), got {value!r}"):
                fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w, **kw, config={key: value})
    for key in ("MAXNREG1", "MAXNREG2"):
        for value in (-1, 16, 256, True, 128.0):
            with pytest.raises(ValueError, match=rf"{key} must be 0 .* or an int from 24 to 255, got {value!r}"):
                fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w, **kw, config={key: value})
    for key in ("WGMMA1", "WGMMA2"):
        for value in ("async", True, None):
            with pytest.raises(
                ValueError, match=rf"{key} must be one of \('pieces', 'sync', 'overlap'\), got {value!r}"
            ):
                fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w, **kw, config={key: value})


# ----------------------------------------------------------------------------- GPU
#: The decode tiling's knobs on the GPU: its bench variants, and two 256-K groups an iteration
#: capped at 128 registers (four programs an SM).
GPU_DECODE_VARIANTS = {
    **DECODE_VARIANTS,
    "unroll2": dict(DECODE_CONFIG, UNROLL1=2, UNROLL2=2, num_stages1=2, num_stages2=2, MAXNREG1=128, MAXNREG2=128),
}
GPU_CASES = [
    # t, h, i, e, k, offset
    (1, 7168, 2048, 256, 8, 0),
    (2, 7168, 2048, 32, 8, 64),
    (3, 7168, 256, 8, 2, 0),
    (7, 7168, 1024, 8, 1, 0),
    (16, 7168, 2048, 32, 8, 0),
    (33, 7168, 512, 32, 8, 32),
    (128, 7168, 1024, 256, 8, 0),
    (1000, 7168, 512, 32, 8, 0),
    (4096, 7168, 256, 8, 2, 0),
    (8192, 7168, 2048, 32, 8, 0),
    (9, 400, 272, 5, 3, 1),  # odd shapes: K tails in both GEMMs
    (37, 1168, 400, 7, 2, 3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("t,h,i,e,k,offset", GPU_CASES)
def test_gpu_matches_reference(t, h, i, e, k, offset):
    check(make_problem(t, h, i, e, k, offset=offset, invalid=t % 2 == 1, seed=t))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "decode_pdl", "decode_unroll2", "prefill", "swapab"])
@pytest.mark.parametrize("t,e,k", [(64, 32, 8), (300, 8, 2)])
def test_gpu_both_paths_and_weight_on_input(path, t, e, k):
    from moe_backend.kernels.sm90.nvfp4_moe import PREFILL_CONFIG, SWAPAB_CONFIG

    cfg = {
        "decode": DECODE_CONFIG,
        "decode_pdl": DECODE_PDL_CONFIG,
        "decode_unroll2": GPU_DECODE_VARIANTS["unroll2"],
        "prefill": PREFILL_CONFIG,
        "swapab": SWAPAB_CONFIG,
    }[path]
    check(make_problem(t, 7168, 512, e, k), config=cfg)
    check(make_problem(t, 7168, 512, e, k, one_expert=True, seed=1), config=cfg, weight_on_input=True)


#: The tuner's candidates on the Triton paths (the grouped path has its own tests below).
TRITON_CANDIDATES = [cfg for cfg in CANDIDATE_CONFIGS if cfg["path"] != "bf16_grouped"]


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(TRITON_CANDIDATES)))
@pytest.mark.parametrize("t,e,k", [(1, 32, 8), (16, 32, 8), (300, 8, 2)])
def test_gpu_tuner_candidates_match_reference(index, t, e, k):
    """Every Triton-path tuner candidate (``nvfp4_moe.CANDIDATE_CONFIGS``: the decode tiling with
    the synchronous MMA issue on 4 and 8 warps, two stages, the prefill tilings) at a decode, a
    mid and a prefill size, with EP-foreign and -1 ids."""
    check(make_problem(t, 7168, 512, e, k, invalid=True, seed=index), config=TRITON_CANDIDATES[index])


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(GPU_DECODE_VARIANTS))
@pytest.mark.parametrize("t,h,i,e,k,offset", [c for c in GPU_CASES if c[0] <= 16])
def test_gpu_decode_variants_match_reference(variant, t, h, i, e, k, offset):
    """The decode variants (``nvfp4_moe.DECODE_VARIANTS``) and two groups an iteration under a
    register cap at the decode sizes, EP offsets, -1 and foreign ids, odd shapes (K tails in both
    GEMMs)."""
    check(make_problem(t, h, i, e, k, offset=offset, invalid=t % 2 == 1, seed=t), config=GPU_DECODE_VARIANTS[variant])


@pytest.mark.gpu
@pytest.mark.parametrize("t,h,i,e,k,offset", [c for c in GPU_CASES if c[0] * c[4] <= 1024])
def test_gpu_swapab_matches_reference(t, h, i, e, k, offset):
    """The swap-AB decode path (PDL on) at DeepSeek-V3 widths, odd shapes, EP offsets, -1 and
    foreign ids, up to 1000 pairs (many chunks of 16 per expert)."""
    from moe_backend.kernels.sm90.nvfp4_moe import SWAPAB_CONFIG

    check(make_problem(t, h, i, e, k, offset=offset, invalid=t % 2 == 1, seed=t), config=SWAPAB_CONFIG)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, R: tl.constexpr, INTERPRET: tl.constexpr):
    r = tl.arange(0, R)[:, None]
    c = tl.arange(0, 16)[None, :]
    w = dequant_group(
        tl.load(w_ptr + r * 32 + c), tl.load(w_ptr + r * 32 + 16 + c), tl.load(s_ptr + r * 16 + c), INTERPRET
    )
    tl.store(out_ptr + r * 256 + tl.arange(0, 256)[None, :], w)


@runs_here
def test_dequant_group_is_exact_in_kernel_order():
    """Group dequantization (inline PTX on a GPU, plain Triton in the interpreter) equals
    ``-code * block_scale * 2**-8`` exactly (``1 / WEIGHT_RESCALE``), in ``kernel_k_order``: every
    code, e4m3 subnormal to max scales, and zero scales."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (32, 128), generator=g, dtype=torch.uint8)
    scales = torch.exp2(torch.rand(32, 16, generator=g) * 17 - 9)
    scales[0, 0] = 448.0
    scales[1, 3] = 0.0
    scales = scales.to(FP8_DTYPE)
    want = -dequantize_nvfp4(codes, scales, torch.tensor(2.0**-8)).to(torch.bfloat16)[:, kernel_k_order()]
    assert WEIGHT_RESCALE == -(2.0**8)
    # As w2 of a layer (H = 32 rows, I = 256): w2's rows keep their natural order.
    k = nvfp4_to_kernel_layout(
        NVFP4Weights(
            torch.zeros(1, 512, 16, dtype=torch.uint8),
            torch.zeros(1, 512, 2).to(FP8_DTYPE),
            torch.ones(1, 2),
            codes[None],
            scales[None],
            torch.ones(1),
        )
    )
    out = torch.empty(32, 256, dtype=torch.bfloat16, device=DEVICE)
    words, codes = rows_of_blocks(k.w2, k.w2_scale, 32)
    _dequant_kernel[(1,)](words[0].to(DEVICE), codes[0].to(DEVICE), out, R=32, INTERPRET=INTERPRET)
    assert torch.equal(out.cpu().float(), want.float())  # exact (-0 and +0 compare equal)


@runs_here
def test_permute_activations_matches_kernel_order():
    """GEMM1's input pass puts each 256-group in ``kernel_k_order`` and zero-pads to Hp."""
    x = torch.randn(3, 300).to(torch.bfloat16).to(DEVICE)
    out = permute_activations(x, 512).cpu()
    padded = torch.zeros(3, 512, dtype=torch.bfloat16)
    padded[:, :300] = x.cpu()
    order = torch.cat([kernel_k_order(), 256 + kernel_k_order()])
    assert torch.equal(out, padded[:, order])


@runs_here
@pytest.mark.parametrize("num_tokens,top_k,num_experts,offset", [(1, 8, 32, 0), (5, 3, 12, 4), (130, 8, 16, 8)])
def test_align_and_permute_matches_both_passes(num_tokens, top_k, num_experts, offset):
    """The one launch (program 0 aligns, the others permute) gives what ``align_block_size`` and
    ``permute_activations`` give separately: -1 ids, ids of other ranks, an EP offset; 1040 pairs
    take the separate passes."""
    g = torch.Generator().manual_seed(num_tokens)
    ids = torch.randint(-1, offset + num_experts + 3, (num_tokens, top_k), generator=g, dtype=torch.int32)
    ids = ids.to(DEVICE)
    x = torch.randn(num_tokens, 300, generator=g).to(torch.bfloat16).to(DEVICE)
    routing, permuted = align_and_permute(ids, num_experts, offset, 16, x, 512)
    permuted = permuted.clone()
    want = align_block_size(ids, num_experts, offset, 16)
    assert torch.equal(permuted, permute_activations(x, 512))
    rows = int(want.num_padded.item())
    assert rows > 0 and int(routing.num_padded.item()) == rows
    assert torch.equal(routing.sorted_ids[:rows], want.sorted_ids[:rows])
    assert torch.equal(routing.tile_expert[: rows // 16], want.tile_expert[: rows // 16])
    assert torch.equal(routing.row_of_pair, want.row_of_pair)
    assert routing.max_tiles == want.max_tiles and routing.block_m == 16


def _decode_gemms(p: Problem, in_rows: bool, **cfg) -> tuple:
    """GEMM1's ``y`` (the rows of the aligned tiles in use; the others are not written) and GEMM2's
    fp32 sums of the aligned decode path, the weights' words and scale codes as prepared (row-blocked)
    or in rows (``nvfp4_layout.rows_of_blocks``)."""
    w = prepare_nvfp4(p.weights)
    w13, s13, w2, s2 = w.w13, w.w13_scale, w.w2, w.w2_scale
    if in_rows:
        (w13, s13), (w2, s2) = rows_of_blocks(w13, s13, w13.shape[1] * 32), rows_of_blocks(w2, s2, w.hidden_size)
    routing, x = align_and_permute(p.ids, w.num_experts, p.offset, 16, p.hidden, w.padded_hidden)
    acc = torch.zeros(p.hidden.shape[0], w.hidden_size, dtype=torch.float32, device=DEVICE)
    common = dict(num_pairs=p.ids.numel(), top_k=p.ids.shape[1], weight_on_input=False, GROUP_M=1, num_warps=4)
    y = gemm1_nvfp4(x, w13, s13, w.w13_scale_2, routing, p.topk_w, acc, BLOCK_N=16, num_stages=2, **common, **cfg)
    gemm2_nvfp4(y, w2, s2, w.w2_scale_2, routing, p.topk_w, acc, BLOCK_N=32, SPLIT_K=2, num_stages=2, **common, **cfg)
    return y[: int(routing.num_padded.item())].clone(), acc  # y: a workspace the next call reuses


@runs_here
@pytest.mark.parametrize("unroll", [1, 2])
def test_row_blocked_weights_give_the_same_gemms(unroll):
    """Both GEMMs read the row-blocked words and scale codes as they read rows in order: the same
    ``y`` bit for bit and the same sums (two K groups, ten 32-row blocks of ``w2``, gate and up
    rows in different blocks, a split K, -1 ids and an EP offset; on a GPU the atomic adds of the
    split and the top-k may come in another order)."""
    p = make_problem(5, 320, 272, 3, 2, offset=1)
    (y_rows, acc_rows), (y, acc) = _decode_gemms(p, True, unroll=unroll), _decode_gemms(p, False, unroll=unroll)
    assert torch.equal(y, y_rows)
    torch.testing.assert_close(acc, acc_rows, rtol=1e-5, atol=1e-5 * acc_rows.abs().max().item())


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    p = make_problem(16, 7168, 512, 32, 8)
    prep = prepare_nvfp4(p.weights)
    out = torch.full((32, 7168), float("nan"), dtype=torch.bfloat16, device="cuda")
    kw = dict(local_expert_offset=0, apply_router_weight_on_input=False, out=out)
    fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w, **kw)
    q = make_problem(16, 7168, 512, 32, 8, seed=5)
    p.hidden.copy_(q.hidden)
    p.ids.copy_(q.ids)
    p.topk_w.copy_(q.topk_w)
    out[16:].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference_fused_experts(q.hidden, p.weights, q.ids, q.topk_w).float()
    assert ((out[:16].float() - ref).norm() / ref.norm()).item() <= REL_TOL
    assert torch.isnan(out[16:].float()).all()


@pytest.mark.gpu
def test_gpu_loaded_layer_size():
    """A loaded NVFP4 layer occupies <= 0.57 bytes a weight on the GPU (DeepSeek-V3 expert shapes)."""
    from moe_backend import MoEConfig, NVFP4MoE
    from moe_backend.cli.bench import random_nvfp4_weights

    e, h, i = 8, 7168, 2048
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layer = NVFP4MoE(random_nvfp4_weights(e, h, i, torch.device("cuda")), MoEConfig(num_experts=e, top_k=2))
    torch.cuda.synchronize()
    assert layer.kernel_name(True) == "sm90_triton_nvfp4"
    assert (torch.cuda.memory_allocated() - before) / (e * 3 * h * i) <= 0.57


# ----------------------------------------------------------------------------- the bf16_grouped path
@pytest.fixture
def grouped_standins(monkeypatch):
    """The bf16 grouped GEMMs (QuACK, GPU only) replaced by float64 loops with their contract:
    GEMM1 gathers token rows, pairs adjacent columns (even gate, odd up) into bf16 ``silu(g) * u``;
    GEMM2 writes bf16 rows; and nothing stands against the path. Returns the tiles they got."""
    from moe_backend.kernels.sm90 import bf16_grouped, nvfp4_moe

    tiles = []

    def gemm1_gated(x, w13, cu, a_idx, mid, tile):
        tiles.append(tile)
        for s in range(w13.shape[0]):
            lo, hi = int(cu[s]), int(cu[s + 1])
            acc = x[a_idx[lo:hi].long()].double() @ w13[s].double().T
            mid[lo:hi] = (torch.nn.functional.silu(acc[:, 0::2]) * acc[:, 1::2]).to(mid.dtype)
        return mid

    def gemm2(h, w2, cu, out, tile):
        tiles.append(tile)
        for s in range(w2.shape[0]):
            lo, hi = int(cu[s]), int(cu[s + 1])
            out[lo:hi] = (h[lo:hi].double() @ w2[s].double().T).to(out.dtype)
        return out

    monkeypatch.setattr(bf16_grouped, "gemm1_gated", gemm1_gated)
    monkeypatch.setattr(bf16_grouped, "gemm2", gemm2)
    monkeypatch.setattr(nvfp4_moe, "grouped_path_defect", lambda *a, **kw: None)
    return tiles


@runs_here
@pytest.mark.parametrize("t,h,i,e,k,offset", [(1, 128, 64, 4, 1, 0), (7, 96, 48, 4, 2, 3), (9, 272, 272, 3, 2, 1)])
def test_grouped_path_against_reference(grouped_standins, t, h, i, e, k, offset):
    """Kernel-layout weights dequantized into the pool (H, I off the 256 grid: padded groups),
    gate/up interleaved for the gated GEMM, EP offsets, -1 and foreign ids."""
    from moe_backend.kernels.sm90 import bf16_grouped, nvfp4_moe

    check(make_problem(t, h, i, e, k, offset=offset, seed=t + h), config=nvfp4_moe.GROUPED_CONFIG)
    assert grouped_standins == [bf16_grouped.DEFAULT_TILE] * 2


@runs_here
def test_grouped_path_is_the_default_from_its_rows(grouped_standins, monkeypatch):
    from moe_backend.kernels.sm90 import bf16_grouped, nvfp4_moe

    monkeypatch.setattr(nvfp4_moe, "GROUPED_MIN_ROWS", 4)  # tiny shapes under the interpreter
    check(make_problem(8, 128, 64, 4, 2, invalid=False, seed=2))  # 4 rows an expert
    assert grouped_standins == [bf16_grouped.DEFAULT_TILE] * 2
    grouped_standins.clear()
    check(make_problem(7, 128, 64, 4, 2, invalid=False, seed=2))  # fewer: the Triton kernels
    check(make_problem(8, 128, 64, 4, 2, invalid=False, seed=2), config=dict(BLOCK_M=16))  # a Triton knob
    assert grouped_standins == []


def test_grouped_path_configuration_errors(monkeypatch):
    from moe_backend.kernels.sm90 import nvfp4_moe

    with pytest.raises(ValueError, match=r"path='bf16_grouped' reads .* only, got also \['BLOCK_M'\]"):
        nvfp4_moe.resolve_config(dict(path="bf16_grouped", BLOCK_M=16), 8, 8, 4)
    with pytest.raises(ValueError, match="TILE1 and TILE2 apply to path='bf16_grouped' only"):
        nvfp4_moe.resolve_config(dict(path="prefill", TILE2=[128, 128, 1, True]), 8, 8, 4)
    p = make_problem(3, 128, 64, 2, 2, seed=1)
    with pytest.raises(ValueError, match="config: TILE1 must be one of"):
        with monkeypatch.context() as m:
            m.setattr(nvfp4_moe, "grouped_path_defect", lambda *a, **kw: None)
            run_kernel(p, config=dict(path="bf16_grouped", TILE1=[64, 64, 1, True]))
    reason = nvfp4_moe.grouped_path_defect(torch.device("cpu"), False)
    assert "sm_90 GPU" in reason
    # DeepSeek-V3 widths: 256 experts' bf16 copies do not fit the pool's cap, 32 do
    from moe_backend.kernels.sm90.nvfp4_layout import NVFP4KernelWeights

    def shapes(e):
        i32, codes = torch.int32, torch.uint8  # words, scale codes
        return NVFP4KernelWeights(
            torch.empty(e, 128, 28, 32, 32, dtype=i32, device="meta"),
            torch.empty(e, 128, 28, 32, 16, dtype=codes, device="meta"),
            torch.empty(e, 2, device="meta"), torch.empty(e, 224, 8, 32, 32, dtype=i32, device="meta"),
            torch.empty(e, 224, 8, 32, 16, dtype=codes, device="meta"), torch.empty(e, device="meta"), 2048, 7168,
        )  # fmt: skip

    too_big = nvfp4_moe.grouped_pool_defect(shapes(256), 8192 * 8)
    assert "would take 21.0 GiB of the workspace pool (at most 4 GiB)" in too_big
    assert nvfp4_moe.grouped_pool_defect(shapes(256), 40) is None  # 40 active experts at most
    assert nvfp4_moe.grouped_pool_defect(shapes(32), 8192 * 8) is None
    assert "output only" in nvfp4_moe.grouped_path_defect(torch.device("cpu"), True)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="path='bf16_grouped' cannot serve this layer: it needs an sm_90 GPU"):
            run_kernel(p, config=nvfp4_moe.GROUPED_CONFIG)


@pytest.mark.gpu
def test_gpu_grouped_path_and_graph_replay():
    """The real bf16_grouped path (QuACK) from the Triton kernel's prepared weights: DeepSeek-V3
    widths, then an odd shape; a capture after the precompile replays to the eager result."""
    from moe_backend.kernels.sm90 import nvfp4_moe

    reason = nvfp4_moe.grouped_path_defect(torch.device("cuda"), False)
    if reason is not None:
        pytest.skip(reason)
    for t, h, i, e, k, offset in ((300, 7168, 2048, 8, 8, 8), (37, 640, 384, 5, 3, 0)):
        p = make_problem(t, h, i, e, k, offset=offset, seed=t)
        prep = prepare_nvfp4(p.weights)
        assert nvfp4_moe.precompile(prep, [nvfp4_moe.GROUPED_CONFIG]) >= 0
        err = check(p, config=nvfp4_moe.GROUPED_CONFIG)
        print(f"bf16_grouped T={t} H={h} I={i}: rel err {err:.2e}")
    out = torch.full((40, 640), float("nan"), dtype=torch.bfloat16, device="cuda")
    kw = dict(local_expert_offset=0, apply_router_weight_on_input=False, out=out, config=nvfp4_moe.GROUPED_CONFIG)
    eager = fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w, **kw).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_experts_nvfp4(p.hidden, prep, p.ids, p.topk_w, **kw)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[:37], eager) and torch.isnan(out[37:].float()).all()


def test_grouped_precompile_builds_what_the_configurations_can_run(monkeypatch):
    from moe_backend.kernels.sm90 import bf16_grouped, nvfp4_moe

    built = []
    monkeypatch.setattr(bf16_grouped, "compile_plans", lambda h, i, tiles, dev: built.append(tiles) or 2 * len(tiles))
    prep = prepare_nvfp4(make_problem(1, 256, 256, 2, 1).weights)
    monkeypatch.setattr(nvfp4_moe, "grouped_path_defect", lambda *a, **k: "no CuTe DSL here")
    assert nvfp4_moe.precompile(prep, [{}]) == 0 and built == []  # the default cannot take the path
    monkeypatch.setattr(nvfp4_moe, "grouped_path_defect", lambda *a, **k: None)
    assert nvfp4_moe.precompile(prep, [{}, nvfp4_moe.PREFILL_CONFIG]) == 2
    assert built == [(bf16_grouped.DEFAULT_TILE,)]
    built.clear()
    config = dict(nvfp4_moe.GROUPED_CONFIG, TILE2=list(bf16_grouped.TILES[1]))
    assert nvfp4_moe.precompile(prep, [config]) == 4
    assert sorted(built[0]) == sorted([bf16_grouped.DEFAULT_TILE, bf16_grouped.TILES[1]])
