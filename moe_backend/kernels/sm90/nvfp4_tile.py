"""Triton device helpers shared by the SM90 NVFP4 (W4A16) kernels: weight-group dequantization and MMA.

Weights arrive in the kernel layout of :class:`moe_backend.kernels.sm90.nvfp4_layout.NVFP4KernelWeights`:
per group of 256 K, two halves of 16 int32 words (8 e2m1 codes each) per row and
the group's 16 block scales as the layout's uint8 scale codes, one per word of a half. :func:`dequant_group`
turns a ``[R, 16]`` tile of each half into ``[R, 256]`` bf16 in the layout's
``kernel_k_order``: every op is elementwise on the word tile or a join/permute/
reshape that only renames registers, so Triton loads the words from shared memory
straight into the MMA's register fragment (no conversion through shared memory)
and feeds the weights to ``wgmma`` as its register operand A.

Numerics: a dequantized weight is ``-code * block_scale * 2**-8`` in bf16, which is
EXACT (a 2-bit times a 4-bit significand, far inside bf16's range); the global
scale times ``-2**8`` (:data:`WEIGHT_RESCALE`) is applied to the fp32 accumulator.
The scale code becomes the bf16 ``-block_scale * 2**118`` in one integer multiply-add
(``nvfp4_layout.encode_scales``; the ``2**-8`` keeps ``block_scale * 2**118`` finite).

On the GPU one inline-PTX block turns a word into 8 bf16 (the layout's ``CODE_BITS``
puts element ``2s + i`` in lane ``i`` of slot ``s``): the word rotated left by
``SLOT_ROTATIONS[s]`` (0, 4, 10, 14) and masked with ``0x81C081C0`` is a bf16x2 whose halves
are ``code * 2**-126`` (sign, exponent and mantissa bits in place; code 1 becomes a bf16
subnormal, which ``fma.rn.bf16x2`` handles exactly); slot 3 takes its ``m`` bits from a left
shift by 6 instead. One ``fma.rn.bf16x2`` by the bf16 scale ``-block_scale * 2**118`` makes
each pair ``-code * block_scale * 2**-8``: 13 operations a word of 8 weights. Under
``TRITON_INTERPRET=1`` (no inline assembly) the same 8 values come from plain Triton arithmetic.
"""

import triton
import triton.language as tl

from .nvfp4_layout import (
    BF16_PLACE,
    ROW_BLOCK as _ROW_BLOCK,
    SCALE_BF16_BIAS as _SCALE_BF16_BIAS,
    SLOT3_M_SHIFT,
    SLOT_ROTATIONS,
)

#: The dequantized bf16 weights carry a factor ``-2**-8``; the epilogues multiply the fp32 sums by
#: its inverse (exact: a power of two).
WEIGHT_RESCALE = tl.constexpr(-256.0)


def _dequant_asm() -> str:
    """PTX for one word ($8) and its bf16 scale ($9) -> 8 bf16 ($0..$7), elements 0..7.

    Slot ``s`` (elements ``2s``, ``2s + 1``): the word rotated left by ``SLOT_ROTATIONS[s]``,
    masked to the bf16 places of both lanes' codes, times the scale; slot 3 ORs its ``m`` bits in
    from a left shift by ``SLOT3_M_SHIFT``.
    """
    place = "0x81C081C0"  # sign 15, e1 e0 8-7, m 6 of both 16-bit lanes
    scale = "fma.rn.bf16x2 p, p, s2, z;"
    lines = ["{", ".reg .b32 s2, z, p, t;", "mov.b32 s2, {$9, $9};", "mov.b32 z, 0x80008000;"]
    for slot, rot in enumerate(SLOT_ROTATIONS):
        src = "$8"
        if rot:
            lines.append(f"shf.l.wrap.b32 t, $8, $8, {rot};")
            src = "t"
        if slot < 3:
            lines.append(f"and.b32 p, {src}, {place};")
        else:
            lines += [
                f"and.b32 p, {src}, 0x81808180;",  # sign, e1 e0
                f"shl.b32 t, $8, {SLOT3_M_SHIFT};",
                "and.b32 t, t, 0x00400040;",  # m
                "or.b32 p, p, t;",
            ]
        lines += [scale, f"mov.b32 {{${2 * slot}, ${2 * slot + 1}}}, p;"]
    return "\n".join(lines + ["}"])


#: The PTX of :func:`_dequant_asm` (``dequant_group``'s ``ASM`` default; the stage probe times
#: variants of it).
DEQUANT_ASM = tl.constexpr(_dequant_asm())
SCALE_BF16_BIAS = tl.constexpr(_SCALE_BF16_BIAS)
ROW_BLOCK = tl.constexpr(_ROW_BLOCK)


#: The interpreter path's constants: the layout's bf16 places and slot transforms (the PTX's own).
_M, _E0, _E1, _SIGN = (tl.constexpr(b) for b in BF16_PLACE)
_ROT0, _ROT1, _ROT2, _ROT3 = (tl.constexpr(r) for r in SLOT_ROTATIONS)
_SLOT3_M_SHIFT = tl.constexpr(SLOT3_M_SHIFT)


