"""The FP8 block-scale grouped GEMM (CuTe DSL) without a GPU: argument validation, the operand
layouts our quantizers produce, the float64 reference against a plain loop, the capture guard,
and the offline sm_90a compile of one configuration."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from fp8_grouped_operands import make_operands

from moe_backend.kernels.sm90 import cute_env, fp8_grouped
from moe_backend.kernels.sm90.bf16_grouped import GemmPlanMissingError
from moe_backend.kernels.sm90.fp8_grouped import (
    BLOCK,
    GATED_TILES,
    TILES,
    WIDE_TILES,
    check_operands,
    check_tile,
    compile_plans,
    gated_gemm1_fp8_block,
    grouped_gemm_fp8_block,
    reference_grouped_gemm_fp8_block,
)
from moe_backend.quant.fp8 import FP8_DTYPE, quantize_fp8_block, quantize_fp8_per_token_group


def _loop_reference(a, a_scale, b, b_scale, cu):
    """Per-element, per-K-block plain loop (float64)."""
    m, k = a.shape
    s, n, _ = b.shape
    out = torch.zeros(m, n, dtype=torch.float64)
    af, bf = a.double(), b.double()
    bounds = cu.tolist()
    for seg in range(s):
        for r in range(bounds[seg], bounds[seg + 1]):
            for c in range(n):
                total = 0.0
                for kb in range(k // BLOCK):
                    ks = slice(kb * BLOCK, (kb + 1) * BLOCK)
                    dot = float((af[r, ks] * bf[seg, c, ks]).sum())
                    total += dot * float(a_scale[r, kb]) * float(b_scale[seg, c // BLOCK, kb])
                out[r, c] = total
    return out


def test_quantizer_layouts_are_the_kernel_operands():
    """The kernel takes the scales exactly as our quantizers lay them out: no preparation."""
    a, a_scale, b, b_scale, cu, out = make_operands([3, 0, 5], 256, 384, tail=2)
    assert check_operands(a, a_scale, b, b_scale, cu, out) == (10, 256, 384, 3)
    assert a_scale.shape == (10, 3) and b_scale.shape == (3, 2, 3)


def test_reference_matches_plain_loop_with_empty_segments_and_tail():
    a, a_scale, b, b_scale, cu, _ = make_operands([2, 0, 1, 3], 256, 256, seed=3, tail=2)
    got = reference_grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu)
    want = _loop_reference(a, a_scale, b, b_scale, cu)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.all(got[6:] == 0)  # rows past the last segment


def test_reference_tracks_the_unquantized_product():
    """Sanity of the quantization itself: the dequantized product is close to the float one."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 256, generator=g), torch.randn(1, 128, 256, generator=g) * 0.05
    a, sa = quantize_fp8_per_token_group(x, BLOCK)
    b, sb = quantize_fp8_block(w, BLOCK)
    got = reference_grouped_gemm_fp8_block(a, sa, b, sb, torch.tensor([0, 9], dtype=torch.int32))
    want = x.double() @ w[0].double().T
    assert (got - want).norm() / want.norm() < 0.05


def test_reference_rejects_bad_bounds():
    a, a_scale, b, b_scale, _, _ = make_operands([2, 2], 128, 128)
    with pytest.raises(ValueError, match="cu_seqlens"):
        reference_grouped_gemm_fp8_block(a, a_scale, b, b_scale, torch.tensor([0, 3, 2], dtype=torch.int32))


def _bad(name, **change):
    ops = dict(zip(("a", "a_scale", "b", "b_scale", "cu_seqlens", "out"), make_operands([1, 2], 256, 256), strict=True))
    ops.update(change)
    return name, ops


