"""The CuTe DSL kernel class behind :mod:`fp8_grouped`: QuACK's SM90 GEMM with a block-scaled
FP8 mainloop. Imported only when CuTe DSL and QuACK are installed (``cute_env``).

QuACK's ``GemmSm90`` (varlen-M, TMA producer warp, persistent scheduler, pingpong/cooperative
consumers, bf16 epilogue) runs FP8 operands with a "slow accumulation" mainloop: each 128-K tile's
WGMMAs write a zero-initialised wave accumulator, which is drained and added to an fp32 main
accumulator. :class:`Fp8BlockGemmSm90` overrides that mainloop (``mma``) to scale the wave by
``a_scale[row, kb] * b_scale[s, n_block, kb]`` before adding it (DeepSeek-V3 block scale, the
promotion scheme of DeepGEMM), so the FP8 MMA accumulator never runs across K tiles.
:class:`Fp8BlockGemmSm90Overlapped` promotes each K tile while the next one's WGMMAs run;
:class:`Fp8BlockGemmSm90Wide` runs a 128 x 256 tile as two 128-wide N halves with a weight scale
block each (plain GEMMs on ``fp8_grouped.WIDE_TILES``, and the gated GEMM1 of ``fp8_gated_kernel``).

Two facts the mainloop needs reach it through narrow seams of ``GemmSm90.kernel``:

* the scale tensors (and ``cu_seqlens``) ride the epilogue parameters (extra fields of the default
  epilogue's ``EpilogueParams``, which are kernel arguments); ``epi_get_smem_tensors`` runs once at
  kernel entry, dominating every warp's code, and records them for the mainloop;
* the work tile's ``(pid_m, pid_n, segment)``: the varlen-M scheduler never splits K, so the split
  slot of its tile coordinate is free; :class:`_CoordScheduler` puts the coordinate there, and
  ``get_split_k_tile_range`` (called by the consumer right before its mainloop, in the same loop
  body) hands it to the mainloop.

Both are recorded as trace-time Python attributes and read within the region that defines them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import warpgroup
from quack import layout_utils
from quack.cute_dsl_utils import mlir_namedtuple
from quack.gemm_default_epi import GemmDefaultEpiMixin, GemmDefaultSm90
from quack.rounding import RoundingMode
from quack.sm90_utils import gemm_w_idx
from quack.tile_scheduler import VarlenMTileScheduler, WorkTileInfo

#: K (and N) extent of one scale block.
BLOCK = 128


# Straight-line register work of the mainloop, inlined into it (CuTe DSL wants the tensors passed
# explicitly, not captured by closures, inside its dynamic loops).
@cute.jit
def _prefetch(a_next, b_next, source, k, rows: cutlass.Constexpr[int]) -> None:
    """Load K tile ``k``'s scales: the weight block's into ``b_next[0]``, each row's into
    ``a_next``; ``source`` is ``(a_scale, b_scale, row_idx, segment, pid_n)``."""
    m_sa, m_sb, row_idx, seg, pid_n = source
    b_next[0] = m_sb[seg, pid_n, k]
    for r in cutlass.range_constexpr(rows):
        a_next[r] = m_sa[row_idx[r], k]


@cute.jit
def _take(row_scale, a_next, b_next, rows: cutlass.Constexpr[int]) -> None:
    """The prefetched scales as this K tile's row scales (frees the prefetch registers)."""
    for r in cutlass.range_constexpr(rows):
        row_scale[r] = a_next[r] * b_next[0]


@cute.jit
def _promote(slow_mn, wave_mn, row_scale, rows: cutlass.Constexpr[int], cols: cutlass.Constexpr[int]) -> None:
    """``slow += wave * row_scale`` (both accumulators in (M, N) view)."""
    for r in cutlass.range_constexpr(rows):
        for c in cutlass.range_constexpr(cols):
            slow_mn[r, c] = slow_mn[r, c] + wave_mn[r, c] * row_scale[r]