@triton.jit
def _rotl(words, R: tl.constexpr):
    """``words`` (int32) rotated left by ``R`` bits (``shf.l.wrap``)."""
    # if/else, not an early return: Triton would still build the shift by 32 - 0 after it
    if R == 0:
        rotated = words
    else:
        rotated = (words << R) | (words.to(tl.uint32, bitcast=True) >> (32 - R)).to(tl.int32, bitcast=True)
    return rotated


@triton.jit
def _lane_value(m_word, word, LANE: tl.constexpr, scale):
    """``code * scale`` (fp32) of the e2m1 code in bf16 place in 16-bit lane ``LANE``: its ``m`` bit
    from ``m_word``, exponent and sign bits from ``word``."""
    m = (m_word >> (_M + 16 * LANE)) & 1
    e = ((word >> (_E0 + 16 * LANE)) & 1) | (((word >> (_E1 + 16 * LANE)) & 1) << 1)
    v = tl.where(e == 0, 0.5 * m, tl.exp2((e - 1).to(tl.float32)) * (1.0 + 0.5 * m))
    return tl.where(((word >> (_SIGN + 16 * LANE)) & 1) != 0, -v, v) * scale


@triton.jit
def _slot_values(m_word, word, scale):
    """Both lanes of a slot's transformed word as bf16 ``code * scale``."""
    return _lane_value(m_word, word, 0, scale).to(tl.bfloat16), _lane_value(m_word, word, 1, scale).to(tl.bfloat16)


@triton.jit
def _dequant8(words, scale, INTERPRET: tl.constexpr, ASM: tl.constexpr):
    """Elements 0..7 of each word as 8 bf16 tensors shaped like ``words``; ``scale`` the uint8
    scale codes alike (``nvfp4_layout.encode_scales``); ``ASM`` the PTX (:data:`DEQUANT_ASM`)."""
    s = (scale.to(tl.int16) * 16 - SCALE_BF16_BIAS).to(tl.int16).to(tl.bfloat16, bitcast=True)  # -scale * 2**118
    if not INTERPRET:
        return tl.inline_asm_elementwise(
            ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [words, s], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1
        )
    # The PTX's slot transforms in plain Triton arithmetic (the PTX cannot run here), times the
    # 2**-126 that the PTX's in-place codes carry.
    s = s.to(tl.float32) * 2.0**-126
    w0 = _rotl(words, _ROT0)
    w1 = _rotl(words, _ROT1)
    w2 = _rotl(words, _ROT2)
    w3 = _rotl(words, _ROT3)
    o0, o1 = _slot_values(w0, w0, s)
    o2, o3 = _slot_values(w1, w1, s)
    o4, o5 = _slot_values(w2, w2, s)
    o6, o7 = _slot_values(words << _SLOT3_M_SHIFT, w3, s)
    return o0, o1, o2, o3, o4, o5, o6, o7


@triton.jit
def _lanes(a, b):
    """``[R, W]`` twice -> ``[R, 2W]``, column ``2w + i`` from ``(a, b)[i]`` (one bf16x2 register)."""
    return tl.reshape(tl.join(a, b), [a.shape[0], 2 * a.shape[1]])


