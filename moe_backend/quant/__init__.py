"""Weight and activation formats: FP8 block / per-tensor and NVFP4 (see docs/design.md §5)."""

from .fp8 import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8_block,
    dequantize_fp8_per_tensor,
    dequantize_fp8_per_token_group,
    fake_quant_activation,
    quantize_fp8_block,
    quantize_fp8_per_tensor,
    quantize_fp8_per_token_group,
)
from .nvfp4 import (
    E2M1_VALUES,
    GROUP as NVFP4_GROUP,
    decode_e2m1,
    dequantize_nvfp4,
    encode_e2m1,
    pack_e2m1,
    quantize_nvfp4,
    unpack_e2m1,
)

__all__ = [
    "BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "E2M1_VALUES",
    "NVFP4_GROUP",
    "quantize_fp8_block",
    "dequantize_fp8_block",
    "quantize_fp8_per_token_group",
    "dequantize_fp8_per_token_group",
    "quantize_fp8_per_tensor",
    "dequantize_fp8_per_tensor",
    "fake_quant_activation",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "encode_e2m1",
    "decode_e2m1",
    "pack_e2m1",
    "unpack_e2m1",
]
