"""GEMM1 of the FP8 fused experts: gate/up projection with SiLU-and-mul fused.

For each tile of ``BLOCK_M`` aligned rows (one local expert ``e``) and each
``BLOCK_N`` columns ``n`` of the intermediate, one program accumulates
``gate = x @ w13[e, n].T`` and ``up = x @ w13[e, I + n].T`` in two fp32
accumulators over ``H`` and writes ``y = silu(gate) * up`` for those columns:

* ``QUANT_OUT`` (prefill): ``y`` quantized to e4m3 in the epilogue, per row per
  128 columns (``BLOCK_N == 128``: one tile column block is one group) or with
  the static ``a2_scale``; writes ``y [P, I]`` e4m3 and ``y_scale [P, I/128]`` fp32;
* otherwise (decode): ``y`` stays fp32 and GEMM2 quantizes it as it loads it,
  which frees ``BLOCK_N`` to spread a few experts over every SM.

Rows ``P`` are aligned positions (``align.AlignedRouting``), so GEMM2 reads
them contiguously. The input is either pre-quantized e4m3 (``act_quant``) or
the bf16 hidden states quantized tile by tile as they are loaded
(``QUANT_ON_LOAD``: decode, and router weight on the input, which needs one
quantization per (token, expert) pair).

``VLLM_ORDER`` (prefill, block scales, dynamic; 0: off): vLLM's Triton fused-MoE numerics
bit for bit: the K blocks scaled in its order (1: ``(dot * a_scale) * w_scale``, 2: its
swapped-operand ``(dot * w_scale) * a_scale``), ``gate`` and ``up`` rounded to bf16 before
vLLM's SiLU-and-mul, and its group quantization (``fp8_tile.quantize_tile_vllm``).

The programs also zero ``zero_numel`` fp32 of the GEMM2 workspace (a grid-stride
share each, before any early exit): GEMM2 accumulates into it with atomics and
runs after this kernel on the stream, so no separate memset launch is needed.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ...quant.fp8 import BLOCK as SCALE_BLOCK
from ...runtime import workspace
from .align import AlignedRouting
from .fp8_tile import quantize_tile, quantize_tile_vllm, scale_block, silu_vllm, to_bf16
from .tiles import aligned_rows, tile_coords, zero_fill

ZERO_BLOCK = tl.constexpr(1024)


@triton.jit
def _gemm1_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    y_ptr,
    y_scale_ptr,
    sorted_ptr,
    tile_expert_ptr,
    num_padded_ptr,
    topk_w_ptr,
    a_static_ptr,
    y_static_ptr,
    zero_ptr,
    zero_numel,
    num_pairs,
    H,
    I,
    top_k,
    max_tiles,
    stride_am,
    stride_asm,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_ym,
    stride_ysm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    QUANT_ON_LOAD: tl.constexpr,
    A_STATIC: tl.constexpr,
    QUANT_OUT: tl.constexpr,
    Y_STATIC: tl.constexpr,
    BLOCK_SCALED: tl.constexpr,
    UE8M0: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    VLLM_ORDER: tl.constexpr,
):
    pid = tl.program_id(0)
    zero_fill(zero_ptr, zero_numel, ZERO_BLOCK)

    pid_m, pid_n = tile_coords(pid, max_tiles, tl.cdiv(I, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows, pair, row_ok, expert, offs_n, n_ok = aligned_rows(
        pid_m, pid_n, sorted_ptr, tile_expert_ptr, num_pairs, I, BLOCK_M, BLOCK_N
    )
    token = (pair // top_k).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + token[:, None] * stride_am + offs_k[None, :]
    # Weights as [BLOCK_K, BLOCK_N] views of the K-major rows (what fp8 MMA wants).
    wg_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    wu_ptrs = wg_ptrs + I * stride_wn
    if BLOCK_SCALED:
        ws_ptr = w_scale_ptr + expert * stride_wse
        wsg_ptr = ws_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_wsn
        wsu_ptr = ws_ptr + ((I + pid_n * BLOCK_N) // BLOCK_K) * stride_wsn
    if WEIGHT_ON_INPUT:
        router_w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)

    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(H, BLOCK_K)):
        k_ok = kb * BLOCK_K + offs_k < H
        if EVEN_K:
            a_mask = row_ok[:, None]
            w_mask = n_ok[None, :]
        else:
            a_mask = row_ok[:, None] & k_ok[None, :]
            w_mask = n_ok[None, :] & k_ok[:, None]
        if QUANT_ON_LOAD:
            x = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            if WEIGHT_ON_INPUT:
                x = x * router_w[:, None]
            a, a_s = quantize_tile(x, a_static_ptr, A_STATIC, UE8M0)
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            if A_STATIC:
                a_s = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(a_static_ptr)
            else:
                a_s = tl.load(a_scale_ptr + token * stride_asm + kb, mask=row_ok, other=0.0)
        wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
        if BLOCK_SCALED:
            acc_g += scale_block(tl.dot(a, wg), a_s, tl.load(wsg_ptr + kb), VLLM_ORDER)
            acc_u += scale_block(tl.dot(a, wu), a_s, tl.load(wsu_ptr + kb), VLLM_ORDER)
        elif A_STATIC:
            # Promote to fp32 every K block: Hopper's FP8 MMA accumulates with ~14-bit
            # mantissas, too coarse over all of H (Triton's sm90 default never promotes).
            acc_g = tl.dot(a, wg, acc_g, max_num_imprecise_acc=BLOCK_K)
            acc_u = tl.dot(a, wu, acc_u, max_num_imprecise_acc=BLOCK_K)
        else:
            acc_g += tl.dot(a, wg) * a_s[:, None]
            acc_u += tl.dot(a, wu) * a_s[:, None]
        a_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K

    if not BLOCK_SCALED:  # per-tensor: one weight scale per expert matrix
        post = tl.load(w_scale_ptr + expert)
        if A_STATIC:
            post = post * tl.load(a_static_ptr)
        acc_g = acc_g * post
        acc_u = acc_u * post
    if VLLM_ORDER:
        y = silu_vllm(to_bf16(acc_g).to(tl.float32)) * to_bf16(acc_u).to(tl.float32)
    else:
        y = acc_g * tl.sigmoid(acc_g) * acc_u
    y = tl.where(n_ok[None, :], y, 0.0)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if QUANT_OUT:
        if VLLM_ORDER:
            q, s = quantize_tile_vllm(y, True)
        else:
            q, s = quantize_tile(y, y_static_ptr, Y_STATIC, UE8M0)
        tl.store(y_ptrs, q, mask=n_ok[None, :])
        if not Y_STATIC:
            tl.store(y_scale_ptr + rows.to(tl.int64) * stride_ysm + pid_n, s)
    else:
        tl.store(y_ptrs, y, mask=n_ok[None, :])


def gemm1_fp8(
    a: torch.Tensor,
    a_scale: Optional[torch.Tensor],
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    routing: AlignedRouting,
    topk_weights: torch.Tensor,
    zero: torch.Tensor,
    *,
    num_pairs: int,
    top_k: int,
    block_scaled: bool,
    quant_on_load: bool,
    a13_static: Optional[torch.Tensor],
    quant_out: bool,
    a2_static: Optional[torch.Tensor],
    ue8m0: bool,
    weight_on_input: bool,
    vllm_order: int,
    BLOCK_N: int,
    BLOCK_K: int,
    GROUP_M: int,
    num_warps: int,
    num_stages: int,
) -> "tuple[torch.Tensor, Optional[torch.Tensor]]":
    """Launch GEMM1 + SiLU-and-mul over the aligned rows.

    Args:
        a: ``[T, H]`` bf16 hidden states (``quant_on_load``) or e4m3 from ``act_quant``.
        a_scale: ``[T, ceil(H/128)]`` fp32 dynamic scales of a pre-quantized ``a``, else unused.
        w13, w13_scale: ``[E, 2I, H]`` e4m3; ``[E, 2I/128, H/128]`` (block) or ``[E]`` fp32.
        routing: aligned rows; topk_weights ``[T, k]`` fp32 (read with ``weight_on_input``).
        zero: contiguous buffer this kernel zeroes (GEMM2's atomic workspace; may be empty).
        a13_static / a2_static: ``[1]`` fp32 static scales, or None for dynamic.
        vllm_order: vLLM's numerics with its scaling order 1 or 2, 0 off (needs ``quant_out``,
            block scales, dynamic scales, no ``ue8m0``).

    Returns:
        ``(y, y_scale)``: ``y [P, I]`` e4m3 with ``y_scale [P, ceil(I/128)]`` fp32
        (None when ``a2_static``) if ``quant_out``, else ``y [P, I]`` fp32 and None;
        ``P = max_tiles * BLOCK_M``.
    """
    e, two_i, h = w13.shape
    inter = two_i // 2
    rows = routing.max_tiles * routing.block_m
    dev = a.device
    # Dynamic groups must coincide with the tiles that compute them.
    assert a13_static is not None or BLOCK_K == SCALE_BLOCK
    assert not block_scaled or BLOCK_K == SCALE_BLOCK
    assert not (quant_out and a2_static is None) or BLOCK_N == SCALE_BLOCK
    assert not vllm_order or (quant_out and block_scaled and a13_static is None and a2_static is None and not ue8m0)
    if quant_out:
        y = workspace(rows, inter, torch.float8_e4m3fn, dev, "moe_intermediate")
        y_scale = (
            None
            if a2_static is not None
            else workspace(rows, triton.cdiv(inter, SCALE_BLOCK), torch.float32, dev, "moe_intermediate_scale")
        )
    else:
        y = workspace(rows, inter, torch.float32, dev, "moe_intermediate")
        y_scale = None
    dummy = w13_scale  # stands for pointers a variant does not read
    ys = y_scale if y_scale is not None else dummy
    a_s = a_scale if a_scale is not None else dummy
    grid = (routing.max_tiles * triton.cdiv(inter, BLOCK_N),)
    _gemm1_kernel[grid](
        a,
        a_s,
        w13,
        w13_scale,
        y,
        ys,
        routing.sorted_ids,
        routing.tile_expert,
        routing.num_padded,
        topk_weights,
        a13_static if a13_static is not None else dummy,
        a2_static if a2_static is not None else dummy,
        zero,
        zero.numel(),
        num_pairs,
        h,
        inter,
        top_k,
        routing.max_tiles,
        a.stride(0),
        a_s.stride(0),
        w13.stride(0),
        w13.stride(1),
        w13_scale.stride(0),
        w13_scale.stride(1) if block_scaled else 0,
        y.stride(0),
        ys.stride(0),
        BLOCK_M=routing.block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        GROUP_M=GROUP_M,
        QUANT_ON_LOAD=quant_on_load,
        A_STATIC=a13_static is not None,
        QUANT_OUT=quant_out,
        Y_STATIC=a2_static is not None,
        BLOCK_SCALED=block_scaled,
        UE8M0=ue8m0,
        WEIGHT_ON_INPUT=weight_on_input,
        EVEN_K=h % BLOCK_K == 0,
        VLLM_ORDER=vllm_order,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y, y_scale