class _CoordScheduler(VarlenMTileScheduler):
    """QuACK's varlen-M scheduler whose work tiles carry ``(pid_m, pid_n, segment)`` in the
    (unused) split-K slot, handed to the GEMM that owns it by ``get_split_k_tile_range``."""

    gemm = None  # set on the per-GEMM subclass made by Fp8BlockGemmSm90.get_scheduler_class

    @staticmethod
    def _with_coord(work: WorkTileInfo) -> WorkTileInfo:
        pid_m, pid_n, _, seg = work.tile_idx
        return WorkTileInfo((pid_m, pid_n, (pid_m, pid_n, seg), seg), work.is_valid_tile)

    @cute.jit
    def initial_work_tile_info(self, *, loc=None, ip=None) -> WorkTileInfo:
        return _CoordScheduler._with_coord(VarlenMTileScheduler.initial_work_tile_info(self, loc=loc, ip=ip))

    @cute.jit
    def get_current_work(self, *, loc=None, ip=None) -> WorkTileInfo:
        return _CoordScheduler._with_coord(VarlenMTileScheduler.get_current_work(self, loc=loc, ip=ip))

    def get_split_k_tile_range(self, k_tile_total, split_idx, *, loc=None, ip=None):
        self.gemm._work_coord = split_idx
        return 0, k_tile_total


