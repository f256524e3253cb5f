"""NVFP4 (ModelOpt) format: e2m1 codes, e4m3 scale per 16 along K, fp32 global scale.

Layout (docs/design.md §5.3):

* codes: 4 bits, bit 3 the sign, bits 0-2 index ``[0, .5, 1, 1.5, 2, 3, 4, 6]``;
  two per byte, element ``2i`` in the LOW nibble: ``packed [..., N, K/2]`` uint8.
* ``block_scale [..., N, K/16]`` float8_e4m3fn (linear layout, as in checkpoints).
* ``global_scale [...]`` fp32, one per matrix (``weight_scale_2``).

Dequant: ``value(code) * float(block_scale) * global_scale``.
Quantization: ``global = amax / (6 * 448)``, ``block_scale = e4m3(block_amax / (6 * global))``,
codes rounded to the nearest e2m1 value, ties to the even code. An explicit global scale
must be finite and > 0 (``ValueError`` naming it and its first bad index); empty inputs give
empty outputs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import check_scale_values, check_tensor
from .fp8 import FP8_DTYPE, FP8_MAX, matrix_amax

GROUP = 16
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Midpoints between neighbouring e2m1 magnitudes, and whether a tie there rounds up
#: (the upper code is even) or down (the lower code is even).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_ROUNDS_UP = (False, True, False, True, False, True, False)
#: Smallest global scale, so an all-zero matrix quantizes to zero codes instead of NaN.
_MIN_GLOBAL = 1e-12

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def e2m1_table(device: torch.device) -> torch.Tensor:
    """The 16 code values (fp32, index = code)."""
    mag = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mag, -mag])


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` (already divided by its scales) to e2m1 codes (uint8, one per element).

    Magnitudes above 6 saturate to 6; ties go to the even code.
    """
    mag = x.abs().float()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for mid, up in zip(_MIDPOINTS, _TIE_ROUNDS_UP, strict=True):
        code += (mag >= mid if up else mag > mid).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Values (fp32) of e2m1 codes (uint8, low 4 bits used)."""
    return e2m1_table(codes.device)[(codes & 0xF).long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes ``[..., K]`` (uint8, K even) two a byte, element 0 in the low nibble: ``[..., K/2]``."""
    check_tensor("codes", codes, dtype=torch.uint8, contiguous=False)
    if codes.shape[-1] % 2:
        raise ValueError(f"codes: expected an even last dimension, got shape {tuple(codes.shape)}")
    c = codes & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`: ``[..., K/2]`` uint8 -> codes ``[..., K]`` uint8."""
    check_tensor("packed", packed, dtype=torch.uint8, contiguous=False)
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """``amax / (6 * 448)`` per matrix of ``w [..., N, K]``: fp32 ``[...]``."""
    return (matrix_amax(w) / (E2M1_MAX * FP8_MAX)).clamp_min(_MIN_GLOBAL)


def quantize_nvfp4(
    w: torch.Tensor, global_scale: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., N, K]`` (K a multiple of 16) to NVFP4.

    Returns ``(packed [..., N, K/2] uint8, block_scale [..., N, K/16] float8_e4m3fn,
    global_scale [...] fp32)``. ``global_scale`` may be given (one per matrix).
    """
    check_tensor("w", w, dtype=_FLOATS, contiguous=False)
    if w.dim() < 2 or w.shape[-1] % GROUP:
        raise ValueError(f"w: expected [..., N, K] with K a multiple of {GROUP}, got shape {tuple(w.shape)}")
    if global_scale is None:
        global_scale = nvfp4_global_scale(w)
    else:
        check_tensor("global_scale", global_scale, dtype=torch.float32, shape=tuple(w.shape[:-2]), contiguous=False)
        check_scale_values("global_scale", global_scale, allow_zero=False)
    wf = w.float()
    g = global_scale[..., None, None]
    blocks = wf.reshape(*w.shape[:-1], w.shape[-1] // GROUP, GROUP)
    block_scale = (blocks.abs().amax(dim=-1) / (E2M1_MAX * g)).clamp(max=FP8_MAX).to(FP8_DTYPE)
    denom = block_scale.float()[..., None] * g[..., None]
    scaled = torch.where(denom > 0, blocks / denom, torch.zeros_like(blocks))
    codes = encode_e2m1(scaled).reshape(w.shape)
    return pack_e2m1(codes), block_scale.contiguous(), global_scale.contiguous()


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Dequantize ``packed [..., N, K/2]`` with ``block_scale [..., N, K/16]`` and
    ``global_scale [...]`` to fp32 ``[..., N, K]``."""
    check_tensor("packed", packed, dtype=torch.uint8, contiguous=False)
    k = packed.shape[-1] * 2
    if k % GROUP:
        raise ValueError(f"packed: expected K = 2 * last dim to be a multiple of {GROUP}, got K = {k}")
    check_tensor("block_scale", block_scale, dtype=FP8_DTYPE, shape=(*packed.shape[:-1], k // GROUP), contiguous=False)
    check_tensor("global_scale", global_scale, dtype=torch.float32, shape=tuple(packed.shape[:-2]), contiguous=False)
    values = decode_e2m1(unpack_e2m1(packed))
    scale = block_scale.float().repeat_interleave(GROUP, dim=-1) * global_scale[..., None, None]
    return values * scale
