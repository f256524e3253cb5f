"""Per-token-group FP8 quantization of the hidden states (the GEMM1 input of the prefill path).

``hidden [T, H]`` bf16 -> ``q [T, H]`` e4m3 and, when dynamic, ``s [T, ceil(H/128)]``
fp32: one scale per token per 128 channels (a last partial group scaled by its
own amax). With a static per-tensor scale only ``q`` is written. Each token is
quantized once even though it feeds k experts. ``vllm`` reproduces vLLM's
``per_token_group_fp8_quant`` bit for bit (``fp8_tile.quantize_tile_vllm``).

:func:`act_quant_scatter_fp8` quantizes the same way and writes each token's codes and scales
straight to the rows of its routed pairs (the grouped GEMMs' gathered operand), so the quantized
copy is never written and read back.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from ...quant.fp8 import BLOCK
from ...runtime import workspace
from .fp8_tile import quantize_tile, quantize_tile_vllm
from .tiles import zero_fill

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
    row_of_pair_ptr,
    programs_per_token,
    zero_ptr,
    zero_numel,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    STATIC: tl.constexpr,
    UE8M0: tl.constexpr,
    VLLM: tl.constexpr,
    SCATTER_K: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
):
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()  # the GEMM launched after it may start; it waits before reading q
    # a buffer the launches after this one add into (fp8_swapab's fused down projection)
    zero_fill(zero_ptr, zero_numel, 1024)
    # a token's column blocks are adjacent programs: programs running together read and write
    # whole rows, not the same columns of many rows (DRAM page locality)
    pid = tl.program_id(0)
    t = (pid // programs_per_token).to(tl.int64)
    g = (pid % programs_per_token) * NUM_GROUPS + tl.arange(0, NUM_GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < H
    x = tl.load(x_ptr + t * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if VLLM:
        q, s = quantize_tile_vllm(x, False)
    else:
        q, s = quantize_tile(x, static_ptr, STATIC, UE8M0)
    if SCATTER_K == 0:
        tl.store(q_ptr + t * stride_qm + cols, q, mask=mask)
        if not STATIC:
            tl.store(s_ptr + t * stride_sm + g, s, mask=g * GROUP < H)
    else:
        # one copy per routed pair of this token; -1: the pair has no local expert (no row)
        for j in tl.static_range(SCATTER_K):
            row = tl.load(row_of_pair_ptr + t * SCATTER_K + j).to(tl.int64)
            if row >= 0:
                tl.store(q_ptr + row * stride_qm + cols, q, mask=mask)
                tl.store(s_ptr + row * stride_sm + g, s, mask=g * GROUP < H)


def act_quant_fp8(
    hidden: torch.Tensor,
    static_scale: Optional[torch.Tensor],
    ue8m0: bool,
    vllm: bool = False,
    launch_dependents: bool = False,
    zero: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``hidden [T, H]`` (bf16, T > 0, unit column stride) to e4m3.

    ``vllm``: vLLM's numerics (dynamic scales only, no ``ue8m0``). ``launch_dependents``: the
    next launch, if it is a programmatic dependent launch, may start at once (it must wait for
    this grid before reading ``q`` and ``s``); a GPU only. ``zero``: a contiguous fp32 tensor
    the same launch sets to 0 (or None).

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
    assert zero is None or (zero.is_contiguous() and zero.dtype == torch.float32)
    _launch(
        hidden,
        q,
        s,
        s,
        zero,
        STATIC=static,
        UE8M0=ue8m0,
        VLLM=vllm,
        SCATTER_K=0,
        LAUNCH_DEPENDENTS=launch_dependents,
    )
    return q, s


def act_quant_scatter_fp8(
    hidden: torch.Tensor, row_of_pair: torch.Tensor, q: torch.Tensor, s: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``hidden [T, H]`` (bf16, T > 0, unit column stride) per token per 128 channels,
    as :func:`act_quant_fp8` with dynamic scales, and write token ``t``'s codes and scales to
    rows ``row_of_pair[t * k + j]`` of ``q [P, H]`` e4m3 and ``s [P, ceil(H/128)]`` fp32 for each
    slot ``j`` (``row_of_pair [T * k]`` int32, -1: no row). Rows no pair names are not written.

    Returns ``(q, s)``.
    """
    t = hidden.shape[0]
    assert hidden.stride(1) == 1 and q.stride(1) == 1 and s.stride(1) == 1
    assert row_of_pair.numel() % t == 0 and row_of_pair.dtype == torch.int32
    _launch(
        hidden,
        q,
        s,
        row_of_pair,
        None,
        STATIC=False,
        UE8M0=False,
        VLLM=False,
        SCATTER_K=row_of_pair.numel() // t,
        LAUNCH_DEPENDENTS=False,
    )
    return q, s


def _launch(
    hidden: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    row_of_pair: torch.Tensor,
    zero: Optional[torch.Tensor],
    **flags: object,
) -> None:
    """One program per token and ``GROUPS_PER_PROGRAM`` groups of 128 channels (a token's
    programs adjacent in the one-dimensional grid); ``s`` also
    stands in for the static-scale pointer (read only when ``STATIC``), ``row_of_pair`` is read
    only when ``SCATTER_K`` > 0; ``zero`` (or None) is zeroed by the grid's shares."""
    t, h = hidden.shape
    per_token = triton.cdiv(triton.cdiv(h, GROUP), GROUPS_PER_PROGRAM)
    _act_quant_kernel[(t * per_token,)](
        hidden,
        q,
        s,
        s,
        h,
        hidden.stride(0),
        q.stride(0),
        s.stride(0),
        row_of_pair,
        per_token,
        s if zero is None else zero,
        0 if zero is None else zero.numel(),
        GROUP=GROUP,
        NUM_GROUPS=GROUPS_PER_PROGRAM,
        num_warps=4,
        **flags,
    )
