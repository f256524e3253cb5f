"""Activations of the NVFP4 (W4A16) GEMM1 put in the weights' dot order.

The kernel layout (:class:`moe_backend.kernels.sm90.nvfp4_layout.NVFP4KernelWeights`) runs each
256-K group of the GEMM in ``kernel_k_order``; GEMM1 reads its bf16 input in that
order so that both operands agree: the aligned paths after one small pass that permutes
``hidden [T, H]`` into ``[T, Hp]`` (zero padded to a multiple of 256) in the shared workspace,
the swap-AB path by loading ``hidden`` contiguously and permuting it in registers
(:func:`nvfp4_tile.dot_order`). GEMM2's input needs neither, because GEMM1 writes it in that
order already.
"""

import torch
import triton
import triton.language as tl

from ...runtime import workspace
from .nvfp4_layout import K_GROUP
from .nvfp4_tile import natural_k


@triton.jit
def _permute_kernel(x_ptr, out_ptr, H, stride_x, stride_out, GROUP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    q = tl.arange(0, GROUP)
    k = g * GROUP + natural_k(q)
    v = tl.load(x_ptr + t * stride_x + k, mask=k < H, other=0.0)
    tl.store(out_ptr + t * stride_out + g * GROUP + q, v)


def permute_activations(hidden: torch.Tensor, padded_hidden: int) -> torch.Tensor:
    """``hidden [T, H]`` bf16 (unit column stride) -> ``[T, Hp]`` workspace view in ``kernel_k_order``
    per 256-group, zeros past ``H``. ``padded_hidden`` (``Hp``) is a multiple of 256, ``>= H``."""
    t, h = hidden.shape
    assert padded_hidden % K_GROUP == 0 and padded_hidden >= h and hidden.stride(1) == 1
    out = workspace(t, padded_hidden, torch.bfloat16, hidden.device, "moe_act")
    if t:
        _permute_kernel[(t, padded_hidden // K_GROUP)](hidden, out, h, hidden.stride(0), out.stride(0), GROUP=K_GROUP)
    return out
