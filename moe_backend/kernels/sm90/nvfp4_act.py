"""Activations of the NVFP4 (W4A16) GEMM1 put in the weights' dot order.

The kernel layout (:class:`moe_backend.kernels.sm90.nvfp4_layout.NVFP4KernelWeights`) runs each
256-K group of the GEMM in ``kernel_k_order``; GEMM1 reads its bf16 input in that
order so that both operands agree: the aligned paths after one small pass that permutes
``hidden [T, H]`` into ``[T, Hp]`` (zero padded to a multiple of 256) in the shared workspace,
the swap-AB path by loading ``hidden`` contiguously and permuting it in registers
(:func:`nvfp4_tile.dot_order`). GEMM2's input needs neither, because GEMM1 writes it in that
order already. At decode sizes the alignment and the permutation share one launch
(:func:`align_and_permute`): its first program aligns the pairs, the others permute.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from ...runtime import workspace
from .align import (
    FUSED_MAX_PAIRS,
    AlignedRouting,
    align_block_size,
    align_in_one_program,
    empty_routing,
    one_program_args,
)
from .nvfp4_layout import K_GROUP
from .nvfp4_tile import natural_k


@triton.jit
def _permute_group(x_ptr, out_ptr, t, g, H, stride_x, stride_out, GROUP: tl.constexpr):
    """Row ``t``'s 256-K group ``g``: natural order in ``x``, ``kernel_k_order`` in ``out``."""
    q = tl.arange(0, GROUP)
    k = g * GROUP + natural_k(q)
    v = tl.load(x_ptr + t * stride_x + k, mask=k < H, other=0.0)
    tl.store(out_ptr + t * stride_out + g * GROUP + q, v)


@triton.jit
def _permute_kernel(x_ptr, out_ptr, H, stride_x, stride_out, GROUP: tl.constexpr):
    _permute_group(x_ptr, out_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), H, stride_x, stride_out, GROUP)


@triton.jit
def _align_permute_kernel(
    ids_ptr,
    sorted_ptr,
    tile_expert_ptr,
    num_padded_ptr,
    row_of_pair_ptr,
    num_pairs,
    expert_offset,
    num_experts,
    max_tiles,
    x_ptr,
    out_ptr,
    H,
    stride_x,
    stride_out,
    GROUPS,
    BLOCK_M: tl.constexpr,
    N_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    TILE_BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid == 0:
        align_in_one_program(
            ids_ptr,
            sorted_ptr,
            tile_expert_ptr,
            num_padded_ptr,
            row_of_pair_ptr,
            num_pairs,
            expert_offset,
            num_experts,
            max_tiles,
            BLOCK_M,
            N_PAD,
            E_PAD,
            TILE_BLOCK,
        )
    else:
        item = pid - 1
        _permute_group(x_ptr, out_ptr, (item // GROUPS).to(tl.int64), item % GROUPS, H, stride_x, stride_out, GROUP)


def _permuted_buffer(hidden: torch.Tensor, padded_hidden: int) -> torch.Tensor:
    """The ``[T, Hp]`` bf16 workspace view the permutation of ``hidden [T, H]`` (unit column
    stride) writes; ``padded_hidden`` (``Hp``) is a multiple of 256, ``>= H``."""
    t, h = hidden.shape
    assert padded_hidden % K_GROUP == 0 and padded_hidden >= h and hidden.stride(1) == 1
    return workspace(t, padded_hidden, torch.bfloat16, hidden.device, "moe_act")


def permute_activations(hidden: torch.Tensor, padded_hidden: int) -> torch.Tensor:
    """``hidden [T, H]`` bf16 (unit column stride) -> ``[T, Hp]`` workspace view in ``kernel_k_order``
    per 256-group, zeros past ``H``. ``padded_hidden`` (``Hp``) is a multiple of 256, ``>= H``."""
    t, h = hidden.shape
    out = _permuted_buffer(hidden, padded_hidden)
    if t:
        _permute_kernel[(t, padded_hidden // K_GROUP)](hidden, out, h, hidden.stride(0), out.stride(0), GROUP=K_GROUP)
    return out


def align_and_permute(
    topk_ids: torch.Tensor,
    num_experts: int,
    local_expert_offset: int,
    block_m: int,
    hidden: torch.Tensor,
    padded_hidden: int,
) -> Tuple[AlignedRouting, torch.Tensor]:
    """``align.align_block_size(topk_ids, num_experts, local_expert_offset, block_m)`` and
    :func:`permute_activations` ``(hidden, padded_hidden)``, in one launch up to
    ``align.FUSED_MAX_PAIRS`` pairs (program 0 aligns; one program a row and 256-K group permutes),
    separately above. ``topk_ids [T, k]`` int32 contiguous with T * k > 0, ``hidden [T, H]`` bf16."""
    num_pairs = topk_ids.numel()
    if num_pairs > FUSED_MAX_PAIRS:
        return align_block_size(topk_ids, num_experts, local_expert_offset, block_m), permute_activations(
            hidden, padded_hidden
        )
    assert topk_ids.dtype == torch.int32 and topk_ids.is_contiguous() and num_pairs > 0
    t, h = hidden.shape
    assert t > 0
    routing = empty_routing(num_pairs, num_experts, block_m, topk_ids.device)
    out = _permuted_buffer(hidden, padded_hidden)
    args, consts = one_program_args(topk_ids, routing, num_experts, local_expert_offset)
    groups = padded_hidden // K_GROUP
    _align_permute_kernel[(1 + t * groups,)](
        *args, hidden, out, h, hidden.stride(0), out.stride(0), groups, **consts, GROUP=K_GROUP, num_warps=4
    )
    return routing, out
