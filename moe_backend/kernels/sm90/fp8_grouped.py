"""FP8 block-scale grouped GEMM over variable-length expert segments (CuTe DSL, Hopper sm_90a).

``out[r] = sum_kb (a[r, kb] @ b[s, :, kb]^T) * a_scale[r, kb] * b_scale[s, n // 128, kb]`` for the
rows ``r`` of segment ``s`` (``[cu_seqlens[s], cu_seqlens[s + 1])``), ``kb`` the 128-wide K
blocks: DeepSeek-V3's block scale (1 x 128 activation groups, 128 x 128 weight blocks), as
``kernels/reference.py`` and the Triton kernels compute it. Each 128-K tile's FP8 WGMMA result
(zero-initialised: Hopper's FP8 MMA accumulator is not full fp32) is scaled and added to an fp32
main accumulator; the output is rounded to bf16 once, or stored in fp32 (``out`` float32: the
layer's GEMM1, whose gate/up stay in fp32 until the FP8 requantization of SiLU-and-mul, as the
Triton FP8 kernels keep them).

The kernel (:mod:`fp8_grouped_kernel`) is QuACK's SM90 varlen-M GEMM (TMA producer warp,
persistent scheduler, pingpong or cooperative consumer warpgroups, bf16 epilogue) with a
block-scaled mainloop. Segments may be empty (they cost nothing), so ``S`` may be a static upper
bound (CUDA graphs).

Launch plans are cached per (configuration, N, K, device, output dtype); the kernel is traced against symbolic
shapes, so one compilation per configuration serves them all.
:func:`compile_plans` builds them (offline for ``sm_90a`` on a CPU: ``moe-backend compile-cute``);
a missing plan inside a CUDA-graph capture raises instead of compiling there.

It serves the FP8 launcher's ``cute_grouped`` path (``fp8_grouped_moe``), the prefill default
where CuTe DSL runs (H200: 1042 TFLOP/s for GEMM1, 929-1014 for GEMM2 at T=8192, E=32, on 128 x 128
tiles). :func:`gated_gemm1_fp8_block` is GEMM1 with SiLU-and-mul and the FP8 requantization in its
epilogue; the 128 x 256 :data:`WIDE_TILES` run plain GEMMs (the layer's GEMM2) on its mainloop.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

from ..._checks import capturing, check_tensor
from ...quant.fp8 import BLOCK, FP8_DTYPE
from .bf16_grouped import GemmPlanMissingError, _device_name
from .cute_env import collect_after_first_launch

#: A configuration: (tile_m, tile_n, cluster_m, pingpong, overlap). tile_n is 128 so that one
#: weight scale serves a whole output tile per K tile (the 128 x 256 :data:`WIDE_TILES` apply one
#: per 128-wide half). The block-scaled mainloop holds an fp32
#: wave accumulator (the K tile's WGMMA result) and the promoted sum: with 64 rows a warpgroup
#: (128x128 cooperative, 64x128 pingpong) that is 128 registers a thread and nothing spills; with
#: 128 rows a warpgroup it is 256, and ptxas spills ~370 bytes a thread, which the promotion then
#: reloads every K tile (H200, 2026-12-02: 400-530 TFLOP/s, ncu: FFMAs stalled on local-memory
#: loads). ``overlap``: two wave accumulators, so that K tile k is promoted while K tile k + 1's
#: WGMMA runs (192 registers at 64 rows a warpgroup; K must be a multiple of 256).
Tile = Tuple[int, int, int, bool, bool]
TILES: Tuple[Tile, ...] = (
    (128, 128, 1, False, False),
    (64, 128, 1, True, False),
    (128, 128, 1, False, True),
    (64, 128, 1, True, True),
    (128, 128, 1, True, False),
    (128, 128, 2, False, False),
    (128, 128, 2, False, True),
    (128, 128, 2, True, False),
    (256, 128, 1, False, False),
    (256, 128, 2, False, False),
)
DEFAULT_TILE = TILES[0]

#: GEMM1 configurations with SiLU-and-mul and the FP8 requantization in the epilogue
#: (:mod:`fp8_gated_kernel`): 128 rows by gate and up of one 128-wide group on two cooperative
#: warpgroups; one CTA, or a cluster of two M tiles sharing the weight tile (TMA multicast).
GATED_TILES: Tuple[Tile, ...] = (
    (128, 256, 1, False, False),
    (128, 256, 2, False, False),
)
#: The same 128 x 256 tiles for a plain (bf16 or fp32 out) GEMM: two 128-wide N halves on two
#: cooperative warpgroups (``fp8_grouped_kernel.Fp8BlockGemmSm90Wide``); N a multiple of 256.
WIDE_TILES: Tuple[Tile, ...] = GATED_TILES


#: Output (D) dtypes: bf16 (one rounding of the fp32 sum) or float32 (the sum itself). A plan
#: whose output is e4m3 is the gated GEMM1 (:data:`GATED_TILES`, :func:`gated_gemm1_fp8_block`).
OUT_DTYPES = (torch.bfloat16, torch.float32)


class PlanKey(NamedTuple):
    """What a compiled FP8 grouped GEMM depends on: configuration, output width N, reduction K,
    device, output dtype."""

    tile: Tile
    n: int
    k: int
    device: str
    out_dtype: torch.dtype = torch.bfloat16


class _Plan(NamedTuple):
    compiled: Any
    max_active_clusters: int


_PLANS: Dict[PlanKey, _Plan] = {}
_LOCK = threading.Lock()


def serves(tile: Tile, k: int) -> bool:
    """Whether configuration ``tile`` can reduce over ``k``: an overlapping one needs an even
    number of 128-K tiles."""
    return not (tile[4] and k % (2 * BLOCK))


def fits_width(tile: Tile, n: int) -> bool:
    """Whether configuration ``tile`` covers output width ``n`` with whole N tiles (a 256-wide one
    of :data:`WIDE_TILES` needs N a multiple of 256)."""
    return n % tile[1] == 0


def check_tile(tile: object, k: Optional[int] = None, *, gated: bool = False, n: Optional[int] = None) -> Tile:
    """``tile`` as a configuration tuple of :data:`TILES` or :data:`WIDE_TILES` (:data:`GATED_TILES`
    with ``gated``), else ValueError naming it; with the reduction ``k``, also that an overlapping
    configuration gets an even number of K tiles; with the output width ``n``, that a wide one
    gets whole 256-wide N tiles."""
    t = tuple(tile) if isinstance(tile, (tuple, list)) else tile
    allowed = GATED_TILES if gated else TILES + WIDE_TILES
    if t not in allowed:
        raise ValueError(f"tile: expected one of {allowed}, got {tile!r}")
    if k is not None and not serves(t, k):
        raise ValueError(f"tile: {t} overlaps K tile pairs and needs K a multiple of {2 * BLOCK}, got K={k}")
    if n is not None and not gated and not fits_width(t, n):
        raise ValueError(f"tile: {t} is {t[1]} wide and needs N a multiple of {t[1]}, got N={n}")
    return t  # type: ignore[return-value]


def check_operands(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    cu_seqlens: torch.Tensor,
    out: Optional[torch.Tensor],
    *,
    b_name: str = "b",
    b_scale_name: str = "b_scale",
) -> Tuple[int, int, int, int]:
    """Validate the operands of :func:`grouped_gemm_fp8_block` (``out`` None: those of
    :func:`gated_gemm1_fp8_block` but its outputs, ``b`` and ``b_scale`` named as given); return
    ``(M_total, N, K, S)``.

    Raises TypeError (type, dtype) or ValueError (shape, layout, device, divisibility) naming the
    argument. Contents of ``cu_seqlens`` are not read (that would synchronize with the device):
    it must be non-decreasing from 0 to at most ``M_total``.
    """
    check_tensor(b_name, b, dtype=FP8_DTYPE, ndim=3)
    s, n, k = b.shape
    if s < 1 or n < 1 or k < 1:
        raise ValueError(f"{b_name}: expected a non-empty [S, N, K] tensor, got shape {tuple(b.shape)}")
    if n % BLOCK or k % BLOCK:
        raise ValueError(f"{b_name}: N and K must be multiples of {BLOCK}, got N={n}, K={k}")
    device = b.device
    check_tensor("a", a, dtype=FP8_DTYPE, shape=(None, k), device=device)
    m = a.shape[0]
    check_tensor("a_scale", a_scale, dtype=torch.float32, shape=(m, k // BLOCK), device=device)
    check_tensor(b_scale_name, b_scale, dtype=torch.float32, shape=(s, n // BLOCK, k // BLOCK), device=device)
    check_tensor("cu_seqlens", cu_seqlens, dtype=torch.int32, shape=(s + 1,), device=device)
    if out is not None:
        check_tensor("out", out, dtype=OUT_DTYPES, shape=(m, n), device=device)
    # TMA and the compiled kernel's vector loads assume 16-byte aligned bases
    for name, t in (("a", a), (b_name, b), ("cu_seqlens", cu_seqlens), ("out", out)):
        if t is not None and t.data_ptr() % 16:
            raise ValueError(f"{name}: expected 16-byte aligned storage, got address {t.data_ptr():#x}")
    return m, n, k, s


def _max_active_clusters(cluster_size: int, device: torch.device) -> int:
    if device.type != "cuda":
        from .cute_env import HOPPER_SMS

        return HOPPER_SMS // cluster_size
    from quack.cute_dsl_utils import get_max_active_clusters

    # the occupancy query runs on the current CUDA context: a process that has not touched the
    # device yet (plans compiled at start-up) has none (CUDA_ERROR_INVALID_CONTEXT)
    torch.cuda.synchronize(device)
    return get_max_active_clusters(cluster_size, device_capacity=(9, 0), device_id=device.index or 0)


def check_out_dtype(out_dtype: object) -> torch.dtype:
    """``out_dtype`` if it is one of :data:`OUT_DTYPES`, else ValueError naming it."""
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype: expected one of {OUT_DTYPES}, got {out_dtype!r}")
    return out_dtype  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _compile(tile: Tile, out_dtype: torch.dtype = torch.bfloat16):
    """Trace and compile the kernel of ``tile`` storing ``out_dtype`` against symbolic shapes
    (no tensor, no GPU): one compilation serves every M, N, K and segment count."""
    import cutlass
    import cutlass.cute as cute
    from cutlass import Float32
    from quack.compile_utils import make_fake_tensor
    from quack.gemm_tvm_ffi_utils import (
        compile_gemm_kernel,
        make_fake_gemm_tensors,
        make_fake_scheduler_args,
        make_fake_varlen_args,
    )

    from .cute_env import fingerprint_kernel_sources
    from .fp8_grouped_kernel import Fp8BlockGemmSm90, Fp8BlockGemmSm90Overlapped, Fp8BlockGemmSm90Wide

    fingerprint_kernel_sources()

    tile_m, tile_n, cluster_m, pingpong, overlap = tile
    fp8 = cutlass.Float8E4M3FN
    gated = out_dtype == FP8_DTYPE
    d_dtype = cutlass.Float32 if out_dtype == torch.float32 else cutlass.BFloat16
    m_a, m_b, m_d, m_c, m, _, _, l_sym = make_fake_gemm_tensors(
        fp8, fp8, d_dtype, None, "k", "k", "n", None, varlen_m=True
    )
    kb, nb = cute.sym_int(), cute.sym_int()
    varlen = make_fake_varlen_args(True, False, False, None)
    scales = dict(
        mAScale=make_fake_tensor(Float32, (m, kb), leading_dim=1, divisibility=1),
        mBScale=make_fake_tensor(Float32, (l_sym, nb, kb), leading_dim=2, divisibility=1),
        mCuSeqlens=varlen.mCuSeqlensM,
    )
    if gated:
        from .fp8_gated_kernel import Fp8GatedGemm1Sm90

        inter, ib = cute.sym_int(), cute.sym_int()
        gemm_cls: Any = Fp8GatedGemm1Sm90
        epi = gemm_cls.EpilogueArguments(
            **scales,
            mY=make_fake_tensor(fp8, (m, inter), leading_dim=1, divisibility=1),
            mYScale=make_fake_tensor(Float32, (m, ib), leading_dim=1, divisibility=1),
        )
        m_d = None
    else:
        if tile_n == 2 * BLOCK:
            assert not (pingpong or overlap), "the wide tiles are cooperative, without overlapped promotion"
            gemm_cls = Fp8BlockGemmSm90Wide
        else:
            gemm_cls = Fp8BlockGemmSm90Overlapped if overlap else Fp8BlockGemmSm90
        epi = Fp8BlockGemmSm90.EpilogueArguments(**scales)
    return compile_gemm_kernel(
        gemm_cls,
        fp8,
        (tile_m, tile_n, BLOCK),
        (cluster_m, 1, 1),
        pingpong,
        True,  # persistent
        False,  # gather_A
        False,  # dynamic persistent
        (9, 0),
        m_a,
        m_b,
        m_d,
        m_c,
        epi,
        make_fake_scheduler_args(False, False, l_sym),
        varlen,
    )


def _plan(key: PlanKey, device: torch.device) -> _Plan:
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    if capturing():
        raise GemmPlanMissingError(
            f"FP8 grouped GEMM tile {key.tile} (N={key.n}, K={key.k}, out {key.out_dtype}) was not compiled "
            f"before this CUDA-graph capture: call compile_plans before capturing"
        )
    with _LOCK:
        if key not in _PLANS:
            _PLANS[key] = _Plan(_compile(key.tile, key.out_dtype), _max_active_clusters(key.tile[2], device))
        return _PLANS[key]


def grouped_gemm_fp8_block(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    cu_seqlens: torch.Tensor,
    out: torch.Tensor,
    *,
    tile: Tile = DEFAULT_TILE,
) -> torch.Tensor:
    """Block-scaled FP8 grouped GEMM: ``out[r] = dequant(a)[r] @ dequant(b[s])^T`` (fp32 sum, one
    bf16 rounding or stored as fp32) for the rows ``r`` of each segment ``s``.

    ``a [M_total, K]`` float8_e4m3fn contiguous; ``a_scale [M_total, K/128]`` fp32 (one scale per
    row per 128-K block); ``b [S, N, K]`` float8_e4m3fn contiguous (K contiguous);
    ``b_scale [S, N/128, K/128]`` fp32; ``cu_seqlens [S + 1]`` int32 on the device (segment bounds,
    non-decreasing from 0); ``out [M_total, N]`` bf16 or float32 contiguous (the compiled plan
    depends on it). N and K multiples of 128 (K of 256 for an overlapping ``tile``, N of 256 for one
    of :data:`WIDE_TILES`). Rows at or past ``cu_seqlens[S]`` are neither read for output nor
    written. Returns ``out``.
    """
    m, n, k, _ = check_operands(a, a_scale, b, b_scale, cu_seqlens, out)
    tile = check_tile(tile, k, n=n)
    if b.device.type != "cuda":
        raise ValueError(f"b: expected tensors on a CUDA device (Hopper), got {b.device}")
    if m == 0:
        return out
    from .fp8_grouped_kernel import Fp8BlockGemmSm90

    key = PlanKey(tile, n, k, _device_name(b.device), out.dtype)
    _launch(key, a, b, out, Fp8BlockGemmSm90, cu_seqlens, mAScale=a_scale, mBScale=b_scale)
    return out


def _launch(
    key: PlanKey,
    a: torch.Tensor,
    b: torch.Tensor,
    out: Optional[torch.Tensor],
    gemm_cls: Any,
    cu_seqlens: torch.Tensor,
    **epi_tensors: torch.Tensor,
) -> None:
    """Launch ``key``'s plan (compiled here if missing) on checked operands: ``epi_tensors`` are
    the epilogue arguments of ``gemm_cls`` besides ``mCuSeqlens``."""
    plan = _plan(key, b.device)
    from quack.gemm_tvm_ffi_utils import make_scheduler_args, make_varlen_args

    # the compiled (TVM-FFI) function takes torch tensors where the trace took CuTe tensors;
    # compile-time (Constexpr) fields cross as None, as QuACK's own launches pass them
    epi = gemm_cls.EpilogueArguments(**epi_tensors, mCuSeqlens=cu_seqlens, add_to_output=None, rounding_mode=None)
    plan.compiled(
        a,
        b,
        out,
        None,
        epi,
        make_scheduler_args(plan.max_active_clusters, 8, None),
        make_varlen_args(cu_seqlens, None, None),
        None,
        None,
    )
    collect_after_first_launch(key)


def gated_gemm1_fp8_block(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    cu_seqlens: torch.Tensor,
    y: torch.Tensor,
    y_scale: torch.Tensor,
    *,
    tile: Tile = GATED_TILES[0],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GEMM1 with SiLU-and-mul and the FP8 requantization fused: for the rows ``r`` of each
    segment ``s``, ``v[r] = silu(gate[r]) * up[r]`` with ``gate|up = dequant(a)[r] @
    dequant(w13[s])^T`` summed in fp32, then per 128 columns ``y_scale = max(amax(v), 1e-10) /
    448`` and ``y = e4m3(clamp(v * (1 / y_scale)))`` (:func:`silu_mul_quant`'s numerics).

    ``a [M_total, H]`` e4m3 and ``a_scale [M_total, H/128]`` fp32 as for
    :func:`grouped_gemm_fp8_block`; ``w13 [S, 2I, H]`` e4m3 (gate rows ``[:I]``, up ``[I:]``),
    ``w13_scale [S, 2I/128, H/128]`` fp32, read in place; ``cu_seqlens [S + 1]`` int32;
    ``y [M_total, I]`` e4m3 (16-byte aligned) and ``y_scale [M_total, I/128]`` fp32 contiguous,
    written for the segments' rows only. ``tile`` one of :data:`GATED_TILES`. Returns ``(y, y_scale)``.
    """
    m, two_i, k, _ = check_operands(
        a, a_scale, w13, w13_scale, cu_seqlens, None, b_name="w13", b_scale_name="w13_scale"
    )
    tile = check_tile(tile, gated=True)
    if two_i % (2 * BLOCK):
        raise ValueError(f"w13: expected 2I rows with I a multiple of {BLOCK}, got {two_i}")
    inter = two_i // 2
    check_tensor("y", y, dtype=FP8_DTYPE, shape=(m, inter), device=w13.device)
    check_tensor("y_scale", y_scale, dtype=torch.float32, shape=(m, inter // BLOCK), device=w13.device)
    if y.data_ptr() % 16:  # the kernel stores y's rows in 16-byte pieces
        raise ValueError(f"y: expected 16-byte aligned storage, got address {y.data_ptr():#x}")
    if w13.device.type != "cuda":
        raise ValueError(f"w13: expected tensors on a CUDA device (Hopper), got {w13.device}")
    if m == 0:
        return y, y_scale
    from .fp8_gated_kernel import Fp8GatedGemm1Sm90

    key = PlanKey(tile, two_i, k, _device_name(w13.device), FP8_DTYPE)
    _launch(key, a, w13, None, Fp8GatedGemm1Sm90, cu_seqlens, mAScale=a_scale, mBScale=w13_scale, mY=y, mYScale=y_scale)
    return y, y_scale


def compile_plans(n: int, k: int, tiles, device: torch.device, out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Compile the kernel of every configuration in ``tiles`` for output width ``n``, reduction
    ``k`` and output dtype ``out_dtype`` (bf16 or float32; e4m3: the gated GEMM1 of
    :data:`GATED_TILES`, ``n`` = 2I) on ``device`` (``meta`` compiles offline, after
    :func:`cute_env.pin_offline_arch`). Returns the number compiled or loaded now (plans already
    in this process are skipped)."""
    if capturing():
        raise GemmPlanMissingError("compile_plans: cannot compile inside a CUDA-graph capture")
    if n % BLOCK or k % BLOCK or n < 1 or k < 1:
        raise ValueError(f"n, k: expected positive multiples of {BLOCK}, got n={n}, k={k}")
    gated = out_dtype == FP8_DTYPE
    if gated and n % (2 * BLOCK):
        raise ValueError(f"n: the gated GEMM1 needs 2I with I a multiple of {BLOCK}, got n={n}")
    if not gated:
        out_dtype = check_out_dtype(out_dtype)
    device = torch.device(device)
    built = 0
    for tile in dict.fromkeys(check_tile(t, k, gated=gated, n=n) for t in tiles):
        key = PlanKey(tile, n, k, _device_name(device), out_dtype)
        if key not in _PLANS:
            _plan(key, device)
            built += 1
    return built


def reference_grouped_gemm_fp8_block(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    cu_seqlens: torch.Tensor,
) -> torch.Tensor:
    """Float64 reference of :func:`grouped_gemm_fp8_block` from the dequantized operands, computed
    on their device: ``[M_total, N]`` float64; rows outside every segment are zero."""
    m, n = a.shape[0], b.shape[1]
    out = torch.zeros(m, n, dtype=torch.float64, device=b.device)
    s = check_operands(a, a_scale, b, b_scale, cu_seqlens, out.to(torch.bfloat16))[3]
    a64 = a.double() * a_scale.double().repeat_interleave(BLOCK, dim=1)
    bounds = cu_seqlens.tolist()
    for seg in range(s):
        lo, hi = bounds[seg], bounds[seg + 1]
        if not 0 <= lo <= hi <= m:
            raise ValueError(f"cu_seqlens: expected non-decreasing bounds within [0, {m}], got {bounds}")
        if hi > lo:
            scale = b_scale[seg].double().repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)
            out[lo:hi] = a64[lo:hi] @ (b[seg].double() * scale).T
    return out
