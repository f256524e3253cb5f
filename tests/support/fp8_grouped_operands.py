"""Operands of the FP8 block-scale grouped GEMM, quantized by our own quantizers (shared by its CPU
and GPU tests and ``scripts/gpu_check_fp8_grouped.py``)."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from moe_backend.kernels.sm90.fp8_grouped import BLOCK
from moe_backend.quant.fp8 import quantize_fp8_block, quantize_fp8_per_token_group


def make_operands(
    sizes: Sequence[int], n: int, k: int, seed: int = 0, tail: int = 0, device: str = "cpu"
) -> Tuple[torch.Tensor, ...]:
    """Quantized operands of a grouped GEMM with segments of ``sizes`` rows (and ``tail`` rows
    past the last segment): ``(a, a_scale, b, b_scale, cu_seqlens, out)``."""
    g = torch.Generator().manual_seed(seed)
    m = sum(sizes) + tail
    x = torch.randn(m, k, generator=g) * (1 + torch.rand(m, 1, generator=g) * 4)
    w = torch.randn(len(sizes), n, k, generator=g) * 0.05
    a, a_scale = quantize_fp8_per_token_group(x.to(device), BLOCK)
    b, b_scale = quantize_fp8_block(w.to(device), BLOCK)
    cu = torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32, device=device)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    return a, a_scale, b, b_scale, cu, out
