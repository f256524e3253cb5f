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
  0-d (as ModelOpt writes them) or shape ``[1]``.

Scales follow the containers' rule (``moe_backend.expert_weights``): a per-matrix scale
(``weight_scale_2``, fp8_tensor's ``weight_scale`` and ``input_scale``) must be finite and
> 0, a block scale (``weight_scale_inv``, nvfp4's ``weight_scale``) finite and >= 0.

Errors name the shard file and the tensor: ``ValueError`` for a missing tensor, a wrong
shape or a bad scale value, ``TypeError`` for a wrong dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from moe_backend._checks import check_finite, check_scale_values, check_tensor
from moe_backend.quant import (
    BLOCK,
    FP8_DTYPE,
    NVFP4_GROUP,
    dequantize_fp8_block,
    dequantize_fp8_per_tensor,
    dequantize_nvfp4,
)

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
        # every quantized format carries a scale, NVFP4 a second one (read_linear)
        if self.format == FP8_BLOCK:
            assert self.scale is not None
            return dequantize_fp8_block(self.weight, self.scale)
        if self.format == NVFP4:
            assert self.scale is not None and self.scale_2 is not None
            return dequantize_nvfp4(self.weight, self.scale, self.scale_2)
        if self.format == FP8_TENSOR:
            assert self.scale is not None
            return dequantize_fp8_per_tensor(self.weight, self.scale)
        return self.weight.float()


def read_tensor(
    reader: ShardedReader, key: str, *, block_scale: bool = False, finite: bool = False, **check: Any
) -> torch.Tensor:
    """Tensor ``key`` validated with ``check_tensor(**check)`` and, when asked, the block scale rule or
    finiteness; an error is re-raised, of the same type, naming the shard file (cause chained)."""
    value = reader.get(key)
    try:
        check_tensor(key, value, **check)
        if block_scale:
            check_scale_values(key, value, allow_zero=True)
        if finite:
            check_finite(key, value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{reader.file_of(key)}: {exc}") from exc
    return value


def _scalar(reader: ShardedReader, key: str) -> torch.Tensor:
    """The per-matrix fp32 scale ``key`` as a 0-d tensor (stored 0-d or ``[1]``); a scale that is not
    finite and positive (it would dequantize to inf/NaN, zero or flipped signs) is refused."""
    value = read_tensor(reader, key, dtype=torch.float32)
    if value.numel() != 1:
        raise ValueError(f"{reader.file_of(key)}: {key}: expected a scalar, got shape {tuple(value.shape)}")
    value = value.reshape(())
    if not (torch.isfinite(value) and value > 0):
        raise ValueError(f"{reader.file_of(key)}: {key}: expected a finite positive scale, got {float(value)}")
    return value


def read_linear(reader: ShardedReader, module: str, fmt: str, shape: Tuple[int, int]) -> CheckpointLinear:
    """Read the linear ``module`` stored in format ``fmt`` with logical weight ``shape = (N, K)``."""
    n, k = shape
    key = f"{module}.weight"
    if fmt == BF16:
        return CheckpointLinear(BF16, read_tensor(reader, key, dtype=UNQUANTIZED_DTYPES, shape=(n, k)))
    if fmt == FP8_BLOCK:
        weight = read_tensor(reader, key, dtype=FP8_DTYPE, shape=(n, k))
        scale = read_tensor(
            reader,
            f"{module}.weight_scale_inv",
            block_scale=True,
            dtype=torch.float32,
            shape=(_cdiv(n, BLOCK), _cdiv(k, BLOCK)),
        )
        return CheckpointLinear(FP8_BLOCK, weight, scale)
    if fmt == NVFP4:
        if k % NVFP4_GROUP:
            raise ValueError(f"{key}: NVFP4 needs in_features to be a multiple of {NVFP4_GROUP}, got {k}")
        weight = read_tensor(reader, key, dtype=torch.uint8, shape=(n, k // 2))
        scale = read_tensor(
            reader, f"{module}.weight_scale", block_scale=True, dtype=FP8_DTYPE, shape=(n, k // NVFP4_GROUP)
        )
        # ModelOpt writes a 0-d scalar; some exporters write shape [1]
        return CheckpointLinear(NVFP4, weight, scale, _scalar(reader, f"{module}.weight_scale_2"))
    if fmt == FP8_TENSOR:
        weight = read_tensor(reader, key, dtype=FP8_DTYPE, shape=(n, k))
        scale = _scalar(reader, f"{module}.weight_scale")
        input_key = f"{module}.input_scale"
        input_scale = _scalar(reader, input_key) if input_key in reader else None
        return CheckpointLinear(FP8_TENSOR, weight, scale, input_scale=input_scale)
    raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