BAD = [
    _bad("a", a=torch.zeros(3, 256, dtype=torch.bfloat16)),
    _bad("a", a=torch.zeros(3, 128, dtype=FP8_DTYPE)),
    _bad("b", b=torch.zeros(2, 200, 256, dtype=FP8_DTYPE)),
    _bad("b", b=torch.zeros(256, 256, dtype=FP8_DTYPE)),
    _bad("a_scale", a_scale=torch.ones(3, 1)),
    _bad("a_scale", a_scale=torch.ones(3, 2, dtype=torch.float64)),
    _bad("b_scale", b_scale=torch.ones(2, 2, 1)),
    _bad("cu_seqlens", cu_seqlens=torch.tensor([0, 1, 3])),
    _bad("cu_seqlens", cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)),
    _bad("out", out=torch.empty(3, 256, dtype=torch.float16)),
    _bad("out", out=torch.empty(3, 512, dtype=torch.bfloat16)[:, ::2]),
    _bad("out", out=torch.empty(3, 256, dtype=torch.bfloat16, device="meta")),
    _bad("a", a=torch.zeros(3 * 256 + 1, dtype=FP8_DTYPE)[1:].view(3, 256)),  # misaligned start
    _bad("b"),  # a CPU tensor: the kernel runs on a CUDA device only
]


@pytest.mark.parametrize("name,ops", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_operands_name_the_argument(name, ops):
    with pytest.raises((TypeError, ValueError), match=f"^{name}:"):
        grouped_gemm_fp8_block(**ops)


def _bad_gated(name, **change):
    a, a_scale, w13, w13_scale, cu, _ = make_operands([1, 2], 512, 256)
    ops = dict(a=a, a_scale=a_scale, w13=w13, w13_scale=w13_scale, cu_seqlens=cu)
    ops.update(y=torch.empty(3, 256, dtype=FP8_DTYPE), y_scale=torch.empty(3, 2), tile=GATED_TILES[0])
    ops.update(change)
    return name, ops


BAD_GATED = [
    _bad_gated("a", a=torch.zeros(3, 128, dtype=FP8_DTYPE)),
    _bad_gated("w13", w13=torch.zeros(2, 512, 256, dtype=torch.bfloat16)),
    _bad_gated("w13", w13=torch.zeros(2, 384, 256, dtype=FP8_DTYPE), w13_scale=torch.ones(2, 3, 2)),  # I = 192
    _bad_gated("w13_scale", w13_scale=torch.ones(2, 2, 2)),
    _bad_gated("cu_seqlens", cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)),
    _bad_gated("y", y=torch.empty(3, 256, dtype=torch.bfloat16)),
    _bad_gated("y", y=torch.empty(3, 512, dtype=FP8_DTYPE)),
    _bad_gated("y_scale", y_scale=torch.empty(3, 4)),
    _bad_gated("tile", tile=TILES[0]),
    _bad_gated("w13"),  # a CPU tensor: the kernel runs on a CUDA device only
]


@pytest.mark.parametrize("name,ops", BAD_GATED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_GATED)])
def test_gated_bad_operands_name_the_argument(name, ops):
    with pytest.raises((TypeError, ValueError), match=f"^{name}:"):
        gated_gemm1_fp8_block(**ops)


def test_gated_compile_plans_rejects_widths_and_tiles():
    with pytest.raises(ValueError, match="^n: the gated GEMM1 needs 2I"):
        compile_plans(384, 256, GATED_TILES[:1], torch.device("meta"), FP8_DTYPE)
    with pytest.raises(ValueError, match="^tile:"):
        compile_plans(512, 256, TILES[:1], torch.device("meta"), FP8_DTYPE)


@pytest.mark.parametrize("tile", [(128, 192, 1, True), (64, 128, 2, False), "128x128"])
def test_bad_tile_is_named(tile):
    with pytest.raises(ValueError, match="^tile:"):
        check_tile(tile)
    with pytest.raises(ValueError, match="^tile:"):
        compile_plans(256, 256, [tile], torch.device("meta"))