class Fp8BlockGemmSm90(GemmDefaultSm90):
    """Varlen-M grouped GEMM ``D = sum_kb (A_kb @ B[s]_kb^T) * sa[row, kb] * sb[s, n // 128, kb]``.

    A ``[M_total, K]`` e4m3 (K-major), B ``[S, N, K]`` e4m3 (K-major), D ``[M_total, N]`` bf16;
    ``mAScale [M_total, K/128]`` fp32, ``mBScale [S, N/128, K/128]`` fp32, ``mCuSeqlens [S + 1]``
    int32 (the same tensor as the varlen argument). Needs tile_N == 128 and tile_K == 128, so one
    B scale serves a whole (tile, K tile); a subclass whose tile spans :attr:`scale_blocks_n`
    blocks in N applies one per block itself.
    """

    _extra_param_fields = GemmDefaultEpiMixin._extra_param_fields + (
        ("mAScale", Optional[cute.Tensor], None),
        ("mBScale", Optional[cute.Tensor], None),
        ("mCuSeqlens", Optional[cute.Tensor], None),
    )

    @mlir_namedtuple
    class EpilogueArguments(NamedTuple):
        mAScale: cute.Tensor
        mBScale: cute.Tensor
        mCuSeqlens: cute.Tensor
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

    #: Promote K tile k while K tile k + 1's WGMMA runs (two wave accumulators; even K tile count).
    overlap_promotion = False
    #: 128-wide weight scale blocks across the CTA tile's N.
    scale_blocks_n = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.fp8_slow_accum, "Fp8BlockGemmSm90 needs FP8 A without fast accumulation"
        assert self.cta_tile_shape_mnk[1] == BLOCK * self.scale_blocks_n, "one B scale per warpgroup and K tile"
        assert self.cta_tile_shape_mnk[2] == BLOCK, "promotion per 128-K scale block: tile_K must be 128"

    def epi_to_underlying_arguments(self, args, *, loc=None, ip=None):
        params = super().epi_to_underlying_arguments(args, loc=loc, ip=ip)
        params.mAScale, params.mBScale, params.mCuSeqlens = args.mAScale, args.mBScale, args.mCuSeqlens
        return params

    def epi_get_smem_tensors(self, params, storage):
        self._scales = (params.mAScale, params.mBScale, params.mCuSeqlens)
        return super().epi_get_smem_tensors(params, storage)

    def get_scheduler_class(self, varlen_m: bool = False):
        assert varlen_m, "Fp8BlockGemmSm90 is the varlen-M (grouped) GEMM"
        return type("_BoundCoordScheduler", (_CoordScheduler,), {"gemm": self})

    @cute.jit
    def mma(self, ab_pipeline, ab_read_state, mma_fn, acc, acc_slow, k_tile_cnt, warp_group_idx):
        tiled_mma = mma_fn.args[0]
        m_sa, m_sb, m_cu = self._scales
        pid_m, pid_n, seg = self._work_coord
        tidx, _, _ = cute.arch.thread_idx()
        if const_expr(self.pingpong):
            tidx = tidx % self.num_threads_per_warp_group
        thr_mma = tiled_mma.get_slice(tidx)
        tile_m = self.cta_tile_shape_mnk[0]
        coords = layout_utils.reshape_acc_to_mn(
            thr_mma.partition_C(cute.make_identity_tensor((tile_m, self.cta_tile_shape_mnk[1])))
        )
        acc_mn = layout_utils.reshape_acc_to_mn(acc)
        slow_mn = layout_utils.reshape_acc_to_mn(acc_slow)
        rows = const_expr(cute.size(acc_mn, mode=[0]))
        cols = const_expr(cute.size(acc_mn, mode=[1]))
        # rows of this thread, clamped into the segment: rows past its end are computed from the
        # next segment's A (TMA reads whole tiles) and never stored, but their scales must exist
        first, last = m_cu[seg] + pid_m * tile_m, m_cu[seg + 1] - 1
        row_idx = cute.make_rmem_tensor((rows,), Int32)
        for r in cutlass.range_constexpr(rows):
            row_idx[r] = cutlass.min(first + coords[r, 0][0], last)
        # The scales of K tile k are loaded during tile k - 1 and used after tile k's WGMMA: an
        # L2 round trip (~600+ cycles under load) outlasts one 128x128x128 WGMMA (~512 cycles).
        a_next = cute.make_rmem_tensor((rows,), Float32)
        b_next = cute.make_rmem_tensor((1,), Float32)
        row_scale = cute.make_rmem_tensor((rows,), Float32)

        source = (m_sa, m_sb, row_idx, seg, pid_n)
        acc_slow.fill(0.0)
        ab_release_state = ab_read_state.clone()
        _prefetch(a_next, b_next, source, 0, rows)
        if const_expr(not self.overlap_promotion):
            # each K tile: WGMMA into acc, wait for it, promote it (the tensor cores idle meanwhile)
            for k_tile in cutlass.range(k_tile_cnt, unroll=1):
                _take(row_scale, a_next, b_next, rows)
                peek = ab_pipeline.consumer_try_wait(ab_read_state)
                ab_pipeline.consumer_wait(ab_read_state, peek)
                mma_fn(A_idx=ab_read_state.index, B_idx=ab_read_state.index, zero_init=True)
                _prefetch(a_next, b_next, source, cutlass.min(k_tile + 1, k_tile_cnt - 1), rows)
                warpgroup.wait_group(0)
                ab_pipeline.consumer_release(ab_release_state)
                ab_read_state.advance()
                ab_release_state.advance()
                _promote(slow_mn, acc_mn, row_scale, rows, cols)
        else:
            # Two wave accumulators: K tile k is promoted from one while K tile k + 1's WGMMA runs
            # into the other; each half-step ends waiting for that WGMMA (wait_group(0)), so that
            # every WGMMA pipeline stage closes inside it: ptxas serializes every WGMMA (C7514)
            # when registers of an accumulator are read across a stage that stays open, as a
            # wait_group(1) loop leaves it. Unrolled by two so that each accumulator is a fixed
            # register set: needs an even K tile count (the launcher checks K % 256 == 0). The
            # three half-steps below stay written out: moved into a helper, the pipeline states
            # they advance are no longer carried by the loop ("operand does not dominate").
            tiled_mma, _, t_ra, t_rb = mma_fn.args
            acc2 = cute.make_rmem_tensor_like(acc)
            acc2_mn = layout_utils.reshape_acc_to_mn(acc2)
            peek = ab_pipeline.consumer_try_wait(ab_read_state)
            ab_pipeline.consumer_wait(ab_read_state, peek)
            gemm_w_idx(tiled_mma, acc, t_ra, t_rb, True, ab_read_state.index, ab_read_state.index)
            ab_read_state.advance()
            warpgroup.wait_group(0)
            ab_pipeline.consumer_release(ab_release_state)
            ab_release_state.advance()
            for kk in cutlass.range(0, k_tile_cnt - 2, 2, unroll=1):
                # tile kk + 1 into acc2 while tile kk (acc) is promoted
                _take(row_scale, a_next, b_next, rows)
                peek = ab_pipeline.consumer_try_wait(ab_read_state)
                ab_pipeline.consumer_wait(ab_read_state, peek)
                gemm_w_idx(tiled_mma, acc2, t_ra, t_rb, True, ab_read_state.index, ab_read_state.index)
                ab_read_state.advance()
                _prefetch(a_next, b_next, source, kk + 1, rows)
                _promote(slow_mn, acc_mn, row_scale, rows, cols)
                warpgroup.wait_group(0)
                ab_pipeline.consumer_release(ab_release_state)
                ab_release_state.advance()
                # tile kk + 2 into acc while tile kk + 1 (acc2) is promoted
                _take(row_scale, a_next, b_next, rows)
                peek = ab_pipeline.consumer_try_wait(ab_read_state)
                ab_pipeline.consumer_wait(ab_read_state, peek)
                gemm_w_idx(tiled_mma, acc, t_ra, t_rb, True, ab_read_state.index, ab_read_state.index)
                ab_read_state.advance()
                _prefetch(a_next, b_next, source, kk + 2, rows)
                _promote(slow_mn, acc2_mn, row_scale, rows, cols)
                warpgroup.wait_group(0)
                ab_pipeline.consumer_release(ab_release_state)
                ab_release_state.advance()
            # the last tile into acc2 while tile k_tile_cnt - 2 (acc) is promoted, then the last
            _take(row_scale, a_next, b_next, rows)
            peek = ab_pipeline.consumer_try_wait(ab_read_state)
            ab_pipeline.consumer_wait(ab_read_state, peek)
            gemm_w_idx(tiled_mma, acc2, t_ra, t_rb, True, ab_read_state.index, ab_read_state.index)
            ab_read_state.advance()
            _prefetch(a_next, b_next, source, k_tile_cnt - 1, rows)
            _promote(slow_mn, acc_mn, row_scale, rows, cols)
            warpgroup.wait_group(0)
            ab_pipeline.consumer_release(ab_release_state)
            ab_release_state.advance()
            _take(row_scale, a_next, b_next, rows)
            _promote(slow_mn, acc2_mn, row_scale, rows, cols)
        if const_expr(self.pingpong):
            self.pingpong_barrier_arrive(1 - warp_group_idx, stage="mma")
        acc.store(acc_slow.load())
        return ab_read_state


