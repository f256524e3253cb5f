"""Per-token-group FP8 quantization of the hidden states (the GEMM1 input of the prefill path).

``hidden [T, H]`` bf16 -> ``q [T, H]`` e4m3 and, when dynamic, ``s [T, ceil(H/128)]``
fp32: one scale per token per 128 channels (a last partial group scaled by its
own amax). With a static per-tensor scale only ``q`` is written. Each token is
quantized once even though it feeds k experts. ``vllm`` reproduces vLLM's
``per_token_group_fp8_quant`` bit for bit (``fp8_tile.quantize_tile_vllm``).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...quant.fp8 import BLOCK
from ...runtime import workspace
from .fp8_tile import quantize_tile, quantize_tile_vllm

GROUP = BLOCK
#: Groups one program quantizes (one token, GROUPS_PER_PROGRAM * 128 channels).
GROUPS_PER_PROGRAM = 8


@triton.jit
def _act_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    static_ptr,
    H,
    stride_xm,
    stride_qm,
    stride_sm,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    STATIC: tl.constexpr,
    UE8M0: tl.constexpr,
    VLLM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * NUM_GROUPS + tl.arange(0, NUM_GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < H
    x = tl.load(x_ptr + t * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if VLLM:
        q, s = quantize_tile_vllm(x, False)
    else:
        q, s = quantize_tile(x, static_ptr, STATIC, UE8M0)
    tl.store(q_ptr + t * stride_qm + cols, q, mask=mask)
    if not STATIC:
        tl.store(s_ptr + t * stride_sm + g, s, mask=g * GROUP < H)


def act_quant_fp8(
    hidden: torch.Tensor, static_scale: Optional[torch.Tensor], ue8m0: bool, vllm: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``hidden [T, H]`` (bf16, T > 0, unit column stride) to e4m3.

    ``vllm``: vLLM's numerics (dynamic scales only, no ``ue8m0``).

    Returns ``(q [T, H] float8_e4m3fn, s)`` with ``s [T, ceil(H/128)]`` fp32 for
    dynamic scales, or ``static_scale`` itself (``[1]`` fp32) when given.
    """
    t, h = hidden.shape
    assert hidden.stride(1) == 1
    groups = triton.cdiv(h, GROUP)
    q = workspace(t, h, torch.float8_e4m3fn, hidden.device, "moe_input_fp8")
    static = static_scale is not None
    assert not (vllm and (static or ue8m0))
    s = static_scale if static_scale is not None else torch.empty(t, groups, dtype=torch.float32, device=hidden.device)
    grid = (t, triton.cdiv(groups, GROUPS_PER_PROGRAM))
    _act_quant_kernel[grid](
        hidden,
        q,
        s,
        s,
        h,
        hidden.stride(0),
        q.stride(0),
        s.stride(0),
        GROUP=GROUP,
        NUM_GROUPS=GROUPS_PER_PROGRAM,
        STATIC=static,
        UE8M0=ue8m0,
        VLLM=vllm,
        num_warps=4,
    )
    return q, s
