"""The CuTe DSL kernel class behind :func:`fp8_grouped.gated_gemm1_fp8_block`: GEMM1 of the FP8 grouped path with
SiLU-and-mul and the FP8 requantization in its epilogue. Imported only when CuTe DSL and QuACK
are installed (``cute_env``).

One CTA tile is 128 rows by 256 columns of ``w13``: the gate rows ``[128 g, 128 g + 128)`` and the
up rows ``[I + 128 g, I + 128 g + 128)`` of one 128-wide group ``g`` of intermediate columns. Two
cooperative consumer warpgroups take 64 rows each. The mainloop is
:class:`fp8_grouped_kernel.Fp8BlockGemmSm90Wide`'s: each K tile's WGMMAs run in two N halves of
128 (gate, then up) into one 64-register wave accumulator, each half promoted with its own weight
scale into the fp32 sum (128 registers): 192 registers where a 256-wide wave would need 256 and
spill. A thread then holds gate and up of the same (row, column) positions, so the epilogue forms
``silu(gate) * up`` in fp32, the row's amax over the group's 128 columns (the thread's quad holds
the row), the scale and the e4m3 codes in registers, and stores them: ``y [P, I]`` e4m3 and
``y_scale [P, I/128]`` fp32, the layout GEMM2 reads. GEMM1 thereby writes 1 byte per intermediate
value instead of 8 (fp32 gate and up), and the separate ``silu_mul_quant`` pass goes away. The codes
leave in 16-byte pieces after a quad shuffle (:func:`_quad_row_bytes`); stored as the MMA layout's
two-byte column pairs they had cost the kernel 15-20% (H200, 2026-12-04), its tensor cores idle
while the cooperative warpgroups store.

Measured and not kept (H200, 2026-12-04): each group split over a (1, 2) cluster, 64 columns a CTA
on the overlapped 128 x 128 mainloop with the row amax exchanged through the peer's shared memory
(branch ``fp8-gated-pair``): 5-8% slower, its per-tile epilogue costing more than its mainloop
saved; a pingpong schedule (one 64 x 256 tile a warpgroup, so
that one's epilogue runs beside the other's WGMMAs) ran 23-32% slower, each SM loading the 32 KB
weight tile for 64 rows instead of 128; four N parts of 64 on two waves, each promoted while the
next part's WGMMAs run, ran 8-15% slower (each WGMMA reads its A tile from shared memory again).

``B`` (``w13 [S, 2I, K]`` as loaded) is read through a view whose N mode is
``(128, 2, I/128) : (K, I*K, 128*K)``: N tile ``g`` of 256 is then the gate block and the up
block of group ``g``, each a contiguous 128-row TMA box. Nothing is copied or reordered.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr
from quack.activation import silu
from quack.copy_utils import store_v4
from quack.cute_dsl_utils import mlir_namedtuple
from quack.rounding import RoundingMode
from quack.utils import elem_pointer

from ...quant.fp8 import FP8_EPS, FP8_MAX, RCP_FP8_MAX
from .fp8_grouped_kernel import BLOCK, Fp8BlockGemmSm90, Fp8BlockGemmSm90Wide

#: Width of one CTA tile in ``w13`` rows (gate and up of one 128-wide group).
TILE_N = 2 * BLOCK


#: ``prmt`` selectors: the low halves of two words, and their high halves.
_LOW_HALVES, _HIGH_HALVES = 0x5410, 0x7632


@cute.jit
def _quad_transpose(x, lane) -> None:
    """``x [4]`` (32-bit words) of the four lanes of a quad transposed in place: lane ``l`` ends
    with word ``l`` of each lane, in lane order. Two butterfly stages: at stage ``b``, a lane swaps
    the words whose index differs from its lane in bit ``b`` with its partner ``lane ^ b``."""
    for b in cutlass.range_constexpr(1, 3):
        low = (lane & b) == 0
        for c in cutlass.range_constexpr(4):
            if const_expr(c & b == 0):
                hi = c | b
                got = cute.arch.shuffle_sync_bfly(cutlass.Uint32(cutlass.select_(low, x[hi], x[c])), offset=b)
                x[hi] = cutlass.Uint32(cutlass.select_(low, got, x[hi]))
                x[c] = cutlass.Uint32(cutlass.select_(low, x[c], got))


@cute.jit
def _quad_row_bytes(words, lane):
    """The codes of a quad's two rows rearranged so that lane ``lane`` holds bytes ``[32 lane,
    32 lane + 32)`` of each: ``words [16]`` (word ``j``: the thread's column pair ``8j + 2 lane``
    of row 0 in its low half, of row 1 in its high half, CuTe's SM90 C layout) in, ``[16]`` out
    (row 0's 8 words, then row 1's)."""
    out = cute.make_rmem_tensor((16,), cutlass.Uint32)
    x = cute.make_rmem_tensor((4,), cutlass.Uint32)
    for r in cutlass.range_constexpr(2):
        half = const_expr(_LOW_HALVES if r == 0 else _HIGH_HALVES)
        for jj in cutlass.range_constexpr(0, 4, 2):
            # x[q]: this lane's pairs of columns 8(4q + jj) and 8(4q + jj + 1), bound for lane q
            for q in cutlass.range_constexpr(4):
                x[q] = cutlass.Uint32(cute.arch.prmt(words[4 * q + jj], words[4 * q + jj + 1], half))
            _quad_transpose(x, lane)
            # x[t]: lane t's pairs; lanes 0, 1 fill one word, lanes 2, 3 the next
            for k in cutlass.range_constexpr(2):
                sel = const_expr(_LOW_HALVES if k == 0 else _HIGH_HALVES)
                base = 8 * r + 2 * (jj + k)
                out[base] = cutlass.Uint32(cute.arch.prmt(x[0], x[1], sel))
                out[base + 1] = cutlass.Uint32(cute.arch.prmt(x[2], x[3], sel))
    return out


class Fp8GatedGemm1Sm90(Fp8BlockGemmSm90Wide):
    """``y, y_scale = quantize(silu(gate) * up)`` per row per 128 columns, with
    ``gate|up [r] = sum_kb (A_kb @ B[s]_kb^T) * sa[r, kb] * sb[s, n // 128, kb]`` for the rows ``r``
    of segment ``s``.

    A ``[M_total, K]`` e4m3 (K-major); B ``[S, 2I, K]`` e4m3 (gate rows ``[:I]``, up ``[I:]``);
    ``mAScale [M_total, K/128]``, ``mBScale [S, 2I/128, K/128]`` fp32; ``mY [M_total, I]`` e4m3
    and ``mYScale [M_total, I/128]`` fp32 written for the rows of the segments only. No D: the
    launcher passes ``mD = None``.
    """

    _extra_param_fields = Fp8BlockGemmSm90._extra_param_fields + (
        ("mY", Optional[cute.Tensor], None),
        ("mYScale", Optional[cute.Tensor], None),
    )

    @mlir_namedtuple
    class EpilogueArguments(NamedTuple):
        mAScale: cute.Tensor
        mBScale: cute.Tensor
        mCuSeqlens: cute.Tensor
        mY: cute.Tensor
        mYScale: cute.Tensor
        alpha: Optional[Float32 | cute.Tensor] = None
        beta: Optional[Float32 | cute.Tensor] = None
        mRowVecBroadcast: Optional[cute.Tensor] = None
        mColVecBroadcast: Optional[cute.Tensor] = None
        add_to_output: cutlass.Constexpr[bool] = False
        rounding_mode: cutlass.Constexpr[int] = RoundingMode.RN
        sr_seed: Optional[Int32 | cute.Tensor] = None
        split_k_semaphore: Optional[cute.Tensor] = None
        split_k_workspace: Optional[cute.Tensor] = None
        mSFD: Optional[cute.Tensor] = None
        sfd_norm_const: Optional[Float32 | cute.Tensor] = None
        mSFDCol: Optional[cute.Tensor] = None

    def rotate_batch_last(self, mA, mB, mD, mC, epilogue_args, append_batch_if_2d=False):
        mA, mB, mD, mC, epilogue_args = super().rotate_batch_last(
            mA, mB, mD, mC, epilogue_args, append_batch_if_2d=append_batch_if_2d
        )
        # B's N mode (2I) as (128, 2, I/128): N tile g of 256 = gate block g, then up block g
        n, s_n = cute.size(mB, mode=[0]), mB.stride[0]
        shape = ((BLOCK, 2, n // TILE_N), *mB.shape[1:])
        stride = ((s_n, (n // 2) * s_n, BLOCK * s_n), *mB.stride[1:])
        mB = cute.make_tensor(mB.iterator, cute.make_layout(shape, stride=stride))
        return mA, mB, mD, mC, epilogue_args

    def epi_to_underlying_arguments(self, args, *, loc=None, ip=None):
        params = super().epi_to_underlying_arguments(args, loc=loc, ip=ip)
        params.mY, params.mYScale = args.mY, args.mYScale
        return params

    def epi_get_smem_tensors(self, params, storage):
        self._outputs = (params.mY, params.mYScale)
        return super().epi_get_smem_tensors(params, storage)

    def _half_scale_blocks(self, pid_n, m_sb):
        # the gate block pid_n and the up block I/128 blocks further (w13's natural order)
        return pid_n, pid_n + cute.size(m_sb, mode=[1]) // 2

    @cute.jit
    def epi_visit_acc(self, params, acc, tiled_mma, tile_coord_mnkl, tidx):
        m_y, m_ys = self._outputs
        m_cu = self._scales[2]
        pid_m, pid_n, seg = tile_coord_mnkl[0], tile_coord_mnkl[1], tile_coord_mnkl[3]
        tile_m = self.cta_tile_shape_mnk[0]
        coords = tiled_mma.get_slice(tidx).partition_C(cute.make_identity_tensor((tile_m, BLOCK)))
        n_vals = const_expr(cute.size(acc) // 2)
        rows = 2
        q = cute.make_rmem_tensor((n_vals,), Float32)
        scale = cute.make_rmem_tensor((rows,), Float32)
        for i in cutlass.range_constexpr(n_vals):
            q[i] = silu(acc[i]) * acc[i + n_vals]
        for r in cutlass.range_constexpr(rows):
            amax = Float32(0.0)
            for i in cutlass.range_constexpr(n_vals):
                if const_expr((i // 2) % rows == r):
                    amax = cute.arch.fmax(amax, cute.math.absf(q[i]))
            # the four threads of a quad hold the row's 128 columns
            amax = cute.arch.fmax(amax, cute.arch.shuffle_sync_bfly(amax, offset=1))
            amax = cute.arch.fmax(amax, cute.arch.shuffle_sync_bfly(amax, offset=2))
            s = cute.arch.fmax(amax, Float32(FP8_EPS)) * Float32(RCP_FP8_MAX)
            scale[r] = s
            rcp = Float32(1.0) / s  # IEEE division, once per group (quant.fp8)
            for i in cutlass.range_constexpr(n_vals):
                if const_expr((i // 2) % rows == r):
                    q[i] = cutlass.max(cutlass.min(q[i] * rcp, Float32(FP8_MAX)), Float32(-FP8_MAX))
        codes = cute.make_rmem_tensor((n_vals,), cutlass.Float8E4M3FN)
        codes.store(q.load().to(cutlass.Float8E4M3FN))
        # A thread holds the row's columns 8j + 2l, 8j + 2l + 1 (l its lane in the quad); the quad
        # trades them so that lane l holds bytes [32 l, 32 l + 32) of each row, stored as two 16-byte
        # pieces: a row leaves in 8 stores instead of 64 two-byte ones (2-byte stores cost GEMM1
        # 15-20% at T=8192 on the H200, its tensor cores idle meanwhile)
        rows_out = _quad_row_bytes(cute.recast_tensor(codes, cutlass.Uint32), tidx % 4)
        m_y32 = cute.recast_tensor(m_y, cutlass.Uint32)
        seg_start = m_cu[seg]
        seg_rows = m_cu[seg + 1] - seg_start
        for r in cutlass.range_constexpr(rows):
            local = pid_m * tile_m + coords[2 * r][0]
            if local < seg_rows:
                row = seg_start + local
                for h in cutlass.range_constexpr(2):
                    col = (pid_n * BLOCK + (tidx % 4) * 32) // 4 + 4 * h
                    ptr = elem_pointer(m_y32, (row, col))
                    # y rows are I bytes (a multiple of 128) from a 16-byte aligned base
                    ptr = cute.make_ptr(cutlass.Uint32, ptr.toint(), cute.AddressSpace.gmem, assumed_align=16)
                    w = 8 * r + 4 * h
                    store_v4(ptr, rows_out[w], rows_out[w + 1], rows_out[w + 2], rows_out[w + 3])
                if tidx % 4 == 0:
                    m_ys[row, pid_n] = scale[r]

    def epilogue_split_k(
        self,
        params,
        epi_fn,
        load_acc_subtile,
        tRS_rD,
        epi_tile,
        epi_read_state,
        epi_producer_state,
        epi_store_pipeline,
        tile_coord_mnkl,
        epilogue_barrier,
        tidx,
        is_tma_warp,
    ):
        # everything this kernel stores, epi_visit_acc stored: no D epilogue
        return epi_read_state, epi_producer_state
