"""FP8 (e4m3) formats: 128x128 weight blocks, per-token activation groups, per tensor.

Conventions (docs/design.md §5.1, §5.2):

* Block-scaled weights ``w [..., N, K]`` carry ``scale [..., ceil(N/128), ceil(K/128)]``
  fp32 and dequantize as ``w_fp8 * scale`` per block (DeepSeek-V3's
  ``weight_scale_inv`` despite its name).
* Activations ``x [T, K]`` are quantized per token per group of 128 channels:
  ``s = max(amax, eps) * fp32(1 / 448)``, ``q = clamp(x * fp32(1 / s), -448, 448)`` cast to
  e4m3 (:func:`activation_codes`). With ``ue8m0`` the scale is rounded up to a power of two
  (DeepSeek V3.1). A static activation scale gives its codes the same way.
* Per-tensor weights carry one fp32 scale per matrix (``scale [...]``).

An explicit scale given to a quantizer must be finite and > 0 (``ValueError`` naming it and
its first bad index). Dequantizers do plain arithmetic on what they are given. Empty inputs
give empty outputs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import check_bool, check_int, check_scale_values, check_tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
#: fp32(1 / 448). A dynamic activation scale is ``max(amax, eps) * RCP_FP8_MAX`` and the codes are
#: ``x * r`` with ``r = 1 / s`` rounded once (IEEE): products of correctly rounded fp32 values,
#: which round the same way on every device (CPU, CUDA, Triton's interpreter) and in the kernels,
#: at one IEEE division per group. Divisions would not: torch on CUDA divides by a Python scalar
#: as a product with its fp32 reciprocal (on the CPU it divides), Triton's ``/`` is
#: ``div.full.f32`` (2 ulp), and an IEEE division per element cost the quantize-on-load decode
#: kernels 2.5x on the H200. Near an e4m3 rounding tie (``x / amax`` of bf16 values lands on ties
#: often) one ulp decides the code, and FP8 requantization amplifies a flipped code about tenfold
#: at the layer's output.
RCP_FP8_MAX = 0.0022321429569274187
#: Lower bound on an amax before it becomes a scale, so an all-zero group gets a finite scale.
FP8_EPS = 1e-10
BLOCK = 128

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_view(x: torch.Tensor, block_n: int, block_k: int) -> Tuple[torch.Tensor, int, int]:
    """Pad ``x [..., N, K]`` to whole blocks; return ``[..., nb, bn, kb, bk]`` and N, K."""
    n, k = x.shape[-2:]
    nb, kb = _cdiv(n, block_n), _cdiv(k, block_k)
    padded = torch.nn.functional.pad(x, (0, kb * block_k - k, 0, nb * block_n - n))
    return padded.reshape(*x.shape[:-2], nb, block_n, kb, block_k), n, k


def _cast_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def activation_codes(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of fp32 activations ``x`` under fp32 scales ``s`` (broadcasting against ``x``):
    ``clamp(x * r, -448, 448)`` with ``r = 1 / s`` rounded once, cast to nearest even, as the
    kernels compute them (``fp8_tile.to_fp8``)."""
    return _cast_fp8(x * torch.reciprocal(s))


def matrix_amax(w: torch.Tensor) -> torch.Tensor:
    """``max |w|`` of each matrix of ``w [..., N, K]``: fp32 ``[...]`` (0 for an empty matrix)."""
    if w.numel() == 0:  # amax refuses to reduce over an empty dimension
        return torch.zeros(w.shape[:-2], dtype=torch.float32, device=w.device)
    return w.float().abs().amax(dim=(-2, -1))