class Fp8BlockGemmSm90Overlapped(Fp8BlockGemmSm90):
    """:class:`Fp8BlockGemmSm90` whose promotion of each K tile overlaps the next K tile's WGMMA:
    the tensor cores no longer idle while the FFMAs run. 64 rows a warpgroup keep the three
    accumulators (two waves, the promoted sum) at 192 registers a thread. K must be a multiple of
    256 (an even number of K tiles)."""

    overlap_promotion = True


class Fp8BlockGemmSm90Wide(Fp8BlockGemmSm90):
    """:class:`Fp8BlockGemmSm90` on a 128 x 256 tile of two 128-wide N halves, each with its own
    weight scale block: each K tile's WGMMAs run one half at a time into one 64-register wave
    accumulator, each half promoted into its half of the fp32 sum (128 registers): 192 registers
    a thread where one 256-wide wave would need 256 and spill. Against the 128 x 128 tile a K tile
    carries twice the MMA work for its 16 KB of A, so the same shared memory keeps more of the
    weight stream in flight, and a tile's fixed costs (epilogue, scheduling) come half as often.
    N tile ``j`` covers weight rows ``[256 j, 256 j + 256)``, scale blocks ``2 j`` and ``2 j + 1``
    (:meth:`_half_scale_blocks`; the gated GEMM1 pairs them differently)."""

    scale_blocks_n = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert not self.pingpong and self.cta_tile_shape_mnk[:2] == (128, 2 * BLOCK), "wide tile: 128 x 256"

    def _half_scale_blocks(self, pid_n, m_sb):
        """The weight scale blocks of N tile ``pid_n``'s two halves."""
        return 2 * pid_n, 2 * pid_n + 1

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

    @cute.jit
    def _half_wgmma(self, tiled_mma, wave, t_ra, t_rb, stage, half: cutlass.Constexpr[int]) -> None:
        """One K tile's WGMMAs of N half ``half`` into ``wave`` (zero-initialised)."""
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
        # acc [MMA, 1, 2] is the promoted sum (half 0, half 1); acc_slow stays unused
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
        nb_first, nb_second = self._half_scale_blocks(pid_n, m_sb)
        a_next = cute.make_rmem_tensor((rows,), Float32)
        b_next = cute.make_rmem_tensor((2,), Float32)
        scale = cute.make_rmem_tensor((2 * rows,), Float32)
        acc.fill(0.0)
        ab_release_state = ab_read_state.clone()
        b_next[0], b_next[1] = m_sb[seg, nb_first, 0], m_sb[seg, nb_second, 0]
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
            b_next[0], b_next[1] = m_sb[seg, nb_first, kn], m_sb[seg, nb_second, kn]
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