def test_tiles_are_valid_configurations():
    assert all(check_tile(list(t)) == t for t in TILES)
    assert all(t[1] == BLOCK for t in TILES)  # one weight scale per output tile and K tile
    # the wide tiles: two halves of one weight scale each, for N of whole 256-wide tiles
    assert all(check_tile(t, n=512) == t and t[1] == 2 * BLOCK for t in WIDE_TILES)
    with pytest.raises(ValueError, match=r"^tile: .* is 256 wide and needs N a multiple of 256, got N=384"):
        check_tile(WIDE_TILES[0], n=384)
    with pytest.raises(ValueError, match="^tile: .* needs N a multiple of 256"):
        compile_plans(384, 256, WIDE_TILES[:1], torch.device("meta"))
    with pytest.raises(ValueError, match="^tile: .* needs N a multiple of 256"):
        grouped_gemm_fp8_block(*make_operands([3], 384, 256), tile=WIDE_TILES[0])


@pytest.mark.parametrize("n,k", [(100, 256), (256, 0), (256, 200)])
def test_compile_plans_rejects_widths(n, k):
    with pytest.raises(ValueError, match="^n, k:"):
        compile_plans(n, k, TILES[:1], torch.device("meta"))


def test_no_compile_inside_capture(monkeypatch):
    monkeypatch.setattr(fp8_grouped, "capturing", lambda: True)
    with pytest.raises(GemmPlanMissingError, match="CUDA-graph capture"):
        compile_plans(256, 256, TILES[:1], torch.device("meta"))
    key = fp8_grouped.PlanKey(TILES[0], 256, 256, "cuda:0")
    with pytest.raises(GemmPlanMissingError, match="before this CUDA-graph capture"):
        fp8_grouped._plan(key, torch.device("cuda", 0))