@triton.jit
def _blocks(a, b):
    """``[R, C]`` twice -> ``[R, 2C]``: ``a`` then ``b`` (registers renamed, no data moves)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [a.shape[0], 2 * a.shape[1]])


@triton.jit
def dequant_half(words, scale, INTERPRET: tl.constexpr, ASM: tl.constexpr = DEQUANT_ASM):
    """One half of a 256-K group (:func:`dequant_group`): ``[R, 16]`` int32 words and their
    ``[R, 16]`` uint8 scale codes -> ``[R, 128]`` bf16, the group's columns ``128 h`` to
    ``128 h + 127`` of half ``h`` in ``kernel_k_order``."""
    o0, o1, o2, o3, o4, o5, o6, o7 = _dequant8(words, scale, INTERPRET, ASM)
    return _blocks(_blocks(_lanes(o0, o1), _lanes(o2, o3)), _blocks(_lanes(o4, o5), _lanes(o6, o7)))


@triton.jit
def dequant_group(words0, words1, scale, INTERPRET: tl.constexpr, ASM: tl.constexpr = DEQUANT_ASM):
    """Dequantize one 256-K group of ``R`` weight rows.

    Args:
        words0, words1: ``[R, 16]`` int32, the group's two halves (layout words ``w`` and ``16 + w``).
        scale: ``[R, 16]`` uint8 scale codes (code ``w`` serves word ``w`` of both halves).
        INTERPRET: plain Triton arithmetic (the interpreter runs no PTX) instead of inline PTX.
        ASM: the PTX a word (:data:`DEQUANT_ASM`; ignored under ``INTERPRET``).

    Returns:
        ``[R, 256]`` bf16 ``code * block_scale / WEIGHT_RESCALE`` in ``kernel_k_order``.
    """
    return _blocks(dequant_half(words0, scale, INTERPRET, ASM), dequant_half(words1, scale, INTERPRET, ASM))


@triton.jit
def row_offsets(rows, stride_block, stride_row):
    """Element offsets of weight ``rows`` (any shape) from their expert's first word or scale code,
    in either form of ``nvfp4_layout.weight_geometry`` (rows in order: ``stride_block`` is
    ``ROW_BLOCK * stride_row``)."""
    return (rows // ROW_BLOCK) * stride_block + (rows % ROW_BLOCK) * stride_row


@triton.jit
def load_group(w_ptrs, s_ptrs, mask, MASKED: tl.constexpr, INTERPRET: tl.constexpr):
    """Load and dequantize one 256-K group (:func:`dequant_group`): ``w_ptrs`` ``[R, 16]`` at the
    group's first-half words (the second half 16 words on), ``s_ptrs`` ``[R, 16]`` at its scale
    codes; with ``MASKED``, nothing is loaded (zeros) where ``mask`` (broadcast to ``[R, 16]``) is
    false."""
    if MASKED:
        words0 = tl.load(w_ptrs, mask=mask, other=0)
        words1 = tl.load(w_ptrs + 16, mask=mask, other=0)
        scale = tl.load(s_ptrs, mask=mask, other=0)
    else:
        words0 = tl.load(w_ptrs)
        words1 = tl.load(w_ptrs + 16)
        scale = tl.load(s_ptrs)
    return dequant_group(words0, words1, scale, INTERPRET)


@triton.jit
def natural_k(q):
    """``kernel_k_order`` in Triton: position ``q = 128 h + 32 s + 2 w + i`` of a 256-group holds
    the group's natural offset ``16 w + 8 h + 2 s + i``."""
    return 16 * ((q % 32) // 2) + 8 * (q // 128) + 2 * ((q % 128) // 32) + q % 2


@triton.jit
def dot_order(x):
    """``[M, 256]`` activations of one group in natural K order -> the same in ``kernel_k_order``
    (position ``128 h + 32 s + 2 w + i`` takes natural ``16 w + 8 h + 2 s + i``: :func:`natural_k`).

    A reshape and permute, which Triton resolves in registers where the layouts allow: loading
    the group contiguously and permuting here keeps the loads 16 bytes wide, where loading at
    ``natural_k`` offsets made them 2-byte synchronous loads outside the software pipeline.
    """
    return tl.reshape(tl.permute(tl.reshape(x, [x.shape[0], 16, 2, 4, 2]), (0, 2, 3, 1, 4)), [x.shape[0], 256])


#: The ways :func:`mma` may issue a group's warpgroup MMAs (configuration keys ``WGMMA1`` /
#: ``WGMMA2`` of ``nvfp4_moe``).
MMA_ISSUES = ("pieces", "sync", "overlap")


@triton.jit
def mma(w, x, acc, ISSUE: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc [N, M] += w [N, K] @ x[M, K].T`` (bf16 operands; the weights are wgmma's register operand).

    ``ISSUE`` (one of :data:`MMA_ISSUES`), how the K / 16 warpgroup MMAs are issued:

    * ``"pieces"``: Triton's own way of keeping a dot with a register operand asynchronous. It cuts
      the dot into 16-K pieces, each with its own fence, wait and rebuilt shared-memory
      descriptor: six instructions an MMA (sm_90a, the NVFP4 decode GEMMs: 422 / 425 a 256-K group).
    * ``"sync"``: one fence, the MMAs, one wait for all of them (348 / 347). The pipeliner leaves a
      dot whole and synchronous when the loop body reads its result: an identity ``mov`` of the
      accumulator (which ptxas drops) is that read. The warpgroup waits for its MMAs before it
      dequantizes the next group.
    * ``"overlap"``: the same whole dot left in flight while the next group is dequantized (354 /
      354). A one-MMA dot of zeros onto the accumulator before it, which Triton makes synchronous,
      waits for the previous group's MMAs; a loop with such a wait is one the pipeliner does not cut
      into pieces, and the whole dot after it stays asynchronous.

    ``INTERPRET``: Triton 3.6's interpreter multiplies bf16 bit patterns as integers, so
    the operands go to fp32 first (exact); the issue modes are the same sum there.
    """
    if INTERPRET:
        w = w.to(tl.float32)
        x = x.to(tl.float32)
    elif ISSUE == "overlap":
        acc = tl.dot(tl.zeros([w.shape[0], 16], tl.bfloat16), tl.zeros([16, x.shape[0]], tl.bfloat16), acc)
    acc = tl.dot(w, tl.trans(x), acc)
    if ISSUE == "sync" and not INTERPRET:
        acc = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [acc], dtype=tl.float32, is_pure=True, pack=1)
    return acc
