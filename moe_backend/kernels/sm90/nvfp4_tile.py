"""Triton device helpers shared by the SM90 NVFP4 (W4A16) kernels: weight-group dequantization and MMA.

Weights arrive in the kernel layout of :class:`moe_backend.kernels.sm90.nvfp4_layout.NVFP4KernelWeights`:
per group of 256 K, two halves of 16 int32 words (8 e2m1 codes each) per row and
the group's 16 e4m3 block scales, one per word of a half. :func:`dequant_group`
turns a ``[R, 16]`` tile of each half into ``[R, 256]`` bf16 in the layout's
``kernel_k_order``: every op is elementwise on the word tile or a join/permute/
reshape that only renames registers, so Triton loads the words from shared memory
straight into the MMA's register fragment (no conversion through shared memory)
and feeds the weights to ``wgmma`` as its register operand A.

Numerics: a dequantized weight is ``code * block_scale * 2**-8`` in bf16, which is
EXACT (a 2-bit times a 4-bit significand, far inside bf16's range); the global
scale times ``2**8`` (:data:`WEIGHT_SHIFT`) is applied to the fp32 accumulator.
The ``2**-8`` keeps ``block_scale * 2**126 * 2**-8`` (see below) finite in bf16.

On the GPU one inline-PTX block turns a word into 8 bf16 (the layout's ``CODE_BITS``
puts element ``2s + i`` in lane ``i`` of slot ``s``): for slots 0-2,
``(word << 3s) & 0x81C081C0`` is a bf16x2 whose halves are ``code * 2**-126`` (sign,
exponent and mantissa bits in place; code 1 becomes a bf16 subnormal, which
``fma.rn.bf16x2`` handles exactly); slot 3 gathers its bits with three shifts. One
``fma.rn.bf16x2`` by ``block_scale * 2**118`` makes each pair ``code * block_scale *
2**-8``. About 15 operations a word of 8 weights. Under ``TRITON_INTERPRET=1`` (no
inline assembly) the same 8 values come from plain Triton arithmetic.
"""

import triton
import triton.language as tl

#: The dequantized bf16 weights carry ``2**-WEIGHT_SHIFT``; the epilogue multiplies it back.
WEIGHT_SHIFT = tl.constexpr(8)


def _dequant_asm() -> str:
    """PTX for one word ($8) and its bf16 scale ($9) -> 8 bf16 ($0..$7), elements 0..7."""
    scale = "fma.rn.bf16x2 p, p, s2, z;"
    lines = [
        "{",
        ".reg .b32 s2, z, p, a, b;",
        "mov.b32 s2, {$9, $9};",
        "mov.b32 z, 0x80008000;",
        "and.b32 p, $8, 0x81C081C0;",
        scale,
        "mov.b32 {$0, $1}, p;",
    ]
    for slot in (1, 2):
        lines += [
            f"shl.b32 p, $8, {3 * slot};",
            "and.b32 p, p, 0x81C081C0;",
            scale,
            f"mov.b32 {{${2 * slot}, ${2 * slot + 1}}}, p;",
        ]
    # Slot 3: e1 e0 at bits 14-13 -> 8-7, m at 11 -> 6, sign at 10 -> 15 (each lane).
    lines += [
        "shr.b32 a, $8, 6;",
        "and.b32 a, a, 0x01800180;",
        "shr.b32 b, $8, 5;",
        "and.b32 b, b, 0x00400040;",
        "or.b32 a, a, b;",
        "shl.b32 b, $8, 5;",
        "and.b32 b, b, 0x80008000;",
        "or.b32 p, a, b;",
        scale,
        "mov.b32 {$6, $7}, p;",
    ]
    return "\n".join(lines + ["}"])


_DEQUANT_ASM = tl.constexpr(_dequant_asm())


