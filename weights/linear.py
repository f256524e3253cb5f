"""One linear layer's weight as a checkpoint stores it, read and validated by tensor name.

Per format (``<module>`` is e.g. ``model.layers.3.mlp.experts.0.gate_proj``):

* ``bf16``: ``<module>.weight [N, K]`` bf16 (fp16 / fp32 accepted);
* ``fp8_block``: ``<module>.weight [N, K]`` float8_e4m3fn and
  ``<module>.weight_scale_inv [ceil(N/128), ceil(K/128)]`` fp32 (a multiplier, despite the name);
* ``nvfp4``: ``<module>.weight [N, K/2]`` uint8 (two e2m1 codes a byte, low nibble first),
  ``<module>.weight_scale [N, K/16]`` float8_e4m3fn and ``<module>.weight_scale_2`` fp32 scalar.
  ``<module>.input_scale`` (the calibrated activation scale) is not read: Hopper
  serves NVFP4 as W4A16 and never quantizes activations to fp4.

Errors name the tensor: ``ValueError`` for a missing tensor or a wrong shape,
``TypeError`` for a wrong dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from moe_backend._checks import check_tensor
from moe_backend.quant import BLOCK, FP8_DTYPE, NVFP4_GROUP, dequantize_fp8_block, dequantize_nvfp4

from .quant_config import BF16, FORMATS, FP8_BLOCK, NVFP4
from .reader import ShardedReader

UNQUANTIZED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class CheckpointLinear:
    """A linear's stored tensors: ``weight`` plus ``scale`` (``weight_scale_inv`` for fp8,
    ``weight_scale`` for nvfp4) and ``scale_2`` (nvfp4 ``weight_scale_2``, a 0-d fp32 tensor).

    Tensors straight from :meth:`ShardedReader.get` are backed by the shard's mapping:
    copy (or dequantize) what you keep.
    """

    format: str
    weight: torch.Tensor
    scale: Optional[torch.Tensor] = None
    scale_2: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        """The weight as fp32 ``[N, K]``."""
        if self.format == FP8_BLOCK:
            return dequantize_fp8_block(self.weight, self.scale)
        if self.format == NVFP4:
            return dequantize_nvfp4(self.weight, self.scale, self.scale_2)
        return self.weight.float()


def read_linear(reader: ShardedReader, module: str, fmt: str, shape: Tuple[int, int]) -> CheckpointLinear:
    """Read the linear ``module`` stored in format ``fmt`` with logical weight ``shape = (N, K)``."""
    n, k = shape
    key = f"{module}.weight"
    if fmt == BF16:
        return CheckpointLinear(BF16, check_tensor(key, reader.get(key), dtype=UNQUANTIZED_DTYPES, shape=(n, k)))
    if fmt == FP8_BLOCK:
        weight = check_tensor(key, reader.get(key), dtype=FP8_DTYPE, shape=(n, k))
        scale = check_tensor(f"{module}.weight_scale_inv", reader.get(f"{module}.weight_scale_inv"),
                             dtype=torch.float32, shape=(_cdiv(n, BLOCK), _cdiv(k, BLOCK)))
        return CheckpointLinear(FP8_BLOCK, weight, scale)
    if fmt == NVFP4:
        if k % NVFP4_GROUP:
            raise ValueError(f"{key}: NVFP4 needs in_features to be a multiple of {NVFP4_GROUP}, got {k}")
        weight = check_tensor(key, reader.get(key), dtype=torch.uint8, shape=(n, k // 2))
        scale = check_tensor(f"{module}.weight_scale", reader.get(f"{module}.weight_scale"),
                             dtype=FP8_DTYPE, shape=(n, k // NVFP4_GROUP))
        scale_2 = reader.get(f"{module}.weight_scale_2")
        # ModelOpt writes a 0-d scalar; some exporters write shape [1]
        check_tensor(f"{module}.weight_scale_2", scale_2, dtype=torch.float32)
        if scale_2.numel() != 1:
            raise ValueError(f"{module}.weight_scale_2: expected a scalar, got shape {tuple(scale_2.shape)}")
        return CheckpointLinear(NVFP4, weight, scale, scale_2.reshape(()))
    raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
