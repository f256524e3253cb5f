"""GEMM1 with SiLU-and-mul and the FP8 requantization in its epilogue (``gated_gemm1_fp8_block``)
on the GPU, against the two steps it replaces (the fp32 grouped GEMM, then ``silu_mul_quant``) and
against a float64 reference quantized alike: segments of 0, 1, odd and large sizes, rows past the last segment
untouched, DeepSeek-V3 widths, both configurations, the layer through ``fused_experts_fp8_grouped``,
and CUDA-graph replay bitwise equal to eager. Skipped without a GPU or without the ``cute`` extra."""

from __future__ import annotations

import pytest
import torch
from fp8_grouped_operands import make_operands
from moe_checks import CUDA, REL_TOL

if CUDA:
    from moe_backend.kernels.sm90.cute_env import quack_unavailable_reason

    _REASON = quack_unavailable_reason()
else:
    _REASON = "needs a CUDA GPU"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

from moe_backend.kernels.sm90.fp8_grouped import (  # noqa: E402
    GATED_TILES,
    compile_plans,
    gated_gemm1_fp8_block,
    grouped_gemm_fp8_block,
    reference_grouped_gemm_fp8_block,
)
from moe_backend.kernels.sm90.silu_mul_quant import silu_mul_quant  # noqa: E402
from moe_backend.quant.fp8 import BLOCK, FP8_DTYPE, quantize_fp8_per_token_group  # noqa: E402

#: A code and a scale no written row takes (checks that rows past the last segment stay).
SENTINEL_CODE, SENTINEL_SCALE = 0x7E, -1.0  # 0x7E: e4m3 448 (the clamp never writes NaN)


def gated(sizes, inter, k, tile, seed=0, tail=0):
    """The gated kernel's and the two-step path's ``(y, y_scale)`` and the rows they cover."""
    a, a_scale, w13, w13_scale, cu, _ = make_operands(sizes, 2 * inter, k, seed=seed, tail=tail, device="cuda")
    m = a.shape[0]
    y = torch.full((m, inter), SENTINEL_CODE, dtype=torch.uint8, device="cuda").view(FP8_DTYPE)
    y_scale = torch.full((m, inter // BLOCK), SENTINEL_SCALE, device="cuda")
    gated_gemm1_fp8_block(a, a_scale, w13, w13_scale, cu, y, y_scale, tile=tile)
    gate_up = torch.empty(m, 2 * inter, device="cuda")
    grouped_gemm_fp8_block(a, a_scale, w13, w13_scale, cu, gate_up, tile=(128, 128, 1, False, False))
    y2, s2 = torch.empty_like(y), torch.empty_like(y_scale)
    silu_mul_quant(gate_up, y2, s2)
    torch.cuda.synchronize()
    rows = int(cu[-1])
    assert torch.all(y[rows:].view(torch.uint8) == SENTINEL_CODE), "codes past the last segment were written"
    assert torch.all(y_scale[rows:] == SENTINEL_SCALE), "scales past the last segment were written"
    ref = reference_grouped_gemm_fp8_block(a, a_scale, w13, w13_scale, cu)[:rows]
    g, u = ref[:, :inter], ref[:, inter:]
    v_ref = g * torch.sigmoid(g) * u
    return y[:rows], y_scale[:rows], y2[:rows], s2[:rows], v_ref


def dequant(y, s):
    return y.double() * s.double().repeat_interleave(BLOCK, dim=1)


def check(sizes, inter, k, tile, tail=0):
    y, s, y2, s2, v_ref = gated(sizes, inter, k, tile, tail=tail)
    if y.shape[0] == 0:
        return
    # the same fp32 sums (same promotion order), silu's exp an ulp apart at most: the codes agree
    # but for an e4m3 rounding tie now and then
    codes_differ = (y.view(torch.uint8) != y2.view(torch.uint8)).double().mean().item()
    assert codes_differ < 1e-3, f"{codes_differ:.2e} of the codes differ from the two-step path"
    torch.testing.assert_close(s, s2, rtol=1e-5, atol=0)
    want = dequant(*quantize_fp8_per_token_group(v_ref.float(), BLOCK))
    err = float((dequant(y, s) - want).norm() / want.norm().clamp_min(1e-30))
    assert err < REL_TOL, f"rel. err {err:.2e} against the float64 reference, quantized alike"


@pytest.mark.parametrize("tile", GATED_TILES)
@pytest.mark.parametrize(
    "sizes,tail", [([1], 0), ([0, 1, 0, 7, 130, 0], 3), ([63, 64, 65, 1], 0), ([0, 0, 0], 5), ([0, 0], 0)]
)
def test_small_widths(sizes, tail, tile):
    check(sizes, 256, 384, tile, tail=tail)


@pytest.mark.parametrize("tile", GATED_TILES)
def test_deepseek_widths(tile):
    check([200, 0, 1000, 37], 2048, 7168, tile)


def test_graph_replay_equals_eager():
    tile = GATED_TILES[1]
    a, a_scale, w13, w13_scale, cu, _ = make_operands([100, 3, 250], 512, 1024, seed=3, device="cuda")
    compile_plans(512, 1024, [tile], a.device, FP8_DTYPE)
    m = a.shape[0]
    y, s = torch.empty(m, 256, dtype=FP8_DTYPE, device="cuda"), torch.empty(m, 2, device="cuda")
    gated_gemm1_fp8_block(a, a_scale, w13, w13_scale, cu, y, s, tile=tile)
    eager = (y.clone(), s.clone())
    y.zero_(), s.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gated_gemm1_fp8_block(a, a_scale, w13, w13_scale, cu, y, s, tile=tile)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y.view(torch.uint8), eager[0].view(torch.uint8)) and torch.equal(s, eager[1])


def test_misaligned_y_is_named():
    a, a_scale, w13, w13_scale, cu, _ = make_operands([4], 256, 256, device="cuda")
    y = torch.empty(4 * 128 + 8, dtype=torch.uint8, device="cuda")[8:].view(FP8_DTYPE).view(4, 128)
    s = torch.empty(4, 1, device="cuda")
    with pytest.raises(ValueError, match="y: expected 16-byte aligned"):
        gated_gemm1_fp8_block(a, a_scale, w13, w13_scale, cu, y, s)


def test_bad_tile_is_named():
    a, a_scale, w13, w13_scale, cu, _ = make_operands([4], 256, 256, device="cuda")
    y, s = torch.empty(4, 128, dtype=FP8_DTYPE, device="cuda"), torch.empty(4, 1, device="cuda")
    with pytest.raises(ValueError, match="tile"):
        gated_gemm1_fp8_block(a, a_scale, w13, w13_scale, cu, y, s, tile=(128, 128, 1, False, False))