@triton.jit
def _code_value(words, M: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr, S: tl.constexpr, scale):
    """``code * scale`` (fp32) of the code whose bits sit at ``M, E0, E1, S`` of each word."""
    m = (words >> M) & 1
    e = ((words >> E0) & 1) | (((words >> E1) & 1) << 1)
    v = tl.where(e == 0, 0.5 * m, tl.exp2((e - 1).to(tl.float32)) * (1.0 + 0.5 * m))
    return tl.where(((words >> S) & 1) != 0, -v, v) * scale


@triton.jit
def _dequant8(words, scale, INTERPRET: tl.constexpr):
    """Elements 0..7 of each word as 8 bf16 tensors shaped like ``words``; ``scale`` e4m3 alike."""
    s = scale.to(tl.float32) * (2.0**-WEIGHT_SHIFT)
    if not INTERPRET:
        # bf16 scale * 2**126 (finite: block scales are <= 448, times 2**-8).
        s = (s * 8.507059173023462e37).to(tl.bfloat16)
        return tl.inline_asm_elementwise(
            _DEQUANT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [words, s], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1
        )
    # The layout's CODE_BITS, element by element (the PTX above cannot run here).
    return (
        _code_value(words, 6, 7, 8, 15, s).to(tl.bfloat16),
        _code_value(words, 22, 23, 24, 31, s).to(tl.bfloat16),
        _code_value(words, 3, 4, 5, 12, s).to(tl.bfloat16),
        _code_value(words, 19, 20, 21, 28, s).to(tl.bfloat16),
        _code_value(words, 0, 1, 2, 9, s).to(tl.bfloat16),
        _code_value(words, 16, 17, 18, 25, s).to(tl.bfloat16),
        _code_value(words, 11, 13, 14, 10, s).to(tl.bfloat16),
        _code_value(words, 27, 29, 30, 26, s).to(tl.bfloat16),
    )


@triton.jit
def _lanes(a, b):
    """``[R, W]`` twice -> ``[R, 2W]``, column ``2w + i`` from ``(a, b)[i]`` (one bf16x2 register)."""
    return tl.reshape(tl.join(a, b), [a.shape[0], 2 * a.shape[1]])


@triton.jit
def _blocks(a, b):
    """``[R, C]`` twice -> ``[R, 2C]``: ``a`` then ``b`` (registers renamed, no data moves)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [a.shape[0], 2 * a.shape[1]])


@triton.jit
def _dequant_half(words, scale, INTERPRET: tl.constexpr):
    o0, o1, o2, o3, o4, o5, o6, o7 = _dequant8(words, scale, INTERPRET)
    return _blocks(_blocks(_lanes(o0, o1), _lanes(o2, o3)), _blocks(_lanes(o4, o5), _lanes(o6, o7)))


@triton.jit
def dequant_group(words0, words1, scale, INTERPRET: tl.constexpr):
    """Dequantize one 256-K group of ``R`` weight rows.

    Args:
        words0, words1: ``[R, 16]`` int32, the group's two halves (layout words ``w`` and ``16 + w``).
        scale: ``[R, 16]`` float8_e4m3 block scales (scale ``w`` serves word ``w`` of both halves).
        INTERPRET: plain Triton arithmetic (the interpreter runs no PTX) instead of inline PTX.

    Returns:
        ``[R, 256]`` bf16 ``code * scale * 2**-WEIGHT_SHIFT`` in ``kernel_k_order``.
    """
    return _blocks(_dequant_half(words0, scale, INTERPRET), _dequant_half(words1, scale, INTERPRET))


@triton.jit
def mma(w, x, acc, INTERPRET: tl.constexpr):
    """``acc [N, M] += w [N, K] @ x[M, K].T`` (bf16 operands; the weights are wgmma's register operand).

    ``INTERPRET``: Triton 3.6's interpreter multiplies bf16 bit patterns as integers, so
    the operands go to fp32 first (exact).
    """
    if INTERPRET:
        w = w.to(tl.float32)
        x = x.to(tl.float32)
    return tl.dot(w, tl.trans(x), acc)
