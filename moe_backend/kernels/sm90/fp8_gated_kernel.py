"""The CuTe DSL kernel class behind :func:`fp8_grouped.gated_gemm1_fp8_block`: GEMM1 of the FP8 grouped path with
SiLU-and-mul and the FP8 requantization in its epilogue. Imported only when CuTe DSL and QuACK
are installed (``cute_env``).

One CTA tile is 128 rows by 256 columns of ``w13``: the gate rows ``[128 g, 128 g + 128)`` and the
up rows ``[I + 128 g, I + 128 g + 128)`` of one 128-wide group ``g`` of intermediate columns. Two
cooperative consumer warpgroups take 64 rows each. Each K tile's WGMMAs run in two N halves of 128
(gate, then up) into one 64-register wave accumulator, each half promoted with its own weight
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
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import warpgroup
from quack import layout_utils
from quack.activation import silu
from quack.copy_utils import store_v4
from quack.cute_dsl_utils import mlir_namedtuple
from quack.rounding import RoundingMode
from quack.utils import elem_pointer

from ...quant.fp8 import FP8_EPS, FP8_MAX, RCP_FP8_MAX
from .fp8_grouped_kernel import BLOCK, Fp8BlockGemmSm90

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


class Fp8GatedGemm1Sm90(Fp8BlockGemmSm90):
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

    scale_blocks_n = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert not self.pingpong and self.cta_tile_shape_mnk[:2] == (128, TILE_N), "gated GEMM1 tile"

    def _setup_tiled_mma(self):
        super()._setup_tiled_mma()
        # WGMMAs 128 wide: the tile's two N halves are two MMA repetitions, issued one at a time
        self.tiled_mma = sm90_utils.make_trivial_tiled_mma(
            self.mma_a_dtype,
            self.b_dtype,
            self.a_layout.sm90_mma_major_mode(),
            self.b_layout.sm90_mma_major_mode(),
            self.acc_dtype,
            self.atom_layout_mnk,
            tiler_mn=(64, BLOCK),
            a_source=warpgroup.OperandSource.SMEM,
        )

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

    @cute.jit
    def _half_wgmma(self, tiled_mma, wave, t_ra, t_rb, stage, half: cutlass.Constexpr[int]) -> None:
        """One K tile's WGMMAs of N half ``half`` (0 gate, 1 up) into ``wave`` (zero-initialised)."""
        warpgroup.fence()
        atom = cute.make_mma_atom(tiled_mma.op)
        atom.set(warpgroup.Field.ACCUMULATE, False)
        for kb in cutlass.range_constexpr(cute.size(t_ra.shape[2])):
            # B's N repetition ``half`` as a (V, 1) operand
            b = t_rb[None, half, kb, stage]
            b = cute.make_tensor(b.iterator, cute.append(b.layout, cute.make_layout(1)))
            cute.gemm(atom, wave, t_ra[None, None, kb, stage], b, wave)
            atom.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()
        warpgroup.wait_group(0)

    @cute.jit
    def mma(self, ab_pipeline, ab_read_state, mma_fn, acc, acc_slow, k_tile_cnt, warp_group_idx):
        # acc [MMA, 1, 2] is the promoted sum (half 0 gate, half 1 up); acc_slow stays unused
        tiled_mma, _, t_ra, t_rb = mma_fn.args
        m_sa, m_sb, m_cu = self._scales
        pid_m, pid_n, seg = self._work_coord
        tidx, _, _ = cute.arch.thread_idx()
        tile_m = self.cta_tile_shape_mnk[0]
        coords = layout_utils.reshape_acc_to_mn(
            tiled_mma.get_slice(tidx).partition_C(cute.make_identity_tensor((tile_m, BLOCK)))
        )
        wave = cute.make_rmem_tensor(tiled_mma.get_slice(tidx).partition_shape_C((tile_m, BLOCK)), Float32)
        n_vals = const_expr(cute.size(wave))
        rows = const_expr(cute.size(coords, mode=[0]))
        first, last = m_cu[seg] + pid_m * tile_m, m_cu[seg + 1] - 1
        row_idx = cute.make_rmem_tensor((rows,), Int32)
        for r in cutlass.range_constexpr(rows):
            row_idx[r] = cutlass.min(first + coords[r, 0][0], last)
        nb_up = pid_n + cute.size(m_sb, mode=[1]) // 2
        a_next = cute.make_rmem_tensor((rows,), Float32)
        b_next = cute.make_rmem_tensor((2,), Float32)
        scale = cute.make_rmem_tensor((2 * rows,), Float32)
        acc.fill(0.0)
        ab_release_state = ab_read_state.clone()
        b_next[0], b_next[1] = m_sb[seg, pid_n, 0], m_sb[seg, nb_up, 0]
        for r in cutlass.range_constexpr(rows):
            a_next[r] = m_sa[row_idx[r], 0]
        for k_tile in cutlass.range(k_tile_cnt, unroll=1):
            for r in cutlass.range_constexpr(rows):
                scale[r] = a_next[r] * b_next[0]
                scale[rows + r] = a_next[r] * b_next[1]
            peek = ab_pipeline.consumer_try_wait(ab_read_state)
            ab_pipeline.consumer_wait(ab_read_state, peek)
            # the next K tile's scales load during this one's WGMMAs (an L2 round trip)
            kn = cutlass.min(k_tile + 1, k_tile_cnt - 1)
            b_next[0], b_next[1] = m_sb[seg, pid_n, kn], m_sb[seg, nb_up, kn]
            for r in cutlass.range_constexpr(rows):
                a_next[r] = m_sa[row_idx[r], kn]
            for half in cutlass.range_constexpr(2):
                self._half_wgmma(tiled_mma, wave, t_ra, t_rb, ab_read_state.index, half)
                # wave value i sits at row (i // 2) % 2 of the thread's two (CuTe's SM90 C layout)
                for i in cutlass.range_constexpr(n_vals):
                    acc[i + half * n_vals] = acc[i + half * n_vals] + wave[i] * scale[half * rows + (i // 2) % rows]
            ab_pipeline.consumer_release(ab_release_state)
            ab_read_state.advance()
            ab_release_state.advance()
        return ab_read_state

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
