"""Triton device helpers shared by the SM90 FP8 kernels: activation quantization of a tile.

Numerics follow :mod:`moe_backend.quant.fp8`: a dynamic group scale is
``max(amax, 1e-10) * RCP_FP8_MAX`` (the fp32 reciprocal of 448; rounded up to a power of two
with ``ue8m0``) and ``q = clamp(x * r, -448, 448)`` with ``r = 1 / s`` an IEEE division
(``div_rn``) once per group, cast to e4m3 (round to nearest even). Triton's plain ``/`` is
``div.full.f32`` on the GPU (up to 2 ulp) and an IEEE division under the interpreter; near an
e4m3 rounding tie that ulp decides the code. With the router weight on the input (``x * w`` puts
many quotients within an ulp of a tie, which ``x / amax`` of two bf16 values hits exactly), the
plain division left the FP8 layer 1.2e-2 to 1.7e-2 from the reference on the H200 at H=7168.
``div_rn`` per element instead made the quantize-on-load decode kernels 2.5x slower.

:func:`quantize_tile_vllm` and :func:`silu_vllm` reproduce vLLM's CUDA kernels bit for
bit instead (IEEE divisions and libdevice's ``expf``, where Triton's ``/`` and ``tl.exp``
are approximations): the ``vllm_triton`` numerics of ``fp8_moe``.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from ...quant.fp8 import RCP_FP8_MAX as _RCP_FP8_MAX
from ..interpret import INTERPRETING

FP8_MAX = tl.constexpr(448.0)
FP8_EPS = tl.constexpr(1e-10)
RCP_FP8_MAX = tl.constexpr(_RCP_FP8_MAX)
#: Under Triton 3.6's CPU interpreter: (1) fp32 -> e4m3 / bf16 casts do not carry a
#: rounded-up mantissa into the exponent (126.4 -> 64) and truncate subnormals, so
#: values are rounded to the target grid first and the cast itself is exact;
#: (2) there is no libdevice, and numpy's exp stands in for ``expf``.
_INTERPRETED = tl.constexpr(INTERPRETING)


@triton.jit
def round_up_pow2(s):
    """Smallest power of two >= s, for positive normal fp32 ``s`` (exact, no log2)."""
    bits = s.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def group_scale(x, UE8M0: tl.constexpr):
    """Dynamic scale of each row of ``x [M, G]`` fp32 (one quantization group per row): ``[M]``."""
    s = tl.maximum(tl.max(tl.abs(x), axis=1), FP8_EPS) * RCP_FP8_MAX
    if UE8M0:
        s = round_up_pow2(s)
    return s


@triton.jit
def _round_to_e4m3_grid(x):
    """Round fp32 ``x`` (|x| <= 448) to the nearest e4m3 value, ties to even, in fp32."""
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    # Normal range: keep 3 of the 23 mantissa bits (a carry may bump the exponent).
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Subnormal range (< 2^-6): multiples of 2^-9; adding 2^14 makes the fp32 ulp 2^-9.
    subnormal = (ax + 16384.0) - 16384.0
    r = tl.where(ax >= 0.015625, normal, subnormal)
    return tl.where(x < 0, -r, r)


@triton.jit
def _cast_e4m3(q):
    """fp32 ``q`` (|q| <= 448) as e4m3, round to nearest even."""
    if _INTERPRETED:
        q = _round_to_e4m3_grid(q)
    return q.to(tl.float8e4nv)


@triton.jit
def to_fp8(x, s):
    """``clamp(x * (1 / s))`` as e4m3 (round to nearest even), the reciprocal an IEEE division of
    ``s``'s shape (one per group); ``s`` broadcasts against ``x``
    (``moe_backend.quant.fp8.activation_codes``)."""
    return _cast_e4m3(tl.clamp(x * tl.math.div_rn(1.0, s), -FP8_MAX, FP8_MAX))


@triton.jit
def quantize_tile(x, static_scale_ptr, STATIC: tl.constexpr, UE8M0: tl.constexpr):
    """Quantize ``x [M, G]`` fp32, one group per row; return ``(q [M, G] e4m3, s [M] fp32)``.

    ``STATIC``: one per-tensor scale read from ``static_scale_ptr`` (``[1]`` fp32).
    """
    if STATIC:
        s = tl.zeros([x.shape[0]], dtype=tl.float32) + tl.load(static_scale_ptr)
    else:
        s = group_scale(x, UE8M0)
    return to_fp8(x, s[:, None]), s


@triton.jit
def to_bf16(x):
    """fp32 ``x`` as bf16, round to nearest even."""
    if _INTERPRETED:
        bits = x.to(tl.int32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def scale_block(dot, a_s, w_s, VLLM_ORDER: tl.constexpr):
    """One K block's ``dot [M, N]`` fp32 times its activation scales ``a_s [M]`` and weight scale
    ``w_s`` (a scalar): ``dot * (a_s * w_s)``, or in vLLM's order (``VLLM_ORDER`` 1:
    ``(dot * a_s) * w_s``; 2, its swapped operands: ``(dot * w_s) * a_s``)."""
    if VLLM_ORDER == 1:
        scaled = dot * a_s[:, None] * w_s
    elif VLLM_ORDER == 2:
        scaled = dot * w_s * a_s[:, None]
    else:
        scaled = dot * (a_s * w_s)[:, None]
    return scaled


@triton.jit
def quantize_tile_vllm(x, EPS_ON_SCALE: tl.constexpr):
    """vLLM's dynamic per-token-group quantization of ``x [M, G]`` fp32 (one group per row), bit for bit.

    ``s = max(amax, 1e-10) / 448`` as ``per_token_group_fp8_quant`` (the hidden states) or,
    ``EPS_ON_SCALE``, ``s = max(amax / 448, 1e-10)`` as ``silu_and_mul_per_block_quant`` (the
    intermediate); ``q = e4m3(x / s)``, IEEE divisions. Returns ``(q [M, G] e4m3, s [M] fp32)``.
    """
    amax = tl.max(tl.abs(x), axis=1)
    if EPS_ON_SCALE:
        s = tl.maximum(tl.math.div_rn(amax, FP8_MAX), FP8_EPS)
    else:
        s = tl.math.div_rn(tl.maximum(amax, FP8_EPS), FP8_MAX)
    return _cast_e4m3(tl.clamp(tl.math.div_rn(x, s[:, None]), -FP8_MAX, FP8_MAX)), s


@triton.jit
def silu_vllm(g):
    """``g / (1 + expf(-g))`` as vLLM's CUDA ``silu_and_mul`` kernels compute it: ``g * (1 / (1 + expf(-g)))``."""
    if _INTERPRETED:
        e = tl.exp(-g)
    else:
        e = libdevice.exp(-g)
    return g * tl.math.div_rn(1.0, 1.0 + e)
