"""NVFP4 expert matrices dequantized to bf16, for the active experts only (the grouped-GEMM prefill path).

Reads the checkpoint's linear layout (:class:`~moe_backend.expert_weights.NVFP4Weights`):
``packed [E, N, K/2]`` uint8 (element ``2i`` in the low nibble), ``block_scale [E, N, K/16]`` e4m3,
``global_scale [E, G]`` fp32 where rows ``[g * N/G, (g + 1) * N/G)`` take global ``g`` (``G = 2``
for ``w13``'s gate and up halves, 1 for ``w2``). Writes ``out[s] = dequant(expert_of_segment[s])``
in bf16 (``code * block_scale * global`` in fp32, rounded once, as the W4A16 kernels do); segments
whose expert is -1 are skipped. With ``interleave``, source row ``n`` of half ``n // (N/2)`` lands
in row ``2 * (n % (N/2)) + n // (N/2)`` (gate and up rows interleaved, as the gated grouped GEMM
reads them). ``out`` is a view of the shared workspace pool: one buffer of
``min(E, T * k)`` matrices serves every layer.

:func:`dequantize_kernel_layout_segments` does the same from the W4A16 kernels' layout
(:class:`~moe_backend.kernels.sm90.nvfp4_layout.NVFP4KernelWeights`), so that the NVFP4 Triton
kernel's prepared weights also serve its grouped-GEMM prefill path without a second copy. It
decodes with the W4A16 GEMMs' own helper (``nvfp4_tile.dequant_group``: integer bit moves and
one ``fma`` a pair, ``-code * block_scale * 2**-8`` exact in bf16), then multiplies by the global
scale times ``-2**8`` in fp32 and rounds once: the same bf16 values as the checkpoint-layout kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.nvfp4 import GROUP
from ..interpret import INTERPRETING
from .fp8_tile import to_bf16
from .nvfp4_layout import K_GROUP, NVFP4KernelWeights, kernel_k_order
from .nvfp4_tile import WEIGHT_RESCALE, dequant_group

BLOCK_N = 32
BLOCK_K = 256
NUM_WARPS = 4


@triton.jit
def _e2m1_value(code):
    """fp32 value of 4-bit e2m1 codes (bit 3 sign, then 2 exponent bits and 1 mantissa bit)."""
    mag = code & 7
    exp = mag >> 1
    mant = (mag & 1).to(tl.float32)
    normal = (1.0 + 0.5 * mant) * tl.exp2((exp - 1).to(tl.float32))
    value = tl.where(exp == 0, 0.5 * mant, normal)
    return tl.where((code & 8) != 0, -value, value)


@triton.jit
def _dequant_kernel(
    packed_ptr,
    scale_ptr,
    global_ptr,
    expert_ptr,
    out_ptr,
    N,
    K,
    rows_per_global,
    num_globals,
    INTERLEAVE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    s = tl.program_id(0)
    e = tl.load(expert_ptr + s).to(tl.int64)
    if e < 0:
        return
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    half = tl.program_id(2) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    row_ok = rows < N
    mask = row_ok[:, None] & (half < K // 2)[None, :]
    byte = tl.load(packed_ptr + e * N * (K // 2) + rows[:, None] * (K // 2) + half[None, :], mask=mask, other=0).to(
        tl.int32
    )
    values = tl.reshape(tl.join(_e2m1_value(byte & 15), _e2m1_value(byte >> 4)), (BLOCK_N, BLOCK_K))
    groups = tl.program_id(2) * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
    smask = row_ok[:, None] & (groups < K // GROUP)[None, :]
    scale = tl.load(
        scale_ptr + e * N * (K // GROUP) + rows[:, None] * (K // GROUP) + groups[None, :], mask=smask, other=0.0
    ).to(tl.float32)
    glob = tl.load(global_ptr + e * num_globals + rows // rows_per_global, mask=row_ok, other=0.0)
    scale = scale * glob[:, None]
    w = tl.reshape(tl.reshape(values, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * scale[:, :, None], (BLOCK_N, BLOCK_K))
    cols = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_mask = row_ok[:, None] & (cols < K)[None, :]
    if INTERLEAVE:
        out_rows = 2 * (rows % (N // 2)) + rows // (N // 2)
    else:
        out_rows = rows
    tl.store(out_ptr + s.to(tl.int64) * N * K + out_rows[:, None] * K + cols[None, :], to_bf16(w), mask=out_mask)


def dequantize_segments(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    expert_of_segment: torch.Tensor,
    out: torch.Tensor,
    *,
    interleave: bool = False,
) -> torch.Tensor:
    """Dequantize expert ``expert_of_segment[s]`` into ``out[s]`` for every segment ``s``
    (``interleave``: gate/up rows interleaved, see the module doc; N even).

    ``packed [E, N, K/2]`` uint8, ``block_scale [E, N, K/16]`` e4m3, ``global_scale [E, G]`` fp32
    (``G`` divides N), ``expert_of_segment [S]`` int32 (-1: skip), ``out [S, N, K]`` bf16; all
    contiguous on one device, K a multiple of 16. Returns ``out``.
    """
    e, n, k_half = packed.shape
    k = 2 * k_half
    s = expert_of_segment.shape[0]
    assert k % GROUP == 0 and n % global_scale.shape[1] == 0 and out.shape == (s, n, k)
    assert not interleave or n % 2 == 0
    assert all(t.is_contiguous() for t in (packed, block_scale, global_scale, expert_of_segment, out))
    if s == 0:
        return out
    grid = (s, triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
    _dequant_kernel[grid](
        packed,
        block_scale,
        global_scale,
        expert_of_segment,
        out,
        n,
        k,
        n // global_scale.shape[1],
        global_scale.shape[1],
        INTERLEAVE=interleave,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        GROUP=GROUP,
        num_warps=NUM_WARPS,
    )
    return out


#: Kernel-layout rows per program of :func:`dequantize_kernel_layout_segments`.
KL_BLOCK_ROWS = 32


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
    WORDS_PER_ROW,
    num_globals,
    GATE_UP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    s = tl.program_id(0)
    e = tl.load(expert_ptr + s).to(tl.int64)
    if e < 0:
        return
    g = tl.program_id(2)  # the 256-K group
    krow = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = krow < ROWS
    w = tl.arange(0, 16)
    base = (e * ROWS + krow[:, None]) * WORDS_PER_ROW + g * 32 + w[None, :]
    words0 = tl.load(words_ptr + base, mask=row_ok[:, None], other=0)
    words1 = tl.load(words_ptr + base + 16, mask=row_ok[:, None], other=0)
    scales = tl.load(
        scale_ptr + (e * ROWS + krow[:, None]) * (WORDS_PER_ROW // 2) + g * 16 + w[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    # [R, 256] bf16 in kernel_k_order: position 128 h + 32 s + 2 w + i is natural 16 w + 8 h + 2 s + i
    vals = dequant_group(words0, words1, scales, INTERPRET)
    vals = tl.reshape(tl.permute(tl.reshape(vals, (BLOCK_R, 2, 4, 16, 2)), (0, 3, 1, 2, 4)), (BLOCK_R, 256))
    if GATE_UP:
        # w13: kernel row (half, group, position q) is natural row group*256 + order[q] of its half
        half = krow // ROWS_PER_HALF
        r = krow % ROWS_PER_HALF
        nat = (r // 256) * 256 + tl.load(order_ptr + r % 256, mask=row_ok, other=0)
        row_ok = row_ok & (nat < NATURAL_PER_HALF)
        out_row = 2 * nat + half  # gate and up interleaved
        glob_idx = half
    else:
        out_row = krow
        glob_idx = krow * 0
    glob = tl.load(global_ptr + e * num_globals + glob_idx, mask=row_ok, other=0.0) * WEIGHT_RESCALE
    v = vals.to(tl.float32) * glob[:, None]
    cols = g * 256 + tl.arange(0, 256)
    mask = row_ok[:, None] & (cols < K)[None, :]
    tl.store(
        out_ptr + s.to(tl.int64) * N * K + out_row[:, None].to(tl.int64) * K + cols[None, :], to_bf16(v), mask=mask
    )


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
    up ``n``), and ``w2_out[s]`` ``[H, I]`` bf16, for every segment ``s`` (-1: skipped); the
    values of :func:`dequantize_segments` on the checkpoint layout. Contiguous, one device."""
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
        rows, words_per_row = words.shape[1], words.shape[2]
        n, k = out.shape[1], out.shape[2]
        grid = (s, triton.cdiv(rows, KL_BLOCK_ROWS), words_per_row * 8 // K_GROUP)
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
            words_per_row,
            glob.reshape(glob.shape[0], -1).shape[1],
            GATE_UP=gate_up,
            BLOCK_R=KL_BLOCK_ROWS,
            INTERPRET=INTERPRETING,
            num_warps=NUM_WARPS,
        )
