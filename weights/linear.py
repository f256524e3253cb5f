"""One linear layer's weight as a checkpoint stores it, read and validated by tensor name.

Per format (``<module>`` is e.g. ``model.layers.3.mlp.experts.0.gate_proj``):

* ``bf16``: ``<module>.weight [N, K]`` bf16 (fp16 / fp32 accepted);
* ``fp8_block``: ``<module>.weight [N, K]`` float8_e4m3fn and
  ``<module>.weight_scale_inv [ceil(N/128), ceil(K/128)]`` fp32 (a multiplier, despite the name);
* ``nvfp4``: ``<module>.weight [N, K/2]`` uint8 (two e2m1 codes a byte, low nibble first),
  ``<module>.weight_scale [N, K/16]`` float8_e4m3fn and ``<module>.weight_scale_2`` fp32 scalar.
  ``<module>.input_scale`` (the calibrated activation scale) is not read: Hopper
  serves NVFP4 as W4A16 and never quantizes activations to fp4.
* ``fp8_tensor`` (ModelOpt FP8): ``<module>.weight [N, K]`` float8_e4m3fn,
  ``<module>.weight_scale`` fp32 scalar (one multiplier for the whole matrix) and
  ``<module>.input_scale`` fp32 scalar (the calibrated static activation scale, read
  when present; without it the activations are quantized dynamically). Scalars may be
  0-d (as ModelOpt writes them) or shape ``[1]``; both scales must be finite and positive.

Errors name the tensor: ``ValueError`` for a missing tensor or a wrong shape,
``TypeError`` for a wrong dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from moe_backend._checks import check_tensor
from moe_backend.quant import (BLOCK, FP8_DTYPE, NVFP4_GROUP, dequantize_fp8_block, dequantize_fp8_per_tensor,
                               dequantize_nvfp4)

from .quant_config import BF16, FORMATS, FP8_BLOCK, FP8_TENSOR, NVFP4
from .reader import ShardedReader

UNQUANTIZED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class CheckpointLinear:
    """A linear's stored tensors: ``weight`` plus ``scale`` (``weight_scale_inv`` for fp8 block,
    ``weight_scale`` for nvfp4 and fp8_tensor, 0-d for the latter), ``scale_2`` (nvfp4
    ``weight_scale_2``, a 0-d fp32 tensor) and ``input_scale`` (fp8_tensor's static activation
    scale, 0-d fp32; None when the checkpoint has none).

    Tensors straight from :meth:`ShardedReader.get` are backed by the shard's mapping:
    copy (or dequantize) what you keep.
    """

    format: str
    weight: torch.Tensor
    scale: Optional[torch.Tensor] = None
    scale_2: Optional[torch.Tensor] = None
    input_scale: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        """The weight as fp32 ``[N, K]``."""
        if self.format == FP8_BLOCK:
            return dequantize_fp8_block(self.weight, self.scale)
        if self.format == NVFP4:
            return dequantize_nvfp4(self.weight, self.scale, self.scale_2)
        if self.format == FP8_TENSOR:
            return dequantize_fp8_per_tensor(self.weight, self.scale)
        return self.weight.float()


def _scalar(reader: ShardedReader, key: str, positive: bool = False) -> torch.Tensor:
    """The fp32 scalar ``key`` as a 0-d tensor (stored 0-d or ``[1]``); with ``positive``, refuse a
    scale that is not finite and positive (it would dequantize to inf/NaN or zero)."""
    value = check_tensor(key, reader.get(key), dtype=torch.float32)
    if value.numel() != 1:
        raise ValueError(f"{key}: expected a scalar, got shape {tuple(value.shape)}")
    value = value.reshape(())
    if positive and not (torch.isfinite(value) and value > 0):
        raise ValueError(f"{key}: expected a finite positive scale, got {float(value)}")
    return value


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
        # ModelOpt writes a 0-d scalar; some exporters write shape [1]
        return CheckpointLinear(NVFP4, weight, scale, _scalar(reader, f"{module}.weight_scale_2"))
    if fmt == FP8_TENSOR:
        weight = check_tensor(key, reader.get(key), dtype=FP8_DTYPE, shape=(n, k))
        scale = _scalar(reader, f"{module}.weight_scale", positive=True)
        input_key = f"{module}.input_scale"
        input_scale = _scalar(reader, input_key, positive=True) if input_key in reader else None
        return CheckpointLinear(FP8_TENSOR, weight, scale, input_scale=input_scale)
    raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
