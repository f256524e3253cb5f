"""NVFP4 weights in the layout of the SM90 W4A16 kernels (``nvfp4_gemm1`` / ``nvfp4_gemm2``).

:class:`NVFP4KernelWeights` documents the layout; :func:`nvfp4_to_kernel_layout` builds it
from canonical ModelOpt experts (:class:`~moe_backend.expert_weights.NVFP4Weights`) and
:func:`nvfp4_from_kernel_layout` is its exact inverse. The layout belongs to these kernels:
a change to it is a change of the kernels (bump ``nvfp4_moe.KERNEL_VERSION``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from ..._checks import check_int, check_tensor
from ...expert_weights import ExpertShapes, NVFP4Weights
from ...quant.fp8 import FP8_DTYPE
from ...quant.nvfp4 import GROUP, pack_e2m1, unpack_e2m1

#: Codes per 32-bit word of the kernel layout.
WORD_CODES = 8
#: Bits ``(m, e0, e1, sign)`` of a bf16's e2m1 code placed in 16-bit lane 0 (sign bit 15, ``e1 e0``
#: the exponent's low bits 8-7, ``m`` mantissa bit 6); lane 1 is 16 bits up.
BF16_PLACE = (6, 7, 8, 15)
#: Left rotation of the word that puts slot ``s``'s two codes in bf16 place (the kernel's
#: ``shf.l.wrap``); slot 3's ``m`` bits come with a plain left shift by :data:`SLOT3_M_SHIFT` instead.
SLOT_ROTATIONS = (0, 4, 10, 14)
SLOT3_M_SHIFT = 6


def _code_bits(slot: int, lane: int) -> Tuple[int, int, int, int]:
    """``(m, e0, e1, sign)`` word bits of the code that ``slot``'s transform puts in ``lane``."""
    m, e0, e1, sign = (b + 16 * lane for b in BF16_PLACE)
    rot = SLOT_ROTATIONS[slot]
    m_bit = m - SLOT3_M_SHIFT if slot == 3 else (m - rot) % 32
    return (m_bit, (e0 - rot) % 32, (e1 - rot) % 32, (sign - rot) % 32)