def _cuobjdump():
    """The cuobjdump Triton bundles (CUDA 12.8; it reads sm_90a cubins), or None."""
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def _compile_offline(tmp_path, tile, out_dtype: str = "bfloat16", second_n: int = 384) -> str:
    """Compile ``tile`` storing ``torch.<out_dtype>`` for sm_90a in its own process (the target is
    pinned before CuTe DSL is imported), for (N, K) = (512, 512) and (``second_n``, 1024), keeping
    the PTX and the cubin in ``tmp_path``; return the kernel's PTX."""
    dt = f"torch.{out_dtype}"
    code = (
        "import torch\n"
        "from moe_backend.kernels.sm90.cute_env import pin_offline_arch\n"
        "pin_offline_arch('sm_90a')\n"
        "from moe_backend.kernels.sm90 import fp8_grouped as g\n"
        f"print(g.compile_plans(512, 512, [{tile!r}], torch.device('meta'), {dt}),"
        f" g.compile_plans({second_n}, 1024, [{tile!r}], torch.device('meta'), {dt}), g._compile.cache_info().misses)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CUTE_DSL_ARCH", "QUACK_ARCH")}
    env.update(CUTE_DSL_KEEP="ptx,cubin", CUTE_DSL_DUMP_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["1", "1", "1"]  # two plans, one compilation
    (ptx_file,) = tmp_path.glob("*Fp8BlockGemmSm90*.sm_90a.ptx")
    return ptx_file.read_text()


def _check_mainloop(tmp_path, ptx: str, overlap: bool) -> None:
    """The block-scaled mainloop of a 64-rows-a-warpgroup tile in the PTX and, with Triton's
    cuobjdump, in the cubin kept in ``tmp_path``: 4 FP8 WGMMAs and 64 scaled FMAs per unrolled
    K tile, no local memory, one WGMMA wait per K tile (skips the cubin part without cuobjdump)."""
    waves = 4 if overlap else 1  # K tiles the overlapping loop unrolls: prologue, 2 in the loop, tail
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3") == 4 * waves
    assert ptx.count("fma.rn.f32") >= 64 * waves
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (Triton's bundle) to read the cubin")
    (cubin,) = tmp_path.glob("*Fp8BlockGemmSm90*.sm_90a.cubin")
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    assert sass.count("QGMMA.64x128x32.F32.E4M3.E4M3") == 4 * waves
    assert sass.count("WARPGROUP.DEPBAR") == waves, "ptxas serialized the WGMMAs"
    assert "LDL" not in sass and "STL" not in sass, "the mainloop spills to local memory"


@pytest.mark.skipif(cute_env.quack_unavailable_reason() is not None, reason="needs nvidia-cutlass-dsl and quack")
@pytest.mark.parametrize("tile", [t for t in TILES if t[0] // (1 if t[3] else 2) == 64])
def test_offline_compile_for_sm90a(tmp_path, tile):
    """Each 64-rows-a-warpgroup configuration builds for sm_90a on this CPU and holds the
    block-scaled mainloop: per K tile, 4 FP8 WGMMAs (one m64 atom x 4 k32) and one scaled fp32
    FMA per accumulator element (64), in two accumulators when it overlaps. In the cubin nothing
    spills to local memory (the 128-rows-a-warpgroup tiles do: 370 bytes) and ptxas keeps the
    WGMMAs asynchronous: one wait per K tile, not one per WGMMA (it serializes them, C7514, when
    an accumulator is read while a WGMMA stage stays open). ``moe-backend compile-cute`` builds
    every configuration in CI."""
    _check_mainloop(tmp_path, _compile_offline(tmp_path, tile), overlap=tile[4])


@pytest.mark.skipif(cute_env.quack_unavailable_reason() is not None, reason="needs nvidia-cutlass-dsl and quack")
@pytest.mark.parametrize("tile", [TILES[0], TILES[2]], ids=["plain", "overlap"])
def test_offline_compile_fp32_out_for_sm90a(tmp_path, tile):
    """The fp32-output plan (the layer's GEMM1: gate/up kept in fp32 until the requantization)
    builds for sm_90a with the same mainloop (the bf16 checks above), and its epilogue stores fp32:
    no bf16 conversion of the accumulator (``cvt.rn.bf16x2.f32``) in the kernel."""
    ptx = _compile_offline(tmp_path, tile, "float32")
    assert "cvt.rn.bf16x2.f32" not in ptx
    _check_mainloop(tmp_path, ptx, overlap=tile[4])


@pytest.mark.skipif(cute_env.quack_unavailable_reason() is not None, reason="needs nvidia-cutlass-dsl and quack")
def test_offline_compile_wide_tile_for_sm90a(tmp_path):
    """The 128 x 256 tile (two 128-wide N halves) builds for sm_90a: per K tile 8 FP8 WGMMAs (two
    halves of one m64 atom x 4 k32), one wait per half, 64 scaled FMAs per half, no local memory."""
    ptx = _compile_offline(tmp_path, WIDE_TILES[1], second_n=768)
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3") == 8
    assert ptx.count("fma.rn.f32") >= 128
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (Triton's bundle) to read the cubin")
    (cubin,) = tmp_path.glob("*Fp8*Gemm*Sm90*.sm_90a.cubin")
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    assert sass.count("QGMMA.64x128x32.F32.E4M3.E4M3") == 8
    assert sass.count("WARPGROUP.DEPBAR") == 2, "one WGMMA wait per half"
    assert "LDL" not in sass and "STL" not in sass, "the mainloop spills to local memory"


def test_out_dtype_is_part_of_the_plan():
    key = fp8_grouped.PlanKey(TILES[0], 256, 256, "cuda:0")
    assert key.out_dtype == torch.bfloat16
    assert key != key._replace(out_dtype=torch.float32)
    with pytest.raises(ValueError, match="^out_dtype:"):
        compile_plans(256, 256, TILES[:1], torch.device("meta"), torch.float16)
    ops = make_operands([1, 2], 256, 256)
    assert check_operands(*ops[:5], torch.empty(3, 256)) == (3, 256, 256, 2)  # fp32 out is accepted


def test_overlapping_tiles_need_an_even_k_tile_count():
    tile = next(t for t in TILES if t[4])
    assert [fp8_grouped.serves(tile, k) for k in (128, 256, 384, 7168)] == [False, True, False, True]
    assert all(fp8_grouped.serves(t, 384) for t in TILES if not t[4])
    with pytest.raises(ValueError, match="^tile: .* multiple of 256, got K=384"):
        compile_plans(256, 384, [tile], torch.device("meta"))
    ops = make_operands([3], 256, 384, seed=0)
    with pytest.raises(ValueError, match="^tile: .* multiple of 256"):
        grouped_gemm_fp8_block(*ops, tile=tile)
