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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.nvfp4 import GROUP
from .fp8_tile import to_bf16

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
