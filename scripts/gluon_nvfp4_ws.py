"""The NVFP4 decode GEMM1's main loop, warp-specialized in Gluon: a diagnosis kernel for the stage probe.

The twenty-seventh session measured (H100, ``gpu_probe_nvfp4_stages.py``) that GEMM1's loop moves
its weights from L2 at 2.9 TB/s with per-thread ``cp.async`` and at 3.8 TB/s with TMA copies, but
that with the dequantization and the MMAs in the loop the TMA version loses it all: Triton 3.6
software-pipelines each copy behind a CTA barrier, so every copy waits for the four compute warps.
Here the copies come from a producer warp of their own (``gl.warp_specialize``, Hopper), into a
ring of ``NUM_BUF`` buffers: the compute warpgroup waits on a buffer's ``ready`` mbarrier and
releases it with an arrive on its ``empty`` mbarrier, with no CTA barrier in the loop.

One program: expert ``tile // (Ip / 32)``'s 32 gate rows and 32 up rows of column block
``tile % (Ip / 32)`` (64 rows, as GEMM1's decode tile; or, ``GATE_UP`` off, 64 consecutive rows of
``w2``, as GEMM2's), over every 256-K group (or the first ``RESIDENT`` groups in turn: L2 hits),
times a ``[16, 256]`` (or ``[8, 256]``: wgmma N=8) activation tile a group whose rows past the
tensor's (one token) are the TMA's zero fill. ``STAGE``: ``"loads"`` (the copies, consumed by
XORs), ``"full"`` (+ :func:`nvfp4_tile.dequant_group` and the warpgroup MMAs) or ``"halves"`` (the
same a 128-K half at a time: :func:`nvfp4_tile.dequant_half`, fewer live registers). One float a
program keeps the results alive; ``"full"``'s and ``"halves"``' equal ``_stage_kernel``'s sum over
the same tile.

The compute partition loads the words and scale codes from shared memory in the register layouts
that Triton's own layout propagation gives the same dequantization (``WORDS_LAYOUT`` /
``CODES_LAYOUT``, read off the TTGIR of the probe's TMA kernel), so that the dequantized tile is
the wgmma register operand without data movement (``convert_layout(..., assert_trivial=True)``).

Measured (H100, twenty-eighth session): the activation tile's copy, 8 KB a group of which 15 rows
are zero fill, costs the loop more than the weights' (loads from L2 54.6 µs with it, 31.9 without);
without it the full loop takes 43.3 µs from L2, against 45.2 for the ``cp.async`` loop: the
compute (ncu: 52% of the issue slots busy) is then the floor, not the loads.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from moe_backend.kernels.sm90.nvfp4_layout import NVFP4KernelWeights
from moe_backend.kernels.sm90.nvfp4_tile import DEQUANT_ASM, dequant_group, dequant_half


def _box_layout(columns: int) -> gl.DistributedLinearLayout:
    """A ``[2, 1, 1, 32, columns]`` box (gate block, up block; or a tile's two blocks) over 4 warps,
    as Triton 3.6 lays out the probe's TMA loads for the dequantization: the words (32 columns)
    are the codes' layout (16 columns) with each thread also holding the word 16 columns on, the
    same word of the group's second half."""
    halves = [[0, 0, 0, 0, 16]] if columns == 32 else []
    return gl.DistributedLinearLayout(
        reg_bases=halves + [[0, 0, 0, 8, 0], [0, 0, 0, 0, 4], [0, 0, 0, 0, 8]],
        lane_bases=[[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 4, 0]],
        warp_bases=[[0, 0, 0, 16, 0], [1, 0, 0, 0, 0]],
        block_bases=[],
        shape=[2, 1, 1, 32, columns],
    )


#: ``[2, 1, 1, 32, 32]`` int32 words and ``[2, 1, 1, 32, 16]`` uint8 scale codes.
WORDS_LAYOUT = gl.constexpr(_box_layout(32))
CODES_LAYOUT = gl.constexpr(_box_layout(16))
#: The ``[64, 16]`` halves and codes the dequantization takes (``#linear`` of the same TTGIR).
HALF_LAYOUT = gl.constexpr(
    gl.DistributedLinearLayout(
        reg_bases=[[8, 0], [0, 4], [0, 8]],
        lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]],
        block_bases=[],
        shape=[64, 16],
    )
)