#: ``CODE_BITS[j]``: bit positions ``(m, e0, e1, sign)`` in a kernel word of element ``j``
#: (of the word's 8 consecutive K elements) of e2m1 code ``sign e1 e0 m``. Element ``2s + i``
#: is slot ``s``, lane ``i``: rotating the word left by ``SLOT_ROTATIONS[s]`` and masking with
#: ``0x81C081C0`` yields both lanes' codes in bf16 place (slot 0 needs no rotation; slot 3 takes
#: ``m`` from a left shift by 6 and the rest from its rotation). Per word: 3 rotations, one shift
#: and 5 logical operations (an exhaustive search over rotations, shifts and byte permutes found
#: no placement in which four single transforms tile the word, so one slot takes two).
CODE_BITS = tuple(_code_bits(j // 2, j % 2) for j in range(WORD_CODES))
#: K elements per kernel group: 2 halves x 16 words x 8 codes, 16 block scales.
K_GROUP = 256
#: Kernel scale code of a zero block scale: the kernel's bf16 of the code is 0 (see :func:`encode_scales`).
ZERO_SCALE_CODE = 255
#: Kernel scale codes of e4m3's subnormals ``m * 2**-9`` (index ``m``; 0 is the zero scale).
_SUBNORMAL_CODES = (ZERO_SCALE_CODE, 95, 103, 107, 111, 113, 115, 117)
#: A normal e4m3 byte ``b`` (``2**(b >> 3 - 7) * (1 + (b & 7) / 8)``) has the kernel scale code ``b + 111``.
_NORMAL_OFFSET = 111
#: bf16 of a kernel scale code: the int16 ``16 * code - SCALE_BF16_BIAS`` read as bf16 bits.
SCALE_BF16_BIAS = 4080
#: What the kernel's bf16 scale carries besides the block scale: ``-2**118``.
SCALE_BF16_FACTOR = -(2.0**118)


def encode_scales(scales: torch.Tensor) -> torch.Tensor:
    """e4m3 block scales (finite, >= 0) -> the kernel's scale codes (uint8, same shape).

    A scale ``v = 2**e * (1 + m / 8)`` (e4m3's subnormals normalized, ``-9 <= e <= 8``) has the
    code ``c = ((e + 21) << 3 | m) - 1``; 0 has :data:`ZERO_SCALE_CODE`. The kernel turns a code
    into bf16 with one integer multiply-add: the int16 ``16 * c - 4080`` (:data:`SCALE_BF16_BIAS`)
    read as bf16 bits is ``-v * 2**118`` (sign set, exponent field ``224 + e + 21``, mantissa ``m``;
    the product ``2**118`` keeps ``code * 2**-126 * v * 2**118`` normal and exact in bf16), and 0 for
    the zero scale. A 1-byte e4m3 read followed by a conversion through fp32 took 5 instructions
    a scale in the decode GEMMs' main loop; this takes one.
    """
    check_tensor("scales", scales, dtype=FP8_DTYPE, contiguous=False)
    b = scales.view(torch.uint8).to(torch.int16)
    if bool(((b & 0x80) != 0).any()) or bool((b == 0x7F).any()):
        raise ValueError("scales: expected finite e4m3 block scales >= 0 (encode the sign first: fold_scale_signs)")
    subnormal = torch.tensor(_SUBNORMAL_CODES, dtype=torch.int16, device=b.device)
    return torch.where(b >= 8, b + _NORMAL_OFFSET, subnormal[b.clamp(max=7).long()]).to(torch.uint8)


def decode_scales(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_scales`: kernel scale codes (uint8) -> e4m3 block scales."""
    check_tensor("codes", codes, dtype=torch.uint8, contiguous=False)
    u = codes.to(torch.int32) + 1
    value = torch.ldexp(1.0 + (u & 7).float() / 8, (u >> 3) - 21)
    return torch.where(codes == ZERO_SCALE_CODE, 0.0, value).to(FP8_DTYPE)


def fold_scale_signs(name: str, packed: torch.Tensor, scales: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(packed', |scales|)`` with the same dequantized values: the codes of each block whose
    e4m3 scale is negative have their sign bits flipped (engines' dummy weights have negative
    scales; ModelOpt checkpoints do not). ``packed [..., N, K/2]`` uint8, ``scales [..., N, K/16]``.

    Raises:
        ValueError: a NaN scale (named ``name``, with its first index): NaN cannot be encoded.
    """
    b = scales.view(torch.uint8)
    nan = (b & 0x7F) == 0x7F
    if bool(nan.any()):
        index = [int(i) for i in nan.nonzero()[0]]
        raise ValueError(f"{name}: expected finite block scales, got NaN at index {index} (shape {tuple(b.shape)})")
    negative = (b & 0x80) != 0
    flip = negative.to(torch.uint8).repeat_interleave(GROUP // 2, dim=-1) * 0x88  # both nibbles' sign bits
    return packed ^ flip, (b & 0x7F).view(FP8_DTYPE)


def pack_kernel_words(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt packed codes ``[..., N, K/2]`` uint8 -> kernel words ``[..., N, K/8]`` int32.

    Word ``j`` of a row holds the codes of elements ``8j .. 8j+7``, element ``8j + i``
    at the bits :data:`CODE_BITS` ``[i]``. ``K`` must be a multiple of 8.
    """
    check_tensor("packed", packed, dtype=torch.uint8, contiguous=False)
    if packed.dim() < 1 or packed.shape[-1] % (WORD_CODES // 2):
        raise ValueError(
            f"packed: expected [..., K/2] with K a multiple of {WORD_CODES}, got shape {tuple(packed.shape)}"
        )
    rows = packed.reshape(-1, packed.shape[-1])
    out = torch.empty(rows.shape[0], rows.shape[1] // 4, dtype=torch.int32, device=packed.device)
    for r in range(0, rows.shape[0], _chunk_rows(rows.shape[1])):
        codes = unpack_e2m1(rows[r : r + _chunk_rows(rows.shape[1])]).long()
        codes = codes.reshape(codes.shape[0], -1, WORD_CODES)
        word = torch.zeros(codes.shape[:-1], dtype=torch.int64, device=packed.device)
        for j, bits in enumerate(CODE_BITS):
            for k, bit in enumerate(bits):
                word |= ((codes[..., j] >> k) & 1) << bit
        out[r : r + codes.shape[0]] = torch.where(word >= 2**31, word - 2**32, word)
    return out.reshape(*packed.shape[:-1], -1)


def _chunk_rows(width: int) -> int:
    """Rows per step of the word (un)packing: bounds its int64 temporaries to ~64 MiB each."""
    return max(1, (1 << 23) // max(width, 1))


def unpack_kernel_words(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_kernel_words`: ``[..., N, K/8]`` int32 -> ``[..., N, K/2]`` uint8."""
    check_tensor("words", words, dtype=torch.int32, contiguous=False)
    if words.dim() < 1:
        raise ValueError(f"words: expected at least 1 dimension, got shape {tuple(words.shape)}")
    rows = words.reshape(-1, words.shape[-1])
    out = torch.empty(rows.shape[0], rows.shape[1] * 4, dtype=torch.uint8, device=words.device)
    for r in range(0, rows.shape[0], _chunk_rows(rows.shape[1] * 8)):
        w = rows[r : r + _chunk_rows(rows.shape[1] * 8)].long() & 0xFFFFFFFF
        codes = torch.stack(
            [sum((((w >> bit) & 1) << k for k, bit in enumerate(bits)), torch.zeros_like(w)) for bits in CODE_BITS], -1
        )
        out[r : r + w.shape[0]] = pack_e2m1(codes.reshape(w.shape[0], -1).to(torch.uint8))
    return out.reshape(*words.shape[:-1], -1)


def kernel_k_order() -> torch.Tensor:
    """``[K_GROUP]`` int64: the natural K offset (within a group) at each position of the kernel's dot order.

    Position ``q = 128 h + 32 s + 2 w + i`` (half ``h``, pair ``s``, word ``w``, lane ``i``)
    holds element ``2 s + i`` of word ``w`` of half ``h``, natural offset ``16 w + 8 h + 2 s + i``:
    in the MMA's register fragment a thread's bf16 pair is one dequantization result, and
    each half's 4 pairs x 16 words fill its 128 positions without moving data between threads.
    """
    q = torch.arange(K_GROUP)
    h, s, w, i = q // 128, (q % 128) // 32, (q % 32) // 2, q % 2
    return 16 * w + 8 * h + 2 * s + i


#: Rows a block of the kernel layout holds (:func:`row_blocked`).
ROW_BLOCK = 32


@dataclass(frozen=True)
class WeightGeometry:
    """Where a kernel's weight words and scale codes lie: element strides of an expert, a
    :data:`ROW_BLOCK`-row block, a row within its block and a 256-K group (words: int32, 32 a
    row a group; scale codes: uint8, 16 a row a group), and the sizes the launchers need
    (``rows``: with the blocked form's padding rows)."""

    experts: int
    rows: int
    groups: int
    words: Tuple[int, int, int, int]
    scales: Tuple[int, int, int, int]


def weight_geometry(words: torch.Tensor, scales: torch.Tensor) -> WeightGeometry:
    """The :class:`WeightGeometry` of a weight matrix's words and scale codes in either form:

    * row-blocked, the kernel layout (:func:`row_blocked`): ``words [E, N/32, G, 32, 32]``,
      ``scales [E, N/32, G, 32, 16]`` (each block's group a contiguous 4 KiB of words and 512
      bytes of codes);
    * rows in order (:func:`rows_of_blocks`): ``words [E, N, Kp/8]`` int32, ``scales [E, N, Kp/16]``
      uint8 (row ``n``'s group ``g`` at words ``32 g ..`` of the row).
    """
    if words.dim() == 5 and scales.dim() == 5:
        e, nb, g = words.shape[:3]
        return WeightGeometry(
            e,
            nb * ROW_BLOCK,
            g,
            (words.stride(0), words.stride(1), words.stride(3), words.stride(2)),
            (scales.stride(0), scales.stride(1), scales.stride(3), scales.stride(2)),
        )
    if words.dim() == 3 and scales.dim() == 3:
        e, n, kw = words.shape
        wr, sr = words.stride(1), scales.stride(1)
        return WeightGeometry(
            e,
            n,
            kw * WORD_CODES // K_GROUP,
            (words.stride(0), ROW_BLOCK * wr, wr, 32),
            (scales.stride(0), ROW_BLOCK * sr, sr, 16),
        )
    raise ValueError(
        f"words/scales: expected [E, N/{ROW_BLOCK}, G, {ROW_BLOCK}, 32] and [E, N/{ROW_BLOCK}, G, {ROW_BLOCK}, 16], "
        f"or [E, N, Kp/8] and [E, N, Kp/16], got {tuple(words.shape)} and {tuple(scales.shape)}"
    )


def row_blocked(words: torch.Tensor, scales: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel words ``[E, N, Kp/8]`` int32 and scale codes ``[E, N, Kp/16]`` uint8 in rows -> the
    kernel layout's blocks ``[E, Nb/32, G, 32, 32]`` and ``[E, Nb/32, G, 32, 16]`` (``Nb``: N rounded
    up to :data:`ROW_BLOCK`, padding rows of zero codes and zero scales). A decode program reading
    a block's group reads 4 KiB of consecutive words (and 512 bytes of codes), not 128 bytes from
    each of 32 rows 3.5 KiB apart: 5-8% faster decode GEMMs (docs/performance.md)."""
    e, n, kw = words.shape
    if scales.shape != (e, n, kw // 2):
        raise ValueError(
            f"words/scales: expected [E, N, Kp/8] and [E, N, Kp/16], got {tuple(words.shape)} and {tuple(scales.shape)}"
        )
    nb, g = _round_up(n, ROW_BLOCK), kw * WORD_CODES // K_GROUP
    if nb != n:
        words = torch.cat([words, words.new_zeros(e, nb - n, kw)], 1)
        scales = torch.cat([scales, scales.new_full((e, nb - n, kw // 2), ZERO_SCALE_CODE)], 1)
    w = words.reshape(e, nb // ROW_BLOCK, ROW_BLOCK, g, 32).transpose(2, 3).contiguous()
    s = scales.reshape(e, nb // ROW_BLOCK, ROW_BLOCK, g, 16).transpose(2, 3).contiguous()
    return w, s


def rows_of_blocks(words: torch.Tensor, scales: torch.Tensor, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`row_blocked`: the first ``rows`` rows, ``[E, rows, Kp/8]`` and ``[E, rows, Kp/16]``."""
    e, nb, g = words.shape[:3]
    w = words.transpose(2, 3).reshape(e, nb * ROW_BLOCK, g * 32)[:, :rows]
    s = scales.transpose(2, 3).reshape(e, nb * ROW_BLOCK, g * 16)[:, :rows]
    return w.contiguous(), s.contiguous()


def _round_up(n: int, multiple: int = K_GROUP) -> int:
    return -(-n // multiple) * multiple


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``t`` to ``size``."""
    out = t.new_zeros(*t.shape[:-1], size)
    out[..., : t.shape[-1]] = t
    return out


def _kernel_rows(codes: torch.Tensor, scales: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[..., N, K/2]`` uint8 codes and ``[..., N, K/16]`` e4m3 scales -> the kernel's
    ``[..., N, Kp/8]`` int32 words and ``[..., N, Kp/16]`` e4m3 scales (``Kp``: K rounded up to
    :data:`K_GROUP`, zero padded). In each group of 32 words, word ``16 h + w`` covers natural
    elements ``16 w + 8 h .. + 7`` (so a half's 16 words and the group's 16 scales line up)."""
    kp = _round_up(codes.shape[-1] * 2)
    words = pack_kernel_words(_pad_last(codes, kp // 2))
    words = words.reshape(*words.shape[:-1], -1, 16, 2).transpose(-1, -2).reshape(words.shape)
    return words.contiguous(), _pad_last(scales.view(torch.uint8), kp // GROUP).view(FP8_DTYPE)


def _canonical_rows(words: torch.Tensor, scales: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_kernel_rows` for natural length ``k``."""
    words = words.reshape(*words.shape[:-1], -1, 2, 16).transpose(-1, -2).reshape(words.shape)
    codes = unpack_kernel_words(words.contiguous())[..., : k // 2]
    return codes.contiguous(), scales[..., : k // GROUP].contiguous()


def _permute_gate_up_rows(t: torch.Tensor, inter: int, inverse: bool) -> torch.Tensor:
    """``t [E, 2I(p), ...]``: each of gate and up padded to ``Ip`` rows (zero) and reordered by
    :func:`kernel_k_order` within every group of :data:`K_GROUP` rows (``inverse``: undone, ``I`` rows)."""
    ip = _round_up(inter)
    order = (torch.arange(ip // K_GROUP)[:, None] * K_GROUP + kernel_k_order()).reshape(-1).to(t.device)
    halves = []
    for half in t.chunk(2, dim=1):
        if inverse:
            out = half.new_empty(half.shape)
            out[:, order] = half
            halves.append(out[:, :inter])
        else:
            padded = half.new_zeros(half.shape[0], ip, *half.shape[2:])
            padded[:, :inter] = half
            halves.append(padded[:, order])
    return torch.cat(halves, dim=1).contiguous()


@dataclass
class NVFP4KernelWeights(ExpertShapes):
    """NVFP4 experts in the layout of the SM90 W4A16 kernel (``kernels/sm90/nvfp4_*``).

    ``Hp``, ``Ip``: H and I rounded up to :data:`K_GROUP` (256); padding is zero codes
    with zero scales (DeepSeek-V3's 7168 and 2048 need none).

    In rows (:func:`rows_of_blocks` gives them back):

    * ``w13 [E, 2Ip, Hp/8]`` int32, rows ``[gate; up]``; ``w2 [E, H, Ip/8]`` int32.
      Codes sit in 32-bit words of 8 consecutive K elements (:func:`pack_kernel_words`,
      bit positions :data:`CODE_BITS`: element ``2s + i`` in 16-bit lane ``i``, so that
      the kernel's shift/mask dequantization yields elements ``2s, 2s + 1`` as one bf16x2,
      about 2 integer operations a pair).
      Per group of 256 K, word ``16 h + w`` holds elements ``16 w + 8 h .. + 7``: a
      ``[rows, 16]`` tile of each half is elementwise aligned with the group's 16 block
      scales, and the kernel's dot runs over the group in :func:`kernel_k_order`, an order
      in which each thread's dequantized pairs are exactly its MMA register fragment.
    * The activations of GEMM1 are permuted to that order per group
      (``kernels/sm90/nvfp4_act.py``, or in registers by GEMM1 on the swap-AB path); for GEMM2
      the rows of each of gate and up are stored in that order (``w13`` row ``g*256 + q`` is natural row
      ``g*256 + kernel_k_order()[q]``), so GEMM1 writes its output already permuted.
    * ``w13_scale [E, 2Ip, Hp/16]``, ``w2_scale [E, H, Ip/16]`` uint8: the checkpoint's block
      scales as the kernel's scale codes (:func:`encode_scales`: one integer multiply-add makes a
      code bf16 ``-scale * 2**118``) with the rows of their weights (padded, ``w13``'s rows
      permuted). A negative scale's block stores its magnitude and sign-flipped codes
      (:func:`fold_scale_signs`).

    Stored row-blocked (:func:`row_blocked`): ``w13 [E, 2Ip/32, Hp/256, 32, 32]``,
    ``w13_scale [E, 2Ip/32, Hp/256, 32, 16]``, ``w2 [E, Hb/32, Ip/256, 32, 32]``,
    ``w2_scale [E, Hb/32, Ip/256, 32, 16]`` (``Hb``: H rounded up to 32, padding rows of zero
    codes and zero scales): each 32-row block's 256-K group is one contiguous piece.

    * ``w13_scale_2 [E, 2]`` fp32 (gate's, up's global scale), ``w2_scale_2 [E]`` fp32,
      unchanged; the kernel applies them to its fp32 accumulators.
    * ``inter``, ``hidden``: the natural I and H.

    Size without padding: ``0.5 + 1/16`` bytes a weight, as in the checkpoint.
    """

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w13_scale_2: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    w2_scale_2: torch.Tensor
    inter: int
    hidden: int

    @property
    def intermediate_size(self) -> int:
        return self.inter

    @property
    def hidden_size(self) -> int:
        return self.hidden

    @property
    def padded_hidden(self) -> int:
        """``Hp``: GEMM1's K, H rounded up to :data:`K_GROUP`."""
        return self.w13.shape[2] * K_GROUP

    def __post_init__(self) -> None:
        check_int("inter", self.inter, minimum=1)
        check_int("hidden", self.hidden, minimum=1)
        if self.hidden % GROUP or self.inter % GROUP:
            raise ValueError(f"hidden/inter: expected multiples of {GROUP}, got {self.hidden} and {self.inter}")
        hp, ip = _round_up(self.hidden), _round_up(self.inter)
        e = check_tensor("w13", self.w13, dtype=torch.int32, ndim=5).shape[0]
        dev = self.w13.device
        w13_shape = (e, 2 * ip // ROW_BLOCK, hp // K_GROUP, ROW_BLOCK)
        w2_shape = (e, _round_up(self.hidden, ROW_BLOCK) // ROW_BLOCK, ip // K_GROUP, ROW_BLOCK)
        check_tensor("w13", self.w13, dtype=torch.int32, shape=(*w13_shape, 32), device=dev)
        check_tensor("w13_scale", self.w13_scale, dtype=torch.uint8, shape=(*w13_shape, 16), device=dev)
        check_tensor("w13_scale_2", self.w13_scale_2, dtype=torch.float32, shape=(e, 2), device=dev)
        check_tensor("w2", self.w2, dtype=torch.int32, shape=(*w2_shape, 32), device=dev)
        check_tensor("w2_scale", self.w2_scale, dtype=torch.uint8, shape=(*w2_shape, 16), device=dev)
        check_tensor("w2_scale_2", self.w2_scale_2, dtype=torch.float32, shape=(e,), device=dev)


def nvfp4_to_kernel_layout(weights: NVFP4Weights) -> NVFP4KernelWeights:
    """Canonical ModelOpt NVFP4 experts -> the SM90 kernel layout (:class:`NVFP4KernelWeights`).

    Raises:
        ValueError: a NaN block scale (the error names the tensor and the index).
    """
    if not isinstance(weights, NVFP4Weights):
        raise TypeError(f"weights: expected NVFP4Weights, got {type(weights).__name__}")
    inter = weights.intermediate_size
    w13, s13 = _kernel_rows(*fold_scale_signs("w13_scale", weights.w13, weights.w13_scale))
    w2, s2 = _kernel_rows(*fold_scale_signs("w2_scale", weights.w2, weights.w2_scale))
    w13 = _permute_gate_up_rows(w13, inter, inverse=False)
    s13 = _permute_gate_up_rows(s13.view(torch.uint8), inter, inverse=False).view(FP8_DTYPE)
    w13, c13 = row_blocked(w13, encode_scales(s13))
    w2, c2 = row_blocked(w2, encode_scales(s2))
    return NVFP4KernelWeights(
        w13, c13, weights.w13_scale_2.contiguous(), w2, c2, weights.w2_scale_2.contiguous(), inter, weights.hidden_size
    )


def nvfp4_from_kernel_layout(kernel_weights: NVFP4KernelWeights) -> NVFP4Weights:
    """Inverse of :func:`nvfp4_to_kernel_layout` (a block whose scale was negative comes back with
    the scale's magnitude and its codes' signs flipped: the same values)."""
    if not isinstance(kernel_weights, NVFP4KernelWeights):
        raise TypeError(f"kernel_weights: expected NVFP4KernelWeights, got {type(kernel_weights).__name__}")
    k = kernel_weights
    h, inter = k.hidden_size, k.inter
    w13, c13 = rows_of_blocks(k.w13, k.w13_scale, k.w13.shape[1] * ROW_BLOCK)
    w2, c2 = rows_of_blocks(k.w2, k.w2_scale, h)
    w13 = _permute_gate_up_rows(w13, inter, inverse=True)
    s13 = _permute_gate_up_rows(decode_scales(c13).view(torch.uint8), inter, inverse=True).view(FP8_DTYPE)
    w13, s13 = _canonical_rows(w13, s13, h)
    w2, s2 = _canonical_rows(w2, decode_scales(c2), inter)
    return NVFP4Weights(w13, s13, k.w13_scale_2.contiguous(), w2, s2, k.w2_scale_2.contiguous())
