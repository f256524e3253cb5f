"""The bf16 grouped-GEMM prefill kernel (QuACK varlen-M, CuTe DSL) on the GPU, bf16 and NVFP4
experts, against the torch reference with the same quantization: shapes and edge cases as for the
Triton kernels (T = 0 and 1, odd sizes, EP offsets, ids of other ranks, -1), every tile
configuration, CUDA-graph replay and the layer's warm-up. Skipped without a GPU or without the
``cute`` extra (nvidia-cutlass-dsl, quack-kernels)."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from moe_checks import CUDA, REL_TOL, Problem, assert_matches_reference, random_ids, run_poisoned

from moe_backend.expert_weights import BF16Weights, NVFP4Weights
from moe_backend.kernels.reference import reference_fused_experts

if CUDA:
    from moe_backend.kernels.sm90.cute_env import quack_unavailable_reason

    _REASON = quack_unavailable_reason()
else:
    _REASON = "needs a CUDA GPU"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

PRECISIONS = {"bf16": BF16Weights, "nvfp4": NVFP4Weights}


def make_problem(
    precision: str,
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
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(torch.bfloat16)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, generator=g) / i**0.5
    weights = PRECISIONS[precision].quantize(w13.cuda(), w2.cuda())
    ids = random_ids(t, k, e, offset, g, invalid=invalid, one_expert=one_expert)
    topk_w = torch.rand(t, k, generator=g) + 0.1
    return Problem(hidden.cuda(), weights, ids.cuda(), topk_w.cuda(), offset)


def run_kernel(p: Problem, config: Optional[dict] = None) -> torch.Tensor:
    from moe_backend.kernels.sm90.bf16_moe import fused_experts_grouped, prepare_grouped

    return run_poisoned(
        lambda out: fused_experts_grouped(
            p.hidden,
            prepare_grouped(p.weights),
            p.ids,
            p.topk_w,
            local_expert_offset=p.offset,
            apply_router_weight_on_input=False,
            out=out,
            config=config,
        ),
        p.hidden,
    )


CASES = [
    (1, 256, 128, 4, 1, 0),
    (1, 7168, 2048, 8, 8, 0),
    (7, 512, 192, 8, 3, 4),
    (33, 1024, 320, 16, 6, 16),
    (200, 2048, 512, 32, 8, 0),
    (1024, 7168, 2048, 32, 8, 32),
]


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("t,h,i,e,k,offset", CASES)
def test_matches_reference(precision, t, h, i, e, k, offset):
    p = make_problem(precision, t, h, i, e, k, offset=offset, invalid=t % 2 == 1, seed=t)
    assert_matches_reference(run_kernel(p), p, False, REL_TOL)


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_every_configuration(precision):
    from moe_backend.kernels.sm90.bf16_moe import CANDIDATE_CONFIGS

    p = make_problem(precision, 300, 1024, 256, 8, 4, offset=2)
    for cfg in CANDIDATE_CONFIGS:
        assert_matches_reference(run_kernel(p, cfg), p, False, REL_TOL)


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_edge_routing(precision):
    p = make_problem(precision, 40, 512, 128, 4, 3, one_expert=True)
    assert_matches_reference(run_kernel(p), p, False, REL_TOL)
    p.ids.fill_(-1)
    assert torch.equal(run_kernel(p), torch.zeros_like(p.hidden))
    p = make_problem(precision, 0, 512, 128, 4, 2)
    assert run_kernel(p).shape == (0, 512)


def test_weight_on_input_is_refused():
    from moe_backend.kernels.sm90.bf16_moe import fused_experts_grouped, prepare_grouped

    p = make_problem("bf16", 4, 256, 128, 4, 2)
    out = torch.empty_like(p.hidden)
    with pytest.raises(ValueError, match="apply_router_weight_on_input"):
        fused_experts_grouped(
            p.hidden,
            prepare_grouped(p.weights),
            p.ids,
            p.topk_w,
            local_expert_offset=0,
            apply_router_weight_on_input=True,
            out=out,
        )


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_cuda_graph_replay_equals_eager(precision):
    from moe_backend.kernels.sm90.bf16_moe import fused_experts_grouped, prepare_grouped

    p = make_problem(precision, 256, 2048, 512, 16, 8)
    prepared = prepare_grouped(p.weights)
    out = torch.full((300, 2048), float("nan"), dtype=torch.bfloat16, device="cuda")
    kw = dict(local_expert_offset=0, apply_router_weight_on_input=False, out=out)
    fused_experts_grouped(p.hidden, prepared, p.ids, p.topk_w, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_experts_grouped(p.hidden, prepared, p.ids, p.topk_w, **kw)
    q = make_problem(precision, 256, 2048, 512, 16, 8, seed=5)
    p.hidden.copy_(q.hidden)
    p.ids.copy_(q.ids)
    p.topk_w.copy_(q.topk_w)
    graph.replay()
    torch.cuda.synchronize()
    replayed = out[:256].clone()
    eager = fused_experts_grouped(q.hidden, prepared, q.ids, q.topk_w, **kw)
    assert torch.equal(replayed, eager), "graph replay differs from eager"
    ref = reference_fused_experts(q.hidden, p.weights, q.ids, q.topk_w).float()
    assert ((replayed.float() - ref).norm() / ref.norm()).item() <= REL_TOL
    assert torch.isnan(out[256:].float()).all()


def test_missing_plan_inside_capture_is_an_error():
    from moe_backend.kernels.sm90 import bf16_grouped

    x = torch.randn(4, 512, dtype=torch.bfloat16, device="cuda")
    w13 = torch.randn(2, 2 * 96, 512, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0, 2, 4], dtype=torch.int32, device="cuda")
    idx = torch.arange(4, dtype=torch.int32, device="cuda")
    mid = torch.empty(4, 96, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(bf16_grouped.GemmPlanMissingError, match="warm the layer up"):
        with torch.cuda.graph(graph):
            bf16_grouped.gemm1_gated(x, w13, cu, idx, mid, bf16_grouped.TILES[-1])


def test_bf16_layer_selects_it_and_warmup_compiles(tmp_path):
    from moe_backend import BF16MoE, MoEConfig
    from moe_backend.tuning import TuningCache

    p = make_problem("bf16", 64, 1024, 256, 8, 4)
    layer = BF16MoE(p.weights, MoEConfig(num_experts=8, top_k=4))
    assert layer.kernel_name(True) == "sm90_quack_grouped_bf16"
    assert torch.equal(layer.weights.w13, p.weights.w13), "restore must undo the gate/up interleave"
    layer.warmup(64, cache=TuningCache(tmp_path), progress=False)
    got = layer.experts(p.hidden, p.ids, p.topk_w)
    assert_matches_reference(got, p, False, REL_TOL)