@gluon.constexpr_function
def mma_layout(x_rows):
    """The accumulator's layout for ``[64, x_rows]``: one warpgroup MMA of N = ``x_rows``."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, x_rows, 16])


@gluon.constexpr_function
def weight_operand(x_rows):
    """The weights' register-operand layout under :func:`mma_layout`."""
    return gl.DotOperandLayout(operand_index=0, parent=mma_layout(x_rows), k_width=2)


@gluon.jit
def _producer(wd, sd, xd, bufs, bars, c0, c1, num_groups, RESIDENT: gl.constexpr, X_ONCE: gl.constexpr):
    """One warp: each group's words, codes and activation tile into buffer ``g % NUM_BUF`` once the
    compute partition has released it; the tile's box is at ``[c0, c1, group, 0, 0]``. With
    ``X_ONCE`` the activation tile comes only with each buffer's first group and stays (wrong
    activations past the first ``NUM_BUF`` groups: what the tile's copies cost, for timing only)."""
    w_bufs, s_bufs, x_bufs = bufs
    ready, empty = bars
    NUM_BUF: gl.constexpr = w_bufs.type.shape[0]
    for g in range(num_groups):
        s = g % NUM_BUF
        # a fresh mbarrier counts as having completed the phase before 0: the first pass is free
        mbarrier.wait(empty.index(s), ((g // NUM_BUF) & 1) ^ 1)
        gw = g % RESIDENT if RESIDENT > 0 else g
        bar = ready.index(s)
        if X_ONCE and g >= NUM_BUF:
            mbarrier.expect(bar, wd.block_type.nbytes + sd.block_type.nbytes)
        else:
            mbarrier.expect(bar, wd.block_type.nbytes + sd.block_type.nbytes + xd.block_type.nbytes)
            tma.async_copy_global_to_shared(xd, [0, g * 256], bar, x_bufs.index(s))
        tma.async_copy_global_to_shared(wd, [c0, c1, gw, 0, 0], bar, w_bufs.index(s))
        tma.async_copy_global_to_shared(sd, [c0, c1, gw, 0, 0], bar, s_bufs.index(s))


@gluon.jit
def _consumer(bufs, bars, num_groups, out_ptr, STAGE: gl.constexpr, DEQUANT_ASM: gl.constexpr):
    """The compute warpgroup: the group's loop body, dequantizing with the PTX ``DEQUANT_ASM``;
    stores the program's float at ``out_ptr``."""
    w_bufs, s_bufs, x_bufs = bufs
    ready, empty = bars
    NUM_BUF: gl.constexpr = w_bufs.type.shape[0]
    X_ROWS: gl.constexpr = x_bufs.type.shape[1]
    acc = gl.zeros([64, X_ROWS], gl.float32, mma_layout(X_ROWS))
    keep = gl.zeros([2, 1, 1, 32, 32], gl.int32, WORDS_LAYOUT)
    keep_s = gl.zeros([2, 1, 1, 32, 16], gl.int32, CODES_LAYOUT)
    for g in range(num_groups):
        s = g % NUM_BUF
        mbarrier.wait(ready.index(s), (g // NUM_BUF) & 1)
        words = w_bufs.index(s).load(WORDS_LAYOUT)
        codes = s_bufs.index(s).load(CODES_LAYOUT)
        if STAGE == "full":
            halves = gl.permute(gl.reshape(words, [64, 2, 16]), (0, 2, 1))
            words0, words1 = gl.split(halves)
            # the same registers under one name (Gluon does not unify equal layouts by itself)
            words0 = gl.convert_layout(words0, HALF_LAYOUT, assert_trivial=True)
            words1 = gl.convert_layout(words1, HALF_LAYOUT, assert_trivial=True)
            codes2 = gl.convert_layout(gl.reshape(codes, [64, 16]), HALF_LAYOUT, assert_trivial=True)
            w = dequant_group(words0, words1, codes2, False, DEQUANT_ASM)
            w = gl.convert_layout(w, weight_operand(X_ROWS), assert_trivial=True)
            acc = warpgroup_mma(w, x_bufs.index(s).permute((1, 0)), acc)
        elif STAGE == "halves":
            # the same group as two 128-K halves, each dequantized after the last one's MMAs are
            # done: half the weights' registers live at a time, so more programs fit an SM
            halves = gl.permute(gl.reshape(words, [64, 2, 16]), (0, 2, 1))
            words0, words1 = gl.split(halves)
            codes2 = gl.convert_layout(gl.reshape(codes, [64, 16]), HALF_LAYOUT, assert_trivial=True)
            xs = x_bufs.index(s)
            w = dequant_half(gl.convert_layout(words0, HALF_LAYOUT, assert_trivial=True), codes2, False, DEQUANT_ASM)
            w = gl.convert_layout(w, weight_operand(X_ROWS), assert_trivial=True)
            acc = warpgroup_mma(w, xs.slice(0, 128, dim=1).permute((1, 0)), acc)
            w = dequant_half(gl.convert_layout(words1, HALF_LAYOUT, assert_trivial=True), codes2, False, DEQUANT_ASM)
            w = gl.convert_layout(w, weight_operand(X_ROWS), assert_trivial=True)
            acc = warpgroup_mma(w, xs.slice(128, 128, dim=1).permute((1, 0)), acc)
        else:
            keep ^= words
            keep_s ^= codes.to(gl.int32)
        # the shared-memory reads (and the MMA's) are done before the buffer's next TMA write
        fence_async_shared()
        mbarrier.arrive(empty.index(s), count=1)
    total = gl.sum(gl.sum(acc, 1), 0)
    words_sum = gl.xor_sum(gl.reshape(keep, [2048]), 0) ^ gl.xor_sum(gl.reshape(keep_s, [1024]), 0)
    gl.store(out_ptr, total + words_sum.to(gl.float32))


@gluon.jit
def _ws_stage_kernel(
    wd,
    sd,
    xd,
    out_ptr,
    IP,
    num_groups,
    STAGE: gl.constexpr,
    NUM_BUF: gl.constexpr,
    RESIDENT: gl.constexpr,
    GATE_UP: gl.constexpr,
    X_ONCE: gl.constexpr,
    DEQUANT_ASM: gl.constexpr,
):
    tile = gl.program_id(0)
    if GATE_UP:
        # [2E, Ip/32, ...]: expert's gate blocks at 2e, its up blocks at 2e + 1
        c0 = 2 * (tile // (IP // 32))
        c1 = tile % (IP // 32)
    else:
        # [2, E * Hb/64, ...]: the tile's two consecutive blocks
        c0 = 0
        c1 = tile
    w_bufs = gl.allocate_shared_memory(gl.int32, [NUM_BUF] + wd.block_type.shape, wd.layout)
    s_bufs = gl.allocate_shared_memory(gl.uint8, [NUM_BUF] + sd.block_type.shape, sd.layout)
    x_bufs = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF] + xd.block_type.shape, xd.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    bufs = (w_bufs, s_bufs, x_bufs)
    bars = (ready, empty)
    gl.warp_specialize(
        [
            (_consumer, (bufs, bars, num_groups, out_ptr + tile, STAGE, DEQUANT_ASM)),
            (_producer, (wd, sd, xd, bufs, bars, c0, c1, num_groups, RESIDENT, X_ONCE)),
        ],
        [1],
        [24],
    )


def tile_boxes(w: NVFP4KernelWeights, experts: int, matrix: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Views of the first ``experts`` experts' words and scale codes of ``w``'s ``matrix``
    (row-blocked, contiguous) in which one ``[2, 1, 1, 32, *]`` box is a decode tile's 64 rows:

    * ``"w13"``: ``[2E, Ip/32, G, 32, *]``, the box at ``[2e, n, g]`` holds expert ``e``'s gate
      block ``n`` and its up block ``n`` (GEMM1's tile);
    * ``"w2"``: ``[2, E Hb/64, G, 32, *]`` (dim 0 steps one block, dim 1 two), the box at
      ``[0, t, g]`` holds blocks ``2t`` and ``2t + 1`` (GEMM2's tile ``t``).
    """
    words, codes = (w.w13, w.w13_scale) if matrix == "w13" else (w.w2, w.w2_scale)
    nb, g = words.shape[1:3]
    if matrix == "w13":
        return (
            words[:experts].reshape(2 * experts, nb // 2, g, 32, 32),
            codes[:experts].reshape(2 * experts, nb // 2, g, 32, 16),
        )
    return (
        words[:experts].as_strided((2, experts * nb // 2, g, 32, 32), (g * 1024, g * 2048, 1024, 32, 1)),
        codes[:experts].as_strided((2, experts * nb // 2, g, 32, 16), (g * 512, g * 1024, 512, 16, 1)),
    )


def ws_stage_call(
    w: NVFP4KernelWeights,
    x: torch.Tensor,
    experts: int,
    stage: str,
    num_buf: int = 3,
    resident: int = 0,
    maxnreg: int = 64,
    out: Optional[torch.Tensor] = None,
    matrix: str = "w13",
    x_once: bool = False,
    x_rows: int = 16,
    asm: str = DEQUANT_ASM.value,
) -> Callable[[], None]:
    """A launch of :func:`_ws_stage_kernel` over the first ``experts`` experts of ``w``'s
    ``matrix`` (row-blocked, contiguous; ``"w13"``: GEMM1's tiles of 32 gate and 32 up rows,
    ``"w2"``: GEMM2's tiles of 64 consecutive rows) with ``x[:1]`` (bf16, ``[>= 1, K]``, K the
    matrix's padded columns) as the one token.

    ``maxnreg``: registers a thread over the program's 8 warps (the producer warp's warpgroup
    keeps 24, the compute warpgroup gets ``2 * maxnreg - 24``): 64 holds four programs an SM with
    104 for the compute (no spills in the sm_90a build), 80 three with 136. ``x_once``: the
    activation tile copied with each buffer's first group only (``X_ONCE``); ``x_rows``: its rows,
    the MMAs' N (16, or 8: half the tensor-core work); ``asm``: the dequantization's PTX. A float a
    program into ``out`` (fp32, allocated when None)."""
    words, codes = tile_boxes(w, experts, matrix)
    nb, g = (w.w13 if matrix == "w13" else w.w2).shape[1:3]
    token = x[:1]
    wd = TensorDescriptor(
        words, list(words.shape), list(words.stride()), [2, 1, 1, 32, 32], gl.NVMMASharedLayout(128, 32, rank=5)
    )
    sd = TensorDescriptor(
        codes, list(codes.shape), list(codes.stride()), [2, 1, 1, 32, 16], gl.NVMMASharedLayout(0, 8, rank=5)
    )
    xd = TensorDescriptor(
        token, list(token.shape), list(token.stride()), [x_rows, 256], gl.NVMMASharedLayout(128, 16, rank=2)
    )
    ip = nb // 2 * 32
    grid = (experts * (ip // 32),)
    if out is None:
        out = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    return lambda: _ws_stage_kernel[grid](
        wd, sd, xd, out, ip, g, STAGE=stage, NUM_BUF=num_buf, RESIDENT=resident, GATE_UP=matrix == "w13",
        X_ONCE=x_once, DEQUANT_ASM=asm, num_warps=4, maxnreg=maxnreg,
    )  # fmt: skip
