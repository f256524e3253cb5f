"""The grouped-GEMM prefill path's Triton/torch parts, which run on a CPU: the varlen routing
(torch ops), the NVFP4 -> bf16 dequantization of the active experts and the weighted pair combine
(Triton, under ``TRITON_INTERPRET=1``), each against a plain loop."""

from __future__ import annotations

import pytest
import torch
from moe_checks import DEVICE, random_ids, runs_here

from moe_backend.expert_weights import BF16Weights, NVFP4Weights
from moe_backend.kernels.sm90 import bf16_grouped
from moe_backend.kernels.sm90.bf16_grouped import deinterleave_gate_up, interleave_gate_up
from moe_backend.kernels.sm90.bf16_moe import (
    CANDIDATE_CONFIGS,
    DECODE_MAX_ROWS,
    GroupedBF16Weights,
    config_tiles,
    default_config,
    prepare_grouped,
    resolve_config,
    restore_grouped,
)
from moe_backend.kernels.sm90.nvfp4_dequant import dequantize_kernel_layout_segments
from moe_backend.kernels.sm90.nvfp4_layout import NVFP4KernelWeights, nvfp4_to_kernel_layout
from moe_backend.kernels.sm90.pair_combine import weighted_sum_pairs
from moe_backend.kernels.sm90.varlen_routing import num_segments, varlen_routing
from moe_backend.quant.fp8 import FP8_DTYPE
from moe_backend.quant.nvfp4 import dequantize_nvfp4


