"""SiLU-and-mul of GEMM1's fp32 gate/up with FP8 requantization: the GEMM2 input of the FP8
grouped (CuTe DSL) prefill path.

``gate_up [P, 2I]`` fp32 (gate columns ``[:I]``, up ``[I:]``, the checkpoint's ``w13`` order) ->
``y [P, I]`` e4m3 and ``y_scale [P, I/128]`` fp32, one scale per row per 128 columns:

* ``v = gate * sigmoid(gate) * up`` in fp32 (Triton's ``tl.sigmoid``, as the Triton FP8 kernels'
  GEMM1 epilogues compute it);
* ``s = max(amax(v), 1e-10) * RCP_FP8_MAX``, ``y = e4m3(clamp(v * (1 / s), -448, 448))`` with the
  reciprocal an IEEE division and round-to-nearest-even (``fp8_tile.quantize_tile``): bit for bit
  :func:`moe_backend.quant.fp8.quantize_fp8_per_token_group` applied to ``v``.

``num_rows`` (a one-element int32 device tensor, e.g. ``cu_seqlens[-1:]``) bounds the rows
worked on without a host sync: rows at or past it are neither read nor written.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._checks import check_tensor
from ...quant.fp8 import BLOCK, FP8_DTYPE
from .fp8_tile import quantize_tile

#: Groups of 128 columns one program handles (one row, GROUPS_PER_PROGRAM * 128 columns).
GROUPS_PER_PROGRAM = 4


@triton.jit
def _silu_mul_quant_kernel(
    gu_ptr,
    y_ptr,
    s_ptr,
    rows_ptr,
    INTER,
    stride_gm,
    stride_ym,
    stride_sm,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    BOUNDED: tl.constexpr,
):
    r = tl.program_id(0)
    if BOUNDED:
        if r >= tl.load(rows_ptr):
            return
    row = r.to(tl.int64)
    g = tl.program_id(1) * NUM_GROUPS + tl.arange(0, NUM_GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < INTER
    gate = tl.load(gu_ptr + row * stride_gm + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * stride_gm + INTER + cols, mask=mask, other=0.0)
    v = gate * tl.sigmoid(gate) * up
    q, s = quantize_tile(v, s_ptr, False, False)  # s_ptr: no static scale is read
    tl.store(y_ptr + row * stride_ym + cols, q, mask=mask)
    tl.store(s_ptr + row * stride_sm + g, s, mask=g * GROUP < INTER)


def silu_mul_quant(
    gate_up: torch.Tensor, y: torch.Tensor, y_scale: torch.Tensor, num_rows: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y, y_scale = quantize(silu(gate_up[:, :I]) * gate_up[:, I:])`` per row per 128 columns.

    Args:
        gate_up: ``[P, 2I]`` fp32, unit column stride; I a multiple of 128.
        y: ``[P, I]`` float8_e4m3fn, unit column stride (written).
        y_scale: ``[P, I/128]`` fp32, unit column stride (written).
        num_rows: optional ``[1]`` int32 on ``gate_up``'s device: only rows ``[:num_rows]`` are
            read and written (read on the device: no host sync, CUDA-graph safe).

    Returns ``(y, y_scale)``. Raises TypeError / ValueError naming the argument.
    """
    check_tensor("gate_up", gate_up, dtype=torch.float32, ndim=2, contiguous=False)
    p, two_i = gate_up.shape
    if two_i % (2 * BLOCK):
        raise ValueError(f"gate_up: expected [P, 2I] with I a multiple of {BLOCK}, got shape {tuple(gate_up.shape)}")
    inter = two_i // 2
    dev = gate_up.device
    check_tensor("y", y, dtype=FP8_DTYPE, shape=(p, inter), device=dev, contiguous=False)
    check_tensor("y_scale", y_scale, dtype=torch.float32, shape=(p, inter // BLOCK), device=dev, contiguous=False)
    for name, t in (("gate_up", gate_up), ("y", y), ("y_scale", y_scale)):
        if t.stride(1) != 1:
            raise ValueError(f"{name}: expected unit column stride, got strides {t.stride()}")
    if num_rows is not None:
        check_tensor("num_rows", num_rows, dtype=torch.int32, shape=(1,), device=dev)
    if p == 0:
        return y, y_scale
    groups = inter // BLOCK
    grid = (p, triton.cdiv(groups, GROUPS_PER_PROGRAM))
    _silu_mul_quant_kernel[grid](
        gate_up,
        y,
        y_scale,
        num_rows if num_rows is not None else y_scale,
        inter,
        gate_up.stride(0),
        y.stride(0),
        y_scale.stride(0),
        GROUP=BLOCK,
        NUM_GROUPS=GROUPS_PER_PROGRAM,
        BOUNDED=num_rows is not None,
        num_warps=4,
    )
    return y, y_scale
