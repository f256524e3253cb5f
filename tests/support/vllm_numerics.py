"""vLLM's Triton fused-MoE numerics for FP8 block-scale experts, in plain torch (a test reference).

What vLLM 0.26's ``TritonExperts`` computes for one (token, slot) pair on local expert ``e``,
step by step, written from its kernels' source rather than from ours:

1. ``per_token_group_fp8_quant`` of the hidden states: per 128 channels
   ``s = max(amax, 1e-10) / 448`` and ``q = e4m3(clamp(x / s, +-448))``;
2. GEMM1 (``fused_moe_kernel``): per 128-wide K block ``acc += (dot(q, w) * a_s) * w_s`` in
   fp32, or ``(dot * w_s) * a_s`` with swapped operands (its default configurations for up to
   64 tokens), then ``gate`` and ``up`` stored as bf16;
3. ``silu_and_mul_per_block_quant``: ``r = (g * (1 / (1 + exp(-g)))) * u`` in fp32 from the
   bf16 values, per 128 columns ``s = max(amax / 448, 1e-10)`` and ``q = e4m3(r / s)``;
4. GEMM2 as GEMM1, then ``acc * router_weight`` in fp32, stored as bf16;
5. ``moe_sum``: the k rows summed in fp32, one rounding (measured on an H100 against vLLM
   0.26's kernel).

Each dot over a 128-wide block is taken in float64 and rounded to fp32 once. That is what
Triton's interpreter computes; Hopper's FP8 wgmma accumulates with fewer bits, so on a GPU
only vLLM itself is the reference (``scripts/vllm_layer_compare.py``).
"""

from __future__ import annotations

import torch

from moe_backend.expert_weights import FP8BlockWeights

GROUP = 128
FP8_MAX = 448.0


def quantize_groups(x: torch.Tensor, eps_on_scale: bool) -> "tuple[torch.Tensor, torch.Tensor]":
    """``x [R, C]`` fp32 (C a multiple of 128) -> ``(q [R, C] e4m3, s [R, C/128] fp32)``."""
    rows, cols = x.shape
    groups = x.view(rows, cols // GROUP, GROUP)
    amax = groups.abs().amax(-1)
    scale = (amax / FP8_MAX).clamp_min(1e-10) if eps_on_scale else amax.clamp_min(1e-10) / FP8_MAX
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows, cols), scale


def block_gemm(
    q: torch.Tensor, q_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, swapped: bool
) -> torch.Tensor:
    """``q [R, K]`` e4m3 with ``q_scale [R, K/128]`` times ``w [N, K]`` e4m3 with ``w_scale [N/128, K/128]``:
    ``[R, N]`` fp32, accumulated block by block in vLLM's order (``swapped``: weight scale first)."""
    acc = torch.zeros(q.shape[0], w.shape[0], dtype=torch.float32)
    w_scale_cols = w_scale.repeat_interleave(GROUP, dim=0)  # [N, K/128]
    for kb in range(q.shape[1] // GROUP):
        blk = slice(kb * GROUP, (kb + 1) * GROUP)
        dot = (q[:, blk].double() @ w[:, blk].double().T).float()
        if swapped:
            acc += dot * w_scale_cols[:, kb][None, :] * q_scale[:, kb : kb + 1]
        else:
            acc += dot * q_scale[:, kb : kb + 1] * w_scale_cols[:, kb][None, :]
    return acc


def vllm_triton_fused_experts(
    hidden: torch.Tensor,
    weights: FP8BlockWeights,
    ids: torch.Tensor,
    topk_w: torch.Tensor,
    local_expert_offset: int = 0,
) -> torch.Tensor:
    """``hidden [T, H]`` bf16, global ``ids [T, k]`` int32 (-1 or other ranks' ids contribute 0),
    ``topk_w [T, k]`` fp32 -> ``[T, H]`` bf16 as vLLM's Triton backend computes it (on the CPU)."""
    t, h = hidden.shape
    k = ids.shape[1]
    w13, s13 = weights.w13.cpu(), weights.w13_scale.cpu()
    w2, s2 = weights.w2.cpu(), weights.w2_scale.cpu()
    inter = w2.shape[2]
    swapped = t <= 64
    xq, xs = quantize_groups(hidden.cpu().float(), eps_on_scale=False)
    rows = torch.zeros(t, k, h, dtype=torch.bfloat16)
    for tok in range(t):
        for slot in range(k):
            e = int(ids[tok, slot]) - local_expert_offset
            if not 0 <= e < w13.shape[0]:
                continue
            gate_up = block_gemm(xq[tok : tok + 1], xs[tok : tok + 1], w13[e], s13[e], swapped).bfloat16().float()
            g, u = gate_up[:, :inter], gate_up[:, inter:]
            yq, ys = quantize_groups((g * (1.0 / (1.0 + torch.exp(-g)))) * u, eps_on_scale=True)
            down = block_gemm(yq, ys, w2[e], s2[e], swapped) * topk_w[tok, slot].cpu().float()
            rows[tok, slot] = down[0].bfloat16()
    return rows.float().sum(1).bfloat16()