def _loop_routing(ids: torch.Tensor, e: int, offset: int, compact: bool):
    """Plain-loop expectation: rows per local expert in pair order; segments of active experts."""
    k = ids.shape[1]
    flat = ids.reshape(-1).tolist()
    per_expert = [
        [p for p, x in enumerate(flat) if x >= 0 and offset <= x < offset + e and x - offset == le] for le in range(e)
    ]
    experts = [le for le in range(e) if per_expert[le]] if compact else list(range(e))
    rows = [p for le in experts for p in per_expert[le]]
    s = num_segments(len(flat), e, compact)
    cu = [0]
    for le in experts:
        cu.append(cu[-1] + len(per_expert[le]))
    cu += [cu[-1]] * (s + 1 - len(cu))
    expert_of_segment = experts + [-1] * (s - len(experts))
    row_of_pair = [-1] * len(flat)
    for r, p in enumerate(rows):
        row_of_pair[p] = r
    return cu, expert_of_segment, [p // k for p in rows], row_of_pair, len(rows)


@pytest.mark.parametrize(
    "t,k,e,offset,compact",
    [
        (1, 1, 1, 0, True),
        (1, 4, 8, 0, False),
        (7, 3, 5, 2, True),
        (13, 4, 16, 8, True),
        (13, 4, 16, 8, False),
        (40, 6, 3, 0, True),
        (300, 8, 256, 0, True),  # several chunks of pairs, 256 experts (not all active)
        (200, 8, 32, 32, False),
    ],
)
def test_varlen_routing_matches_loop(t, k, e, offset, compact):
    g = torch.Generator().manual_seed(t * 100 + e)
    ids = random_ids(t, k, e, offset, g)
    r = varlen_routing(ids.to(DEVICE), e, offset, compact)
    cu, eos, tokens, rop, valid = _loop_routing(ids, e, offset, compact)
    assert r.cu_seqlens.dtype == torch.int32 and r.cu_seqlens.tolist() == cu
    assert r.expert_of_segment.tolist() == eos
    assert r.row_of_pair.tolist() == rop
    assert r.token_of_row.tolist()[:valid] == tokens
    assert r.token_of_row.shape == (t * k,) and r.token_of_row.dtype == torch.int32


def test_varlen_routing_all_invalid_gives_empty_segments():
    ids = torch.full((3, 2), -1, dtype=torch.int32, device=DEVICE)
    ids[1, 0] = 99  # another rank's expert
    r = varlen_routing(ids, 4, 0, compact=True)
    assert r.cu_seqlens.tolist() == [0] * 5 and r.expert_of_segment.tolist() == [-1] * 4
    assert r.row_of_pair.tolist() == [-1] * 6


def _random_nvfp4_part(e, n, k, g):
    codes = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)
    scales = torch.exp2(torch.rand(e, n, k // 16, generator=g) * 16 - 8).to(FP8_DTYPE)
    return codes, scales


def _reference_segment(codes, scales, glob, expert: int, interleave: bool) -> torch.Tensor:
    """One expert's matrix from the checkpoint layout (``quant.nvfp4``'s dequantization, each of
    the ``glob.shape[1]`` row blocks with its own global scale); ``interleave``: row 2c the first
    half's row c, row 2c + 1 the second half's."""
    n, groups = codes.shape[1], glob.shape[1]
    rows_per = n // groups
    ref = torch.cat(
        [
            dequantize_nvfp4(
                codes[expert, j * rows_per : (j + 1) * rows_per],
                scales[expert, j * rows_per : (j + 1) * rows_per],
                glob[expert, j],
            )
            for j in range(groups)
        ]
    )
    return torch.stack([ref[: n // 2], ref[n // 2 :]], 1).reshape(n, -1) if interleave else ref


@runs_here
@pytest.mark.parametrize(
    "e,h,i,experts",
    [
        (3, 256, 256, [2, -1, 0]),
        (2, 512, 384, [1, 0]),
        (4, 272, 96, [3, 1, -1, -1]),
        (1, 32, 48, [0]),
        (2, 768, 640, [1, 0]),
    ],
)
def test_kernel_layout_dequantization_matches_reference(e, h, i, experts):
    """The W4A16 kernels' layout dequantizes to the checkpoint's values (I and H not multiples
    of 256: padded groups; an odd number of groups: a program's second group masked; rows of w13
    permuted per 256), gate/up interleaved, each half with its global scale; skipped segments
    untouched."""
    g = torch.Generator().manual_seed(h + i)
    c13, s13 = _random_nvfp4_part(e, 2 * i, h, g)
    c2, s2 = _random_nvfp4_part(e, h, i, g)
    glob13, glob2 = torch.rand(e, 2, generator=g) + 0.5, torch.rand(e, generator=g) + 0.5
    dev = torch.device(DEVICE)
    weights = NVFP4Weights(*(t.to(dev) for t in (c13, s13, glob13, c2, s2, glob2)))
    eos = torch.tensor(experts, dtype=torch.int32, device=dev)
    nan = float("nan")
    w13 = torch.full((len(experts), 2 * i, h), nan, dtype=torch.bfloat16, device=dev)
    w2 = torch.full((len(experts), h, i), nan, dtype=torch.bfloat16, device=dev)
    dequantize_kernel_layout_segments(nvfp4_to_kernel_layout(weights), eos, w13, w2)
    for got, (codes, scales, glob, interleave) in (
        (w13.cpu(), (c13, s13, glob13, True)),
        (w2.cpu(), (c2, s2, glob2.view(-1, 1), False)),
    ):
        for s, ex in enumerate(experts):
            if ex < 0:
                assert torch.isnan(got[s].float()).all(), "a skipped segment was written"
                continue
            ref = _reference_segment(codes, scales, glob, ex, interleave).to(torch.bfloat16).float()
            # code * (block * 2**-8) exact in bf16, then * (global * 2**8) in fp32, rounded once:
            # within one bf16 rounding of the reference, nearly always equal
            diff = (got[s].float() - ref).abs()
            assert torch.all(diff <= ref.abs() * 2**-8), f"segment {s} (expert {ex})"
            assert (diff == 0).float().mean() > 0.999


@runs_here
@pytest.mark.parametrize("t,k,h", [(1, 1, 8), (5, 3, 1030), (9, 8, 64)])
def test_weighted_sum_pairs_matches_loop(t, k, h):
    g = torch.Generator().manual_seed(t * k + h)
    p = t * k
    rows = torch.randn(p + 2, h, generator=g).to(torch.bfloat16)
    row_of_pair = torch.randperm(p, generator=g).to(torch.int32)
    row_of_pair[torch.rand(p, generator=g) < 0.3] = -1
    w = torch.rand(t, k, generator=g)
    out = torch.full((t + 2, h), float("nan"), dtype=torch.bfloat16)
    dev = torch.device(DEVICE)
    out_d = out.to(dev)
    weighted_sum_pairs(rows.to(dev), row_of_pair.to(dev), w.to(dev), out_d[:t])
    got = out_d.cpu()
    ref = torch.zeros(t, h, dtype=torch.float64)
    for tok in range(t):
        for j in range(k):
            r = int(row_of_pair[tok * k + j])
            if r >= 0:
                ref[tok] += float(w[tok, j]) * rows[r].double()
    assert torch.isnan(got[t:].float()).all()
    torch.testing.assert_close(got[:t].double(), ref, rtol=8e-3, atol=1e-6)


def test_config_resolution_and_tiles():
    assert resolve_config(None)["tile1"] == resolve_config({})["tile1"]
    assert resolve_config({"tile1": [128, 256, 2, False]})["tile1"] == (128, 256, 2, False)
    with pytest.raises(ValueError, match="tile2"):
        resolve_config({"tile2": (64, 64, 1, True)})
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_config({"BLOCK_M": 64})
    assert len(config_tiles(CANDIDATE_CONFIGS)) == len(CANDIDATE_CONFIGS)
    # the default depends on the batch: warm-up (None) compiles both defaults' tiles
    both = {bf16_grouped.DEFAULT_TILE, bf16_grouped.DECODE_TILE}
    assert set(config_tiles([None])) == both
    assert set(config_tiles([{"tile1": bf16_grouped.TILES[1]}])) == both | {bf16_grouped.TILES[1]}
    assert resolve_config(None, default_config(1, 8, 32))["tile2"] == bf16_grouped.DECODE_TILE


@pytest.mark.parametrize(
    "t, k, e, decode", [(1, 8, 256, True), (256, 8, 32, True), (257, 8, 32, False), (8192, 8, 256, False)]
)
def test_default_config_by_rows_per_expert(t, k, e, decode):
    assert (t * k / e <= DECODE_MAX_ROWS) == decode
    tile = bf16_grouped.DECODE_TILE if decode else bf16_grouped.DEFAULT_TILE
    assert default_config(t, k, e) == {"tile1": tile, "tile2": tile}


def test_gate_up_interleave_and_prepare_restore():
    g = torch.Generator().manual_seed(3)
    w13 = torch.randn(2, 6, 4, generator=g)
    inter = interleave_gate_up(w13)
    for c in range(3):
        assert torch.equal(inter[:, 2 * c], w13[:, c]) and torch.equal(inter[:, 2 * c + 1], w13[:, 3 + c])
    assert torch.equal(deinterleave_gate_up(inter), w13)
    weights = BF16Weights.quantize(torch.randn(2, 32, 48, generator=g), torch.randn(2, 48, 16, generator=g))
    prepared = prepare_grouped(weights)
    assert isinstance(prepared, GroupedBF16Weights) and prepared.intermediate_size == 16
    back = restore_grouped(prepared)
    assert torch.equal(back.w13, weights.w13) and torch.equal(back.w2, weights.w2)
    nvfp4 = NVFP4Weights.quantize(torch.randn(2, 32, 48, generator=g), torch.randn(2, 48, 16, generator=g))
    kernel_layout = prepare_grouped(nvfp4)  # the NVFP4 Triton kernels' layout: one dequantization serves both
    assert isinstance(kernel_layout, NVFP4KernelWeights)
    back4 = restore_grouped(kernel_layout)
    for name in ("w13", "w13_scale", "w13_scale_2", "w2", "w2_scale", "w2_scale_2"):
        assert torch.equal(getattr(back4, name).view(torch.uint8), getattr(nvfp4, name).view(torch.uint8)), name
    with pytest.raises(TypeError, match="weights"):
        prepare_grouped(prepared)


def _gemm1_definition(x, w13, cu, idx, out, tile=None):
    """``bf16_grouped.gemm1_gated``'s documented contract in torch (fp32 sums, one bf16 rounding)."""
    for s in range(w13.shape[0]):
        a, b = int(cu[s]), int(cu[s + 1])
        y = x[idx[a:b].long()].float() @ w13[s].float().T
        out[a:b] = (torch.nn.functional.silu(y[:, 0::2]) * y[:, 1::2]).to(torch.bfloat16)
    return out


def _gemm2_definition(h, w2, cu, out, tile=None):
    """``bf16_grouped.gemm2``'s documented contract in torch."""
    for s in range(w2.shape[0]):
        a, b = int(cu[s]), int(cu[s + 1])
        out[a:b] = (h[a:b].float() @ w2[s].float().T).to(torch.bfloat16)
    return out


@runs_here
@pytest.mark.parametrize("cls", [BF16Weights, NVFP4Weights], ids=["bf16", "nvfp4"])
@pytest.mark.parametrize("t,h,i,e,k,offset", [(1, 64, 32, 4, 1, 0), (9, 128, 48, 6, 3, 2), (0, 64, 32, 3, 2, 0)])
def test_pipeline_around_the_gemm_contracts_matches_reference(monkeypatch, cls, t, h, i, e, k, offset):
    """Routing, gate/up interleave, dequantization and combine agree with the reference when the
    two QuACK GEMMs (GPU only; tested in test_sm90_grouped_gpu.py) compute their documented contract."""
    from moe_backend.kernels.reference import reference_fused_experts
    from moe_backend.kernels.sm90 import bf16_grouped
    from moe_backend.kernels.sm90.bf16_moe import fused_experts_grouped

    monkeypatch.setattr(bf16_grouped, "gemm1_gated", _gemm1_definition)
    monkeypatch.setattr(bf16_grouped, "gemm2", _gemm2_definition)
    g = torch.Generator().manual_seed(t + e)
    dev = torch.device(DEVICE)
    w = cls.quantize(torch.randn(e, 2 * i, h, generator=g) / h**0.5, torch.randn(e, h, i, generator=g) / i**0.5)
    w = cls(**{n: x.to(dev) for n, x in w.tensors().items()})
    x = torch.randn(t, h, generator=g).to(torch.bfloat16).to(dev)
    ids = random_ids(t, k, e, offset, g).to(dev)
    tw = (torch.rand(t, k, generator=g) + 0.1).to(dev)
    out = torch.full((t + 2, h), float("nan"), dtype=torch.bfloat16, device=dev)
    got = fused_experts_grouped(
        x, prepare_grouped(w), ids, tw, local_expert_offset=offset, apply_router_weight_on_input=False, out=out
    )
    assert got.shape == (t, h) and torch.isnan(out[t:].float()).all()
    ref = reference_fused_experts(x, w, ids, tw, local_expert_offset=offset).float()
    none = ref.abs().sum(1) == 0
    assert torch.equal(got.float()[none], ref[none])
    if t:
        assert ((got.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item() <= 1e-2


def test_candidate_configs_survive_the_json_tuning_cache():
    import json

    from moe_backend.tuning.cache import check_config

    for cfg in CANDIDATE_CONFIGS:
        check_config(cfg)
        assert resolve_config(json.loads(json.dumps(cfg))) == resolve_config(cfg)
