"""The FP8 block-scale fused experts through the CuTe DSL grouped GEMM (``fp8_grouped_moe``)
against ``reference_fused_experts`` (rel. err <= 1e-2, expected ~1e-3).

On a CPU (Triton under the interpreter) the CuTe DSL GEMM is replaced by a stand-in built from
``reference_grouped_gemm_fp8_block`` (float64, then the out dtype; rows past the last segment
poisoned with NaN as the real kernel leaves them unwritten), so routing, activation quantization,
gather, SiLU-and-mul requantization and the combine are checked on tiny shapes: EP offsets, -1 and
other ranks' ids, T = 0 and 1, an expert without pairs. The ``gpu`` tests run the real path at
DeepSeek-V3 widths and small odd shapes, and a CUDA-graph replay against eager; they skip without
CUDA or without the ``cute`` extra (nvidia-cutlass-dsl, quack-kernels)."""

from __future__ import annotations

from typing import List

import pytest
import torch
from moe_checks import (
    CUDA,
    DEVICE,
    REL_TOL,
    Problem,
    assert_matches_reference,
    call_fp8_kernel,
    random_ids,
    run_fp8_kernel,
    run_poisoned,
    runs_here,
)

from moe_backend.expert_weights import FP8BlockWeights
from moe_backend.kernels.sm90 import fp8_grouped_moe
from moe_backend.kernels.sm90.fp8_grouped import TILES, check_tile, reference_grouped_gemm_fp8_block
from moe_backend.kernels.sm90.fp8_grouped_moe import fused_experts_fp8_grouped
from moe_backend.kernels.sm90.silu_mul_quant import silu_mul_quant
from moe_backend.quant.fp8 import quantize_fp8_block

if CUDA:
    from moe_backend.kernels.sm90.cute_env import quack_unavailable_reason

    _CUTE_REASON = quack_unavailable_reason()
else:
    _CUTE_REASON = "needs a CUDA GPU"
needs_cute = pytest.mark.skipif(_CUTE_REASON is not None, reason=str(_CUTE_REASON))


