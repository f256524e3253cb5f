"""Triton device helpers shared by the SM90 NVFP4 (W4A16) kernels: weight-tile dequantization and MMA.

Weights arrive in the kernel layout of :class:`moe_backend.weights.layout.NVFP4KernelWeights`:
int32 words of 8 e2m1 codes (nibble ``p`` holds element ``WORD_PERM[p]`` of the
word's 8 K positions) and one e4m3 block scale per 16 K elements.

Numerics: a dequantized weight is ``code * block_scale * 2**-8`` in bf16, which is
EXACT (a 2-bit times a 4-bit significand, far inside bf16's range); the global
scale times ``2**8`` (:data:`WEIGHT_SHIFT`) is applied to the fp32 accumulator.
The ``2**-8`` keeps ``block_scale * 2**126 * 2**-8`` (see below) finite in bf16.

On the GPU one inline-PTX block turns a word into 8 bf16: for the nibbles at bits
12-15 and 28-31 of ``word << 4s`` (``s = 0..3``), ``(x & 0x80008000) |
((x >> 6) & 0x01C001C0)`` is a bf16x2 whose halves are ``code * 2**-126`` (sign,
exponent and mantissa bits moved into place; code 1 becomes a bf16 subnormal,
which ``fma.rn.bf16x2`` handles exactly), and one ``fma.rn.bf16x2`` by
``block_scale * 2**118`` makes it ``code * block_scale * 2**-8``. About 2 integer
and 0.5 bf16 operations a weight. Under ``TRITON_INTERPRET=1`` (no inline
assembly) the same 8 values come from plain Triton arithmetic (interpreter only:
Triton 3.6's GPU compiler fails on that variant in its dot-operand pass).
"""

import triton
import triton.language as tl

#: The dequantized bf16 weights carry ``2**-WEIGHT_SHIFT``; the epilogue multiplies it back.
WEIGHT_SHIFT = tl.constexpr(8)


def _dequant_asm() -> str:
    """PTX for one word ($8) and its bf16 scale ($9) -> 8 bf16 ($0..$7): the codes at
    nibbles 3, 7, 2, 6, 1, 5, 0, 4 (the nibbles at bits 12-15 and 28-31 of ``word << 4s``)."""
    lines = ["{", ".reg .b32 s2, z, x, a, b, p;", "mov.b32 s2, {$9, $9};", "mov.b32 z, 0x80008000;"]
    for s in range(4):
        src = "$8" if s == 0 else "x"
        if s:
            lines.append(f"shl.b32 x, $8, {4 * s};")
        lines += [f"and.b32 a, {src}, 0x80008000;", f"shr.b32 b, {src}, 6;", "and.b32 b, b, 0x01C001C0;",
                  "or.b32 p, a, b;", "fma.rn.bf16x2 p, p, s2, z;", f"mov.b32 {{${2 * s}, ${2 * s + 1}}}, p;"]
    return "\n".join(lines + ["}"])


_DEQUANT_ASM = tl.constexpr(_dequant_asm())


@triton.jit
def _code_value(words, nibble: tl.constexpr, scale):
    """``code * scale`` (fp32) of the code at ``nibble`` of each word, without subnormals."""
    n = (words >> (4 * nibble)) & 0xF
    # Exponent bits e and mantissa bit m in place with exponent bias 126: 2**(e-1) * (1 + m/2),
    # right for e > 0; for e == 0 the code is m/2 = 2 * that - 1.
    v = (((n & 7) << 22) + (126 << 23)).to(tl.float32, bitcast=True)
    v = tl.where((n & 6) == 0, 2.0 * v - 1.0, v)
    return tl.where((n & 8) != 0, -v, v) * scale


@triton.jit
def dequant_words(words, scale, INTERPRET: tl.constexpr):
    """Dequantize kernel words to bf16.

    Args:
        words: ``[R, W]`` int32, 8 codes each (kernel nibble order).
        scale: ``[R, W // 2]`` fp32 block scales (one per 16 codes = 2 words).
        INTERPRET: plain Triton arithmetic (the interpreter runs no PTX) instead of inline PTX.

    Returns:
        ``[R, 8 W]`` bf16, ``code * scale * 2**-WEIGHT_SHIFT`` in K order.
    """
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    s = tl.reshape(tl.join(scale, scale), [R, W]) * (2.0 ** -WEIGHT_SHIFT)
    if not INTERPRET:
        # bf16 scale * 2**126 (finite: block scales are <= 448, times 2**-8).
        s = (s * 8.507059173023462e37).to(tl.bfloat16)
        o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
            _DEQUANT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [words, s],
            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        o0 = _code_value(words, 3, s).to(tl.bfloat16)
        o1 = _code_value(words, 7, s).to(tl.bfloat16)
        o2 = _code_value(words, 2, s).to(tl.bfloat16)
        o3 = _code_value(words, 6, s).to(tl.bfloat16)
        o4 = _code_value(words, 1, s).to(tl.bfloat16)
        o5 = _code_value(words, 5, s).to(tl.bfloat16)
        o6 = _code_value(words, 0, s).to(tl.bfloat16)
        o7 = _code_value(words, 4, s).to(tl.bfloat16)
    # Join tree leaf L lands at K offset bitreverse3(L) after the reshape; the kernel
    # layout's WORD_PERM puts the right element in each leaf's nibble.
    w = tl.join(tl.join(tl.join(o0, o1), tl.join(o2, o3)), tl.join(tl.join(o4, o5), tl.join(o6, o7)))
    return tl.reshape(w, [R, 8 * W])


@triton.jit
def mma(x, w, acc, SWAP_AB: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc += x @ w.T`` for ``x [M, K]`` bf16 and ``w [N, K]`` bf16.

    ``acc`` is ``[M, N]``, or ``[N, M]`` with ``SWAP_AB`` (``w @ x.T``: the weights
    fill the MMA's 64-row side when few tokens share an expert). ``INTERPRET``:
    Triton 3.6's interpreter multiplies bf16 bit patterns as integers, so the
    operands go to fp32 first (exact).
    """
    if INTERPRET:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    if SWAP_AB:
        acc = tl.dot(w, tl.trans(x), acc)
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc
