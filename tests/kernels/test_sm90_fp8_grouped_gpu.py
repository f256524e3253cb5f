"""The FP8 block-scale grouped GEMM (CuTe DSL) on the GPU against the float64 reference from the
dequantized operands (rel. err <= 1e-2, expected ~1e-3): segments of 0, 1, odd and large sizes,
DeepSeek-V3 widths (GEMM1 N 4096 K 7168, GEMM2 N 7168 K 2048), every configuration, rows past the
last segment untouched, and CUDA-graph replay bitwise equal to eager. Skipped without a GPU or
without the ``cute`` extra (nvidia-cutlass-dsl, quack-kernels)."""

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
    TILES,
    WIDE_TILES,
    compile_plans,
    grouped_gemm_fp8_block,
    reference_grouped_gemm_fp8_block,
)

#: A bf16 value no correct output row takes (checks that rows past the last segment are not written).
SENTINEL = -12288.0  # exact in bf16


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


def run_case(sizes, n, k, tile, seed=0, tail=0):
    a, a_scale, b, b_scale, cu, out = make_operands(sizes, n, k, seed=seed, tail=tail, device="cuda")
    out.fill_(SENTINEL)
    grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu, out, tile=tile)
    torch.cuda.synchronize()
    want = reference_grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu)
    rows = int(cu[-1])
    assert torch.all(out[rows:] == SENTINEL), "rows past the last segment were written"
    return out[:rows], want[:rows]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize(
    "sizes,tail",
    [
        ([1], 0),
        ([0, 1, 0, 7, 130, 0], 3),
        ([255, 256, 257, 1], 0),
        ([0, 0, 0], 5),
        ([0, 0], 0),
    ],
)
def test_small_widths_every_tile(sizes, tail, tile):
    got, want = run_case(sizes, 384, 512, tile, seed=len(sizes), tail=tail)
    if got.numel():
        assert rel_err(got, want) <= REL_TOL
        # every row, not only the whole: a wrong row scale shows in its own row
        per_row = (got.double() - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30)
        assert float(per_row.max()) <= REL_TOL


@pytest.mark.parametrize("tile", WIDE_TILES)
@pytest.mark.parametrize("sizes,tail", [([1], 0), ([0, 1, 0, 7, 130, 0], 3), ([255, 256, 257, 1], 0), ([0, 0], 2)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_wide_tiles(sizes, tail, tile, out_dtype):
    """The 128 x 256 tiles (two N halves, each with its weight scale block) row by row, with N of
    two wide tiles (each half's scale block must be its own)."""
    a, a_scale, b, b_scale, cu, _ = make_operands(sizes, 512, 384, seed=len(sizes) + 11, tail=tail, device="cuda")
    out = torch.full((a.shape[0], 512), SENTINEL, dtype=out_dtype, device="cuda")
    grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu, out, tile=tile)
    torch.cuda.synchronize()
    rows = int(cu[-1])
    assert torch.all(out[rows:] == SENTINEL), "rows past the last segment were written"
    want = reference_grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu)[:rows]
    if rows:
        per_row = (out[:rows].double() - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30)
        assert float(per_row.max()) <= REL_TOL


@pytest.mark.parametrize("tile", [t for t in TILES if t[4]])
@pytest.mark.parametrize("k", [256, 1280])
def test_overlapping_tiles_at_two_and_ten_k_tiles(k, tile):
    """The overlapping mainloop's shortest form (prologue and tail only) and a loop of four
    unrolled pairs, against the float64 reference row by row."""
    got, want = run_case([1, 130, 0, 64], 256, k, tile, seed=k)
    per_row = (got.double() - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30)
    assert float(per_row.max()) <= REL_TOL


@pytest.mark.parametrize("tile", [TILES[0], TILES[2], WIDE_TILES[1]])
@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)], ids=["gemm1", "gemm2"])
def test_deepseek_widths(n, k, tile):
    got, want = run_case([0, 1, 77, 1000, 0, 333], n, k, tile, seed=n + k, tail=2)
    err = rel_err(got, want)
    assert err <= REL_TOL, err


def test_graph_replay_equals_eager():
    tile = TILES[0]
    a, a_scale, b, b_scale, cu, out = make_operands([5, 0, 300, 64], 512, 1024, seed=7, device="cuda")
    compile_plans(512, 1024, [tile], a.device)
    eager = grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu, out.clone(), tile=tile)
    again = grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu, out.clone(), tile=tile)
    assert torch.equal(eager, again)
    graph_out = torch.full_like(out, SENTINEL)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu, graph_out, tile=tile)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_out, eager)
    # new segment bounds in the same buffers: the replay reads them from the device
    cu.copy_(torch.tensor([0, 100, 100, 369, 369], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    want = reference_grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu)
    assert rel_err(graph_out[:369], want[:369]) <= REL_TOL