def make_weights(e: int, h: int, i: int, seed: int, device: str = DEVICE, ue8m0: bool = False) -> FP8BlockWeights:
    """Random experts quantized on ``device`` a few at a time."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    w13 = torch.empty(e, 2 * i, h, dtype=torch.float8_e4m3fn, device=dev)
    w2 = torch.empty(e, h, i, dtype=torch.float8_e4m3fn, device=dev)
    s13 = torch.empty(e, 2 * i // 128, h // 128, device=dev)
    s2 = torch.empty(e, h // 128, i // 128, device=dev)
    for lo in range(0, e, 8):
        hi = min(e, lo + 8)
        w13[lo:hi], s13[lo:hi] = quantize_fp8_block(torch.randn(hi - lo, 2 * i, h, generator=g, device=dev) / h**0.5)
        w2[lo:hi], s2[lo:hi] = quantize_fp8_block(torch.randn(hi - lo, h, i, generator=g, device=dev) / i**0.5)
    return FP8BlockWeights(w13, s13, w2, s2, ue8m0)


def make_problem(t: int, h: int, i: int, e: int, k: int, *, offset: int, seed: int, empty_expert=None) -> Problem:
    g = torch.Generator().manual_seed(seed)
    ids = random_ids(t, k, e, offset, g)
    if empty_expert is not None:  # no pair for this local expert
        ids[ids == offset + empty_expert] = -1
    hidden = (torch.randn(t, h, generator=g) * (1 + torch.rand(t, 1, generator=g) * 3)).to(torch.bfloat16)
    topk_w = torch.rand(t, k, generator=g)
    dev = torch.device(DEVICE)
    weights = make_weights(e, h, i, seed, DEVICE)
    return Problem(hidden.to(dev), weights, ids.to(dev), topk_w.to(dev), offset)


def run(p: Problem, **kw) -> torch.Tensor:
    return run_poisoned(
        lambda out: fused_experts_fp8_grouped(
            p.hidden, p.weights, p.ids, p.topk_w, local_expert_offset=p.offset, out=out, **kw
        ),
        p.hidden,
    )


@pytest.fixture
def cpu_gemm(monkeypatch) -> List[tuple]:
    """Replace the CuTe DSL GEMM by the float64 reference; returns the log of its calls."""
    calls: List[tuple] = []

    def gemm(a, a_scale, b, b_scale, cu_seqlens, out, *, tile):
        tile = check_tile(tile, a.shape[1])
        ref = reference_grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu_seqlens)
        end = int(cu_seqlens[-1])
        out[:end] = ref[:end].to(out.dtype)
        out[end:] = float("nan")  # the real kernel does not write them: nothing may read them
        calls.append((tuple(b.shape), out.dtype, tile, tuple(cu_seqlens.tolist())))
        return out

    def gated(a, a_scale, w13, w13_scale, cu_seqlens, y, y_scale, *, tile):
        # the float64 GEMM rounded to fp32, then the Triton SiLU-and-mul quantizer: the two steps
        # the gated kernel fuses (its GPU test checks it against them)
        tile = check_tile(tile, gated=True)
        gate_up = torch.full((a.shape[0], w13.shape[1]), float("nan"), device=a.device)
        end = int(cu_seqlens[-1])
        gate_up[:end] = reference_grouped_gemm_fp8_block(a, a_scale, w13, w13_scale, cu_seqlens)[:end].float()
        silu_mul_quant(gate_up, y, y_scale, cu_seqlens[-1:])
        calls.append((tuple(w13.shape), y.dtype, tile, tuple(cu_seqlens.tolist())))
        return y, y_scale

    monkeypatch.setattr(fp8_grouped_moe, "grouped_gemm_fp8_block", gemm)
    monkeypatch.setattr(fp8_grouped_moe, "gated_gemm1_fp8_block", gated)
    return calls


@runs_here
@pytest.mark.parametrize(
    "t,k,e,offset,empty",
    [(1, 2, 4, 0, None), (5, 3, 4, 4, 2), (33, 4, 6, 3, 0), (17, 1, 3, 0, 1), (2, 6, 4, 2, None)],
)
def test_plumbing_against_reference(cpu_gemm, t, k, e, offset, empty):
    p = make_problem(t, 256, 256, e, k, offset=offset, seed=t * 10 + k, empty_expert=empty)
    got = run(p)
    err = assert_matches_reference(got, p, False, REL_TOL)
    assert err < 5e-3, (
        err
    )  # ~3e-3: bf16 rounding of the pair rows, of the output and of the reference's own output (1.6e-3)
    (s1, d1, _, cu1), (s2, d2, _, cu2) = cpu_gemm
    assert s1 == (e, 512, 256) and d1 == torch.float32  # GEMM1 keeps gate/up in fp32
    assert s2 == (e, 256, 256) and d2 == torch.bfloat16
    assert cu1 == cu2 and len(cu1) == e + 1  # one segment per local expert
    if empty is not None:
        assert cu1[empty] == cu1[empty + 1]


@runs_here
def test_overlapping_tiles_and_no_local_pair(cpu_gemm):
    p = make_problem(7, 256, 256, 4, 2, offset=0, seed=5)
    got = run(p, tile1=TILES[2], tile2=TILES[3])
    assert_matches_reference(got, p, False, REL_TOL)
    assert [c[2] for c in cpu_gemm] == [TILES[2], TILES[3]]
    # no pair on this rank: the output is zero
    p.ids.fill_(-1)
    assert torch.all(run(p) == 0)


@runs_here
def test_zero_tokens_and_zero_slots(cpu_gemm):
    p = make_problem(0, 128, 128, 2, 2, offset=0, seed=1)
    assert run(p).shape == (0, 128)
    p = make_problem(3, 128, 128, 2, 2, offset=0, seed=1)
    ids, w = p.ids[:, :0].contiguous(), p.topk_w[:, :0].contiguous()
    out = torch.full((4, 128), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    res = fused_experts_fp8_grouped(p.hidden, p.weights, ids, w, local_expert_offset=0, out=out)
    assert torch.all(res == 0) and torch.isnan(out[3:].float()).all()
    assert cpu_gemm == []


def _bad_cases():
    p = make_problem(3, 256, 128, 2, 2, offset=0, seed=2)
    w = p.weights
    good = dict(
        hidden=p.hidden,
        weights=w,
        topk_ids=p.ids,
        topk_weights=p.topk_w,
        local_expert_offset=0,
        out=torch.empty(3, 256, dtype=torch.bfloat16, device=DEVICE),
    )
    ue8m0 = FP8BlockWeights(w.w13, w.w13_scale, w.w2, w.w2_scale, True)
    return good, [
        ("weights", TypeError, dict(weights=w.w13)),
        ("weights", ValueError, dict(weights=ue8m0)),
        ("hidden", TypeError, dict(hidden=p.hidden.float())),
        ("hidden", ValueError, dict(hidden=p.hidden[:, :128])),
        ("topk_ids", TypeError, dict(topk_ids=p.ids.long())),
        ("topk_ids", ValueError, dict(topk_ids=p.ids[:2])),
        ("topk_weights", TypeError, dict(topk_weights=p.topk_w.double())),
        ("topk_weights", ValueError, dict(topk_weights=p.topk_w[:, :1])),
        ("local_expert_offset", ValueError, dict(local_expert_offset=-1)),
        ("apply_router_weight_on_input", ValueError, dict(apply_router_weight_on_input=True)),
        ("apply_router_weight_on_input", TypeError, dict(apply_router_weight_on_input=1)),
        ("out", ValueError, dict(out=None)),
        ("out", ValueError, dict(out=torch.empty(2, 256, dtype=torch.bfloat16, device=DEVICE))),
        ("out", TypeError, dict(out=torch.empty(3, 256, device=DEVICE))),
        ("tile1", ValueError, dict(tile1=(128, 192, 1, True, False))),
        ("tile2", ValueError, dict(tile2=TILES[2])),  # overlapping, I = 128: one K tile
    ]


@pytest.mark.parametrize("idx", range(16))
def test_bad_inputs_are_named(idx):
    good, cases = _bad_cases()
    name, exc, change = cases[idx]
    args = dict(good)
    args.update(change)
    with pytest.raises(exc, match=f"^{name}:"):
        fused_experts_fp8_grouped(**args)


# ---------------------------------------------------------------- GPU: the real CuTe DSL path


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


@pytest.mark.gpu
@needs_cute
@pytest.mark.parametrize("t", [1, 300, 2048])
def test_deepseek_widths(t):
    p = make_problem(t, 7168, 2048, 32, 8, offset=32, seed=t)
    fp8_grouped_moe.precompile(p.weights)
    got = run(p)
    torch.cuda.synchronize()
    err = assert_matches_reference(got, p, False, REL_TOL)
    print(f"T={t}: rel err {err:.2e}")


@pytest.mark.gpu
@needs_cute
@pytest.mark.parametrize("tiles", [(TILES[0], TILES[0]), (TILES[2], TILES[2]), (TILES[1], TILES[3])])
@pytest.mark.parametrize("t,k,e,offset", [(1, 1, 3, 0), (7, 3, 5, 5), (130, 6, 8, 2), (257, 2, 4, 0)])
def test_small_odd_shapes(t, k, e, offset, tiles):
    p = make_problem(t, 512, 256, e, k, offset=offset, seed=t + k, empty_expert=1)
    got = run(p, tile1=tiles[0], tile2=tiles[1])
    torch.cuda.synchronize()
    assert_matches_reference(got, p, False, REL_TOL)


@pytest.mark.gpu
@needs_cute
def test_graph_replay_equals_eager():
    p = make_problem(96, 1024, 512, 8, 4, offset=0, seed=9)
    fp8_grouped_moe.precompile(p.weights)
    out = torch.empty(100, 1024, dtype=torch.bfloat16, device="cuda")
    eager = fused_experts_fp8_grouped(p.hidden, p.weights, p.ids, p.topk_w, local_expert_offset=0, out=out).clone()
    graph_out = torch.full_like(out, float("nan"))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_experts_fp8_grouped(p.hidden, p.weights, p.ids, p.topk_w, local_expert_offset=0, out=graph_out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_out[:96], eager)
    assert torch.isnan(graph_out[96:].float()).all()
    # new routing in the same buffers: the replay reads it from the device
    g = torch.Generator().manual_seed(10)
    p.ids.copy_(random_ids(96, 4, 8, 0, g))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(graph_out[:96], p, False, REL_TOL)
    assert _rel_err(graph_out[:96], eager) > 0  # it did change


# ----------------------------------------------------------------------------- quantize-and-scatter
@runs_here
@pytest.mark.parametrize("t,k,h", [(1, 1, 128), (5, 3, 384), (9, 4, 200)])
def test_act_quant_scatter_matches_quantize_then_gather(t, k, h):
    """Each pair's row holds its token's codes and scales exactly as ``act_quant_fp8`` then a
    gather would; rows named by no pair (-1 pairs) keep their contents."""
    from moe_backend.kernels.sm90.act_quant import act_quant_fp8, act_quant_scatter_fp8

    g = torch.Generator().manual_seed(t * 100 + k)
    hidden = (torch.randn(t, h, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    p = t * k
    row_of_pair = torch.randperm(p, generator=g).to(torch.int32)
    row_of_pair[::3] = -1  # pairs without a local expert
    q = torch.full((p, h), 7.0, device=DEVICE).to(torch.float8_e4m3fn)
    s = torch.full((p, (h + 127) // 128), -1.0, device=DEVICE)
    act_quant_scatter_fp8(hidden, row_of_pair.to(DEVICE), q, s)
    q_ref, s_ref = act_quant_fp8(hidden, None, False)
    q_ref, s_ref = q_ref.cpu(), s_ref.cpu()
    q, s = q.cpu(), s.cpu()
    for pair, row in enumerate(row_of_pair.tolist()):
        if row >= 0:
            assert torch.equal(q[row].view(torch.uint8), q_ref[pair // k].view(torch.uint8))
            assert torch.equal(s[row], s_ref[pair // k])
    unnamed = sorted(set(range(p)) - set(row_of_pair.tolist()))
    assert torch.all(q[unnamed].float() == 7.0) and torch.all(s[unnamed] == -1.0)


# ----------------------------------------------------------------------------- the FP8 launcher's path
@pytest.fixture
def grouped_ok(monkeypatch):
    """The launcher sees nothing against the grouped path (on a CPU it would: no sm_90 GPU)."""
    from moe_backend.kernels.sm90 import fp8_moe

    monkeypatch.setattr(fp8_moe, "grouped_path_defect", lambda *a, **kw: None)
    return fp8_moe


@runs_here
def test_launcher_default_takes_grouped_path_at_prefill_sizes(cpu_gemm, grouped_ok, monkeypatch):
    fp8_moe = grouped_ok
    monkeypatch.setattr(fp8_moe, "CUTE_GROUPED_MIN_ROWS", 4)  # tiny shapes under the interpreter
    # 8 tokens x top-2 over 4 experts: 4 rows an expert, the threshold; GEMM2 (K = I = 256) on
    # the overlapping tile, which I = 128 cannot take
    p = make_problem(8, 256, 256, 4, 2, offset=1, seed=3)
    assert_matches_reference(run_fp8_kernel(p), p, False, REL_TOL)
    assert [c[2] for c in cpu_gemm] == [TILES[0], fp8_moe.GROUPED_OVERLAP_TILE]
    cpu_gemm.clear()
    p = make_problem(8, 256, 128, 4, 2, offset=1, seed=3)
    assert_matches_reference(run_fp8_kernel(p), p, False, REL_TOL)
    assert [c[2] for c in cpu_gemm] == [TILES[0], TILES[0]]
    # from GROUPED_CLUSTER_MIN_ROWS rows an expert: clusters of two M tiles, overlapping where K
    # has an even number of K tiles (H = 256), plain where not (I = 128); GEMM2 on the wide
    # cluster tile where H has whole 256-wide N tiles (H = 256), else on the 128-wide one (H = 384)
    monkeypatch.setattr(fp8_moe, "GROUPED_CLUSTER_MIN_ROWS", 8)
    monkeypatch.setattr(fp8_moe, "GATED_MIN_ROWS", 2048)
    cpu_gemm.clear()
    p = make_problem(16, 256, 128, 4, 2, offset=1, seed=3)
    assert_matches_reference(run_fp8_kernel(p), p, False, REL_TOL)
    assert [c[2] for c in cpu_gemm] == [fp8_moe.GROUPED_CLUSTER_TILE, fp8_moe.WIDE_CLUSTER_TILE]
    cpu_gemm.clear()
    p = make_problem(16, 384, 128, 4, 2, offset=1, seed=3)
    assert_matches_reference(run_fp8_kernel(p), p, False, REL_TOL)
    assert [c[2] for c in cpu_gemm] == [fp8_moe.GROUPED_CLUSTER_PLAIN_TILE, fp8_moe.GROUPED_CLUSTER_PLAIN_TILE]
    # from GATED_MIN_ROWS: GEMM1 with SiLU-and-mul and the requantization in its epilogue
    monkeypatch.setattr(fp8_moe, "GATED_MIN_ROWS", 8)
    cpu_gemm.clear()
    p = make_problem(16, 256, 128, 4, 2, offset=1, seed=3)
    assert_matches_reference(run_fp8_kernel(p), p, False, REL_TOL)
    assert [c[2] for c in cpu_gemm] == [fp8_moe.GATED_CLUSTER_TILE, fp8_moe.WIDE_CLUSTER_TILE]
    assert cpu_gemm[0][1] == torch.float8_e4m3fn
    # fewer rows an expert, or any override of a Triton knob: the Triton kernels
    cpu_gemm.clear()
    p = make_problem(7, 256, 256, 4, 2, offset=1, seed=3)
    assert_matches_reference(run_fp8_kernel(p), p, False, REL_TOL)
    p = make_problem(8, 256, 256, 4, 2, offset=1, seed=3)
    assert_matches_reference(run_fp8_kernel(p, config={"BLOCK_M": 64}), p, False, REL_TOL)
    assert cpu_gemm == []


@runs_here
def test_launcher_named_grouped_path_and_tiles(cpu_gemm, grouped_ok):
    fp8_moe = grouped_ok
    p = make_problem(5, 256, 256, 3, 2, offset=0, seed=4)
    config = dict(fp8_moe.CUTE_GROUPED_CONFIG, TILE2=list(fp8_moe.GROUPED_OVERLAP_TILE))
    assert_matches_reference(run_fp8_kernel(p, config=config), p, False, REL_TOL)
    assert [c[2] for c in cpu_gemm] == [TILES[0], fp8_moe.GROUPED_OVERLAP_TILE]
    # a gated GEMM1 tile names the fused kernel; I = 128 (one group) and three experts
    cpu_gemm.clear()
    p = make_problem(5, 256, 128, 3, 2, offset=1, seed=5)
    config = dict(fp8_moe.CUTE_GROUPED_CONFIG, TILE1=list(fp8_moe.GATED_CLUSTER_TILE))
    assert_matches_reference(run_fp8_kernel(p, config=config), p, False, REL_TOL)
    assert [c[2] for c in cpu_gemm] == [fp8_moe.GATED_CLUSTER_TILE, TILES[0]]


def test_gated_tile_is_gemm1s_gated_kernel_and_gemm2s_wide_tile():
    from moe_backend.kernels.sm90.fp8_moe import CUTE_GROUPED_CONFIG, GATED_TILE, grouped_tiles

    assert grouped_tiles(dict(CUTE_GROUPED_CONFIG, TILE1=list(GATED_TILE)), 256, 256)[0] == GATED_TILE
    # as TILE2 the same tuple is the wide plain tile, for H of whole 256-wide N tiles
    assert grouped_tiles(dict(CUTE_GROUPED_CONFIG, TILE2=list(GATED_TILE)), 256, 256)[1] == GATED_TILE
    with pytest.raises(ValueError, match=r"config: TILE2: tile: .* needs N a multiple of 256, got N=384"):
        grouped_tiles(dict(CUTE_GROUPED_CONFIG, TILE2=list(GATED_TILE)), 384, 256)
    with pytest.raises(ValueError, match=r"config: TILE2: tile: expected one of"):
        grouped_tiles(dict(CUTE_GROUPED_CONFIG, TILE2=[128, 64, 1, False, False]), 256, 256)
    with pytest.raises(ValueError, match=r"config: TILE1: tile: expected one of .* or one of \(\(128, 256"):
        grouped_tiles(dict(CUTE_GROUPED_CONFIG, TILE1=[128, 64, 1, False, False]), 256, 256)


def test_grouped_path_config_errors():
    from moe_backend.kernels.sm90.fp8_moe import CUTE_GROUPED_CONFIG, resolve_config

    with pytest.raises(ValueError, match=r"reads .* only, got also \['BLOCK_M'\]"):
        resolve_config({"path": "cute_grouped", "BLOCK_M": 16}, 8, 8, 2)
    with pytest.raises(ValueError, match="TILE1 and TILE2 apply to path='cute_grouped' only"):
        resolve_config({"path": "prefill", "TILE1": list(TILES[0])}, 8, 8, 2)
    with pytest.raises(ValueError, match="COMBINE='sum' only"):
        resolve_config(dict(CUTE_GROUPED_CONFIG, COMBINE="atomic"), 8, 8, 2)
    with pytest.raises(ValueError, match="NUMERICS='accurate'"):
        resolve_config(dict(CUTE_GROUPED_CONFIG, NUMERICS="vllm_triton"), 8, 8, 2)


@runs_here
def test_launcher_named_grouped_path_says_why_it_cannot_run(grouped_ok, monkeypatch):
    fp8_moe = grouped_ok
    p = make_problem(3, 256, 128, 2, 2, offset=0, seed=6)
    # I = 128: the overlapping tile needs an even number of K tiles
    with pytest.raises(ValueError, match="config: TILE2: tile: .* needs K a multiple of 256, got K=128"):
        run_fp8_kernel(p, config=dict(fp8_moe.CUTE_GROUPED_CONFIG, TILE2=list(fp8_moe.GROUPED_OVERLAP_TILE)))
    monkeypatch.setattr(fp8_moe, "grouped_path_defect", lambda *a, **kw: "a reason")
    with pytest.raises(ValueError, match="path='cute_grouped' cannot serve this layer: a reason"):
        run_fp8_kernel(p, config=fp8_moe.CUTE_GROUPED_CONFIG)


def test_grouped_path_defects():
    from moe_backend.kernels.sm90.fp8_grouped_moe import grouped_path_defect

    kw = dict(block_scaled=True, static_activation_scales=False, ue8m0=False, apply_router_weight_on_input=False)
    cpu = torch.device("cpu")
    assert "sm_90 GPU" in grouped_path_defect(cpu, **kw)
    assert "block-scale" in grouped_path_defect(cpu, **dict(kw, block_scaled=False))
    assert "static activation" in grouped_path_defect(cpu, **dict(kw, static_activation_scales=True))
    assert "ue8m0" in grouped_path_defect(cpu, **dict(kw, ue8m0=True))
    assert "output only" in grouped_path_defect(cpu, **dict(kw, apply_router_weight_on_input=True))


@pytest.mark.gpu
@needs_cute
def test_layer_serves_prefill_through_grouped_path_and_captures():
    """The FP8 block layer at a prefill size runs the grouped path by default after its warm-up
    precompile, eager and inside a CUDA graph, with the reference's numerics."""
    from moe_backend.kernels.registry import SM90_FP8

    p = make_problem(512, 1024, 512, 4, 8, offset=0, seed=12)  # 1024 rows an expert
    built = SM90_FP8.precompile(p.weights, [{}])
    assert built >= 0
    eager = run_fp8_kernel(p)
    err = assert_matches_reference(eager, p, False, REL_TOL)
    print(f"grouped path through the FP8 launcher: rel err {err:.2e}")
    out = torch.full((512, 1024), float("nan"), dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call_fp8_kernel(p, out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_precompile_builds_what_the_configurations_can_run(monkeypatch):
    """Warm-up builds the default's tiles for an untuned layer (where the path can run) and each
    tuned cute_grouped configuration's, nothing for Triton configurations."""
    from moe_backend.kernels.sm90 import fp8_grouped_moe, fp8_moe

    built = []
    monkeypatch.setattr(fp8_grouped_moe, "compile_grouped_plans", lambda h, i, t1, t2, dev: built.append((t1, t2)) or 2)
    w13 = torch.empty(4, 2 * 512, 256, dtype=torch.float8_e4m3fn)
    w2 = torch.empty(4, 256, 512, dtype=torch.float8_e4m3fn)
    kw = dict(block_scaled=True, a13_scale=None, a2_scale=None, ue8m0=False)
    # on this CPU nothing stands behind the default: it cannot run here
    assert fp8_moe.precompile(w13, w2, [{}], **kw) == 0 and built == []
    monkeypatch.setattr(fp8_moe, "grouped_path_defect", lambda *a, **k: None)
    assert fp8_moe.precompile(w13, w2, [{}, fp8_moe.PREFILL_CONFIG], **kw) == 4
    # I = 512: GEMM2 overlaps; from 256 rows an expert (GATED_MIN_ROWS) GEMM1 gated on the cluster
    # tile, GEMM2 (H = 256) on the wide cluster tile
    wide = fp8_moe.WIDE_CLUSTER_TILE
    assert sorted(built) == sorted([(TILES[0], fp8_moe.GROUPED_OVERLAP_TILE), (fp8_moe.GATED_CLUSTER_TILE, wide)])
    built.clear()
    tuned = [fp8_moe.CUTE_GROUPED_CONFIG, dict(fp8_moe.CUTE_GROUPED_CONFIG, TILE1=list(TILES[1]))]
    assert fp8_moe.precompile(w13, w2, tuned, **kw) == 4
    assert sorted(built) == sorted([(TILES[0], TILES[0]), (TILES[1], TILES[0])])