def quantize_fp8_block(w: torch.Tensor, block: int = BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights ``w [..., N, K]`` (float) to e4m3 with one fp32 scale per block.

    Returns ``(q [..., N, K] float8_e4m3fn, scale [..., ceil(N/block), ceil(K/block)] fp32)``.
    """
    check_tensor("w", w, dtype=_FLOATS, contiguous=False)
    check_int("block", block, minimum=1)
    if w.dim() < 2:
        raise ValueError(f"w: expected a tensor of at least 2 dims [..., N, K], got shape {tuple(w.shape)}")
    blocks, n, k = _block_view(w.float(), block, block)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = amax.clamp_min(FP8_EPS) / FP8_MAX
    q = _cast_fp8(blocks / scale[..., :, None, :, None])
    q = q.reshape(*w.shape[:-2], scale.shape[-2] * block, scale.shape[-1] * block)
    return q[..., :n, :k].contiguous(), scale.contiguous()


def dequantize_fp8_block(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Dequantize ``q [..., N, K]`` e4m3 with ``scale [..., ceil(N/block), ceil(K/block)]`` to fp32."""
    check_tensor("q", q, dtype=FP8_DTYPE, contiguous=False)
    check_int("block", block, minimum=1)
    if q.dim() < 2:
        raise ValueError(f"q: expected a tensor of at least 2 dims [..., N, K], got shape {tuple(q.shape)}")
    n, k = q.shape[-2:]
    want = (*q.shape[:-2], _cdiv(n, block), _cdiv(k, block))
    check_tensor("scale", scale, dtype=torch.float32, shape=want, contiguous=False)
    s = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return q.float() * s[..., :n, :k]


def group_scale(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """Scale of a group from its amax: ``max(amax, eps) * RCP_FP8_MAX`` (fp32 ``1 / 448``), rounded
    up to 2^n with ``ue8m0``."""
    s = amax.float().clamp_min(FP8_EPS) * RCP_FP8_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return s


def quantize_fp8_per_token_group(
    x: torch.Tensor, group: int = BLOCK, ue8m0: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization per token per ``group`` channels.

    ``x [T, K]`` float -> ``(q [T, K] float8_e4m3fn, s [T, ceil(K/group)] fp32)``;
    a last partial group is scaled by its own amax.
    """
    check_tensor("x", x, dtype=_FLOATS, ndim=2, contiguous=False)
    check_int("group", group, minimum=1)
    check_bool("ue8m0", ue8m0)
    t, k = x.shape
    g = _cdiv(k, group)
    padded = torch.nn.functional.pad(x.float(), (0, g * group - k)).view(t, g, group)
    s = group_scale(padded.abs().amax(dim=-1), ue8m0)
    q = activation_codes(padded, s[..., None]).view(t, g * group)[:, :k]
    return q.contiguous(), s.contiguous()


def dequantize_fp8_per_token_group(q: torch.Tensor, s: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_per_token_group`: fp32 ``[T, K]``."""
    check_tensor("q", q, dtype=FP8_DTYPE, ndim=2, contiguous=False)
    check_int("group", group, minimum=1)
    t, k = q.shape
    check_tensor("s", s, dtype=torch.float32, shape=(t, _cdiv(k, group)), contiguous=False)
    return q.float() * s.repeat_interleave(group, dim=-1)[:, :k]


def quantize_fp8_per_tensor(w: torch.Tensor, scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., N, K]`` with one fp32 scale per matrix (``scale [...]``).

    With ``scale`` given (static, e.g. a checkpoint's ``input_scale``; finite and > 0) it is used
    as is; otherwise ``scale = max(amax, eps) / 448`` per matrix.
    """
    check_tensor("w", w, dtype=_FLOATS, contiguous=False)
    if w.dim() < 2:
        raise ValueError(f"w: expected a tensor of at least 2 dims [..., N, K], got shape {tuple(w.shape)}")
    if scale is None:
        scale = matrix_amax(w).clamp_min(FP8_EPS) / FP8_MAX
    else:
        check_tensor("scale", scale, dtype=torch.float32, shape=tuple(w.shape[:-2]), contiguous=False)
        check_scale_values("scale", scale, allow_zero=False)
    q = _cast_fp8(w.float() / scale[..., None, None])
    return q.contiguous(), scale.contiguous()


def dequantize_fp8_per_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantize ``q [..., N, K]`` e4m3 with ``scale [...]`` fp32 to fp32."""
    check_tensor("q", q, dtype=FP8_DTYPE, contiguous=False)
    check_tensor("scale", scale, dtype=torch.float32, shape=tuple(q.shape[:-2]), contiguous=False)
    return q.float() * scale[..., None, None]


def fake_quant_activation(
    x: torch.Tensor, static_scale: Optional[torch.Tensor] = None, ue8m0: bool = False
) -> torch.Tensor:
    """Round activations ``x [T, K]`` through e4m3 and back (fp32), as the FP8 kernels do.

    Dynamic per token per 128 channels, or with one static fp32 scale (shape ``[1]``; its value
    is not read here: the containers holding static scales check them once).
    """
    check_tensor("x", x, dtype=_FLOATS, ndim=2, contiguous=False)
    if static_scale is not None:
        check_tensor("static_scale", static_scale, dtype=torch.float32, shape=(1,), device=x.device, contiguous=False)
        return activation_codes(x.float(), static_scale).float() * static_scale
    q, s = quantize_fp8_per_token_group(x, BLOCK, ue8m0)
    return dequantize_fp8_per_token_group(q, s, BLOCK)
