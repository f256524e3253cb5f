"""NVFP4 expert matrices dequantized to bf16, for the active experts only (the grouped-GEMM prefill path).

:func:`dequantize_kernel_layout_segments` reads the W4A16 kernels' layout
(:class:`~moe_backend.kernels.sm90.nvfp4_layout.NVFP4KernelWeights`), so that the NVFP4 Triton
kernel's prepared weights also serve the grouped-GEMM prefill, without a second copy, and writes
``out[s] = dequant(expert_of_segment[s])`` in bf16; segments whose expert is -1 are skipped.
``w13``'s gate and up rows come out interleaved (row ``2n`` gate ``n``, ``2n + 1`` up ``n``, as the
gated grouped GEMM reads them). It decodes with the W4A16 GEMMs' own helper
(``nvfp4_tile.dequant_group``: integer bit moves and one ``fma`` a pair, ``-code * block_scale *
2**-8`` exact in bf16), then multiplies by the global scale times ``-2**8`` in fp32 and rounds
once. ``out`` is a view of the shared workspace pool: one buffer of ``min(E, T * k)`` matrices
serves every layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..interpret import INTERPRETING
from .fp8_tile import to_bf16
from .nvfp4_layout import NVFP4KernelWeights, kernel_k_order, weight_geometry
from .nvfp4_tile import WEIGHT_RESCALE, dequant_group, row_offsets

#: Kernel-layout rows and 256-K groups per program, and warps, of
#: :func:`dequantize_kernel_layout_segments`. On the H200 (E=32, DeepSeek-V3 widths, 2026-12-04,
#: ``scripts/gpu_probe_dequant.py``): the grid ordered with the K groups fastest took 929 us
#: against 1075 with the segments fastest (programs running together then touched the same
#: columns of many rows: DRAM page misses); a fill of the same bf16 outputs takes 833. 16 or 64
#: rows, 8 warps, default-policy stores (935) or dropping the permute to natural K order (931)
#: gained nothing; before the reordering, one group a program 1143, 4 groups slower.
BLOCK_ROWS = 32
GROUPS_PER_PROGRAM = 2  # the kernel loads and stores two groups explicitly
NUM_WARPS = 4


@triton.jit
def _kernel_layout_dequant_kernel(
    words_ptr,
    scale_ptr,
    global_ptr,
    expert_ptr,
    order_ptr,
    out_ptr,
    ROWS,
    N,
    K,
    ROWS_PER_HALF,
    NATURAL_PER_HALF,
    GROUPS,
    stride_we,
    stride_wb,
    stride_wr,
    stride_wg,
    stride_se,
    stride_sb,
    stride_sr,
    stride_sg,
    num_globals,
    GATE_UP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # K groups vary fastest across the grid: programs running together read and write adjacent
    # pieces of the same rows (DRAM page locality)
    s = tl.program_id(2)
    e = tl.load(expert_ptr + s).to(tl.int64)
    if e < 0:
        return
    krow = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = krow < ROWS
    if GATE_UP:
        # w13: kernel row (half, group, position q) is natural row group*256 + order[q] of its half
        half = krow // ROWS_PER_HALF
        r = krow % ROWS_PER_HALF
        nat = (r // 256) * 256 + tl.load(order_ptr + r % 256, mask=row_ok, other=0)
        out_ok = row_ok & (nat < NATURAL_PER_HALF)
        out_row = 2 * nat + half  # gate and up interleaved
        glob_idx = half
    else:
        out_ok = row_ok
        out_row = krow
        glob_idx = krow * 0
    glob = tl.load(global_ptr + e * num_globals + glob_idx, mask=out_ok, other=0.0) * WEIGHT_RESCALE
    out_rows = out_ptr + s.to(tl.int64) * N * K + out_row[:, None].to(tl.int64) * K
    # both groups' words and scale codes are loaded before either group is stored: the loads
    # would not move above a store to a pointer that might alias them
    g = tl.program_id(0) * 2
    w_rows = words_ptr + e * stride_we + row_offsets(krow, stride_wb, stride_wr)
    s_rows = scale_ptr + e * stride_se + row_offsets(krow, stride_sb, stride_sr)
    words0, words1, scales = _load_group(w_rows, s_rows, row_ok, g, GROUPS, stride_wg, stride_sg)
    words2, words3, scales1 = _load_group(w_rows, s_rows, row_ok, g + 1, GROUPS, stride_wg, stride_sg)
    _store_group(words0, words1, scales, glob, out_rows, out_ok, g, K, BLOCK_R, INTERPRET)
    _store_group(words2, words3, scales1, glob, out_rows, out_ok, g + 1, K, BLOCK_R, INTERPRET)


@triton.jit
def _load_group(w_rows, s_rows, row_ok, g, GROUPS, stride_wg, stride_sg):
    """256-K group ``g`` of the rows whose first word and scale code ``w_rows`` / ``s_rows`` ``[R]``
    point at: its two word halves ``[R, 16]`` int32 and scale codes ``[R, 16]`` (zeros past the
    matrix's last group)."""
    w = tl.arange(0, 16)[None, :]
    load_ok = row_ok[:, None] & (g < GROUPS)
    words = w_rows[:, None] + g * stride_wg + w
    words0 = tl.load(words, mask=load_ok, other=0)
    words1 = tl.load(words + 16, mask=load_ok, other=0)
    scales = tl.load(s_rows[:, None] + g * stride_sg + w, mask=load_ok, other=0)
    return words0, words1, scales


@triton.jit
def _store_group(words0, words1, scales, glob, out_rows, out_ok, g, K, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    """Decode group ``g`` (from :func:`_load_group`) and store its 256 columns of each row in
    natural K order, times the row's global scale, rounded once to bf16 (streaming stores: the
    grouped GEMM reads them once, after the whole pool is written)."""
    # [R, 256] bf16 in kernel_k_order: position 128 h + 32 s + 2 w + i is natural 16 w + 8 h + 2 s + i
    vals = dequant_group(words0, words1, scales, INTERPRET)
    vals = tl.reshape(tl.permute(tl.reshape(vals, (BLOCK_R, 2, 4, 16, 2)), (0, 3, 1, 2, 4)), (BLOCK_R, 256))
    v = vals.to(tl.float32) * glob[:, None]
    cols = g * 256 + tl.arange(0, 256)
    tl.store(out_rows + cols[None, :], to_bf16(v), mask=out_ok[:, None] & (cols < K)[None, :], cache_modifier=".cs")


_ORDERS: dict = {}


def _k_order(device: torch.device) -> torch.Tensor:
    """``kernel_k_order()`` as int32 on ``device`` (built once per device: not inside a capture)."""
    key = str(device)
    if key not in _ORDERS:
        _ORDERS[key] = kernel_k_order().to(torch.int32).to(device)
    return _ORDERS[key]


def dequantize_kernel_layout_segments(
    w: NVFP4KernelWeights, expert_of_segment: torch.Tensor, w13_out: torch.Tensor, w2_out: torch.Tensor
) -> None:
    """Dequantize expert ``expert_of_segment[s]`` of ``w`` (the W4A16 kernels' layout) into
    ``w13_out[s]`` ``[2I, H]`` bf16, gate and up rows interleaved (row ``2n`` gate ``n``, ``2n + 1``
    up ``n``), and ``w2_out[s]`` ``[H, I]`` bf16, for every segment ``s`` (-1: skipped): the
    checkpoint's ``code * block_scale * global_scale``, rounded once. Contiguous, one device."""
    s = expert_of_segment.shape[0]
    h, i = w.hidden_size, w.intermediate_size
    assert w13_out.shape == (s, 2 * i, h) and w2_out.shape == (s, h, i)
    assert all(t.is_contiguous() for t in (w.w13, w.w13_scale, w.w2, w.w2_scale, expert_of_segment, w13_out, w2_out))
    if s == 0:
        return
    order = _k_order(w13_out.device)
    for words, scale, glob, out, gate_up in (
        (w.w13, w.w13_scale, w.w13_scale_2, w13_out, True),
        (w.w2, w.w2_scale, w.w2_scale_2, w2_out, False),
    ):
        geo = weight_geometry(words, scale)
        n, k = out.shape[1], out.shape[2]
        rows = geo.rows if gate_up else n  # w2's padding rows (to whole blocks) are not dequantized
        grid = (triton.cdiv(geo.groups, GROUPS_PER_PROGRAM), triton.cdiv(rows, BLOCK_ROWS), s)
        _kernel_layout_dequant_kernel[grid](
            words,
            scale,
            glob,
            expert_of_segment,
            order,
            out,
            rows,
            n,
            k,
            rows // 2,
            i,
            geo.groups,
            *geo.words,
            *geo.scales,
            glob.reshape(glob.shape[0], -1).shape[1],
            GATE_UP=gate_up,
            BLOCK_R=BLOCK_ROWS,
            INTERPRET=INTERPRETING,
            num_warps=NUM_WARPS,
        )
