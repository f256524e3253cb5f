"""The NVFP4 SM90 kernel layout: against its explicit definition, its inverse, and argument errors."""

import pytest
import torch

from moe_backend.expert_weights import NVFP4Weights
from moe_backend.kernels.sm90.nvfp4_layout import (
    CODE_BITS,
    K_GROUP,
    ROW_BLOCK,
    SCALE_BF16_BIAS,
    SCALE_BF16_FACTOR,
    SLOT3_M_SHIFT,
    SLOT_ROTATIONS,
    ZERO_SCALE_CODE,
    NVFP4KernelWeights,
    decode_scales,
    encode_scales,
    fold_scale_signs,
    kernel_k_order,
    nvfp4_from_kernel_layout,
    nvfp4_to_kernel_layout,
    pack_kernel_words,
    row_blocked,
    rows_of_blocks,
    unpack_kernel_words,
    weight_geometry,
)
from moe_backend.quant.fp8 import FP8_DTYPE
from moe_backend.quant.nvfp4 import dequantize_nvfp4, unpack_e2m1

E, H, I = 3, 64, 32


@pytest.fixture
def nvfp4():
    g = torch.Generator().manual_seed(0)
    return NVFP4Weights.quantize(torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g))


def _word_codes(words: torch.Tensor) -> torch.Tensor:
    """``[..., W]`` int32 -> ``[..., W, 8]``: code of element j read bit by bit at ``CODE_BITS[j]``."""
    v = words.long() & 0xFFFFFFFF
    return torch.stack([sum(((v >> bit) & 1) << k for k, bit in enumerate(bits)) for bits in CODE_BITS], -1)


def test_code_bits_fill_the_word_and_each_slot_is_one_rotation():
    """The 8 codes use all 32 bits; rotating the word left by slot s's rotation puts both of
    its codes at the bf16 places (m 6, e0 7, e1 8, sign 15; lane 1 16 up), except slot 3's m,
    which a left shift by 6 puts there."""
    assert sorted(b for bits in CODE_BITS for b in bits) == list(range(32))
    for j, bits in enumerate(CODE_BITS):
        slot, lane = divmod(j, 2)
        rot = SLOT_ROTATIONS[slot]
        placed = [(b + rot) % 32 for b in bits]
        if slot == 3:
            placed[0] = bits[0] + SLOT3_M_SHIFT
        assert placed == [b + 16 * lane for b in (6, 7, 8, 15)], j
    assert SLOT_ROTATIONS[0] == 0  # slot 0 is masked in place


def test_kernel_words_layout(nvfp4):
    words = pack_kernel_words(nvfp4.w13)
    assert words.dtype == torch.int32 and words.shape == (E, 2 * I, H // 8)
    codes = unpack_e2m1(nvfp4.w13).long()
    got = _word_codes(words)
    for j in range(8):
        assert torch.equal(got[..., j], codes[..., j::8])
    assert torch.equal(unpack_kernel_words(words), nvfp4.w13)


def test_kernel_k_order_is_the_documented_permutation():
    order = kernel_k_order()
    assert sorted(order.tolist()) == list(range(K_GROUP))
    for q in (0, 1, 2, 31, 32, 127, 128, 200, 255):
        h, s, w, i = q // 128, (q % 128) // 32, (q % 32) // 2, q % 2
        assert order[q] == 16 * w + 8 * h + 2 * s + i


def test_kernel_layout_against_its_definition():
    """In rows: word 16h + w of group g holds natural elements g*256 + 16w + 8h + j (bits
    CODE_BITS[j]); w13's stored row g*256 + q of each half is natural row g*256 +
    kernel_k_order()[q]. Stored: 32-row blocks, each block's group contiguous."""
    g = torch.Generator().manual_seed(1)
    e, h, i = 2, 512, 256
    nv = NVFP4Weights.quantize(torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g))
    k = nvfp4_to_kernel_layout(nv)
    assert k.w13.shape == (e, 2 * i // 32, h // 256, 32, 32) and k.w2_scale.shape == (e, h // 32, i // 256, 32, 16)
    w13, s13 = rows_of_blocks(k.w13, k.w13_scale, 2 * i)
    w2, s2 = rows_of_blocks(k.w2, k.w2_scale, h)
    assert torch.equal(k.w13[:, 3, 1, 5], w13[:, 3 * 32 + 5, 32:64])  # block 3, group 1, row 5
    assert torch.equal(k.w2_scale[:, 7, 0, 31], s2[:, 7 * 32 + 31, :16])
    order = kernel_k_order()
    codes13, codes2 = unpack_e2m1(nv.w13).long(), unpack_e2m1(nv.w2).long()
    got2 = _word_codes(w2)  # [E, H, I/8, 8]
    got13 = _word_codes(w13)  # [E, 2I, H/8, 8]
    for grp in range(i // K_GROUP):
        for half in range(2):
            for w in (0, 5, 15):
                for j in range(8):
                    nat = grp * K_GROUP + 16 * w + 8 * half + j
                    assert torch.equal(got2[:, :, grp * 32 + 16 * half + w, j], codes2[:, :, nat])
    for q in (0, 1, 33, 130, 255):
        for base in (0, i):  # gate, up
            # stored word 3 of group 0 (half 0, w = 3) holds natural elements 48 .. 55
            assert torch.equal(got13[:, base + q, 3, :], codes13[:, base + order[q], 48:56])
            assert torch.equal(s13[:, base + q], encode_scales(nv.w13_scale[:, base + order[q]]))
    assert torch.equal(s2, encode_scales(nv.w2_scale))
    assert k.nbytes() == nv.nbytes() and k.nbytes() / (3 * e * h * i) <= 0.57
    assert (k.hidden_size, k.intermediate_size, k.num_experts) == (h, i, e)


@pytest.mark.parametrize("hidden", [H, 48])
def test_kernel_layout_round_trip_with_padding(hidden):
    """H = 64 or 48, I = 32: both padded to 256 along K; w2's 48 rows to two blocks of 32."""
    g = torch.Generator().manual_seed(hidden)
    nvfp4 = NVFP4Weights.quantize(torch.randn(E, 2 * I, hidden, generator=g), torch.randn(E, hidden, I, generator=g))
    k = nvfp4_to_kernel_layout(nvfp4)
    assert k.w13.shape == (E, 16, 1, 32, 32) and k.w2.shape == (E, 2, 1, 32, 32) and k.intermediate_size == I
    assert (k.hidden_size, k.padded_hidden) == (hidden, 256)
    w13, _ = rows_of_blocks(k.w13, k.w13_scale, 512)
    w2, s2 = rows_of_blocks(k.w2, k.w2_scale, 64)
    word_start = 16 * (torch.arange(32) % 16) + 8 * (torch.arange(32) // 16)  # natural K of each stored word
    assert w2[..., word_start >= I].eq(0).all() and s2[..., I // 16 :].eq(ZERO_SCALE_CODE).all()
    assert w2[:, hidden:].eq(0).all() and s2[:, hidden:].eq(ZERO_SCALE_CODE).all()  # padding rows
    pad_rows = torch.cat([kernel_k_order() >= I] * 2)  # stored w13 rows holding padding
    assert w13[:, pad_rows].eq(0).all() and w13[:, ~pad_rows][..., word_start >= hidden].eq(0).all()
    back = nvfp4_from_kernel_layout(k)
    for name, t in nvfp4.tensors().items():
        got = getattr(back, name)
        assert torch.equal(
            got.view(torch.uint8) if t.dtype != torch.float32 else got,
            t.view(torch.uint8) if t.dtype != torch.float32 else t,
        )
    # Dequantization through the round trip is unchanged.
    assert torch.equal(
        dequantize_nvfp4(back.w2, back.w2_scale, back.w2_scale_2),
        dequantize_nvfp4(nvfp4.w2, nvfp4.w2_scale, nvfp4.w2_scale_2),
    )


def _scale_bf16(codes: torch.Tensor) -> torch.Tensor:
    """The kernel's bf16 of scale codes, as ``nvfp4_tile`` forms it: int16 ``16 * code - bias`` read as bf16."""
    return (codes.to(torch.int32) * 16 - SCALE_BF16_BIAS).to(torch.int16).view(torch.bfloat16)


def test_scale_codes_of_every_e4m3_scale():
    """Each finite e4m3 value >= 0 (subnormals and zero too) has a code whose kernel bf16 is the
    scale times SCALE_BF16_FACTOR (-2**118) exactly, and decodes back to the same byte."""
    b = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7f is NaN
    scales = b.view(FP8_DTYPE)
    codes = encode_scales(scales)
    assert codes.dtype == torch.uint8 and len(set(codes.tolist())) == len(b)
    assert codes[0] == ZERO_SCALE_CODE and _scale_bf16(codes[:1]).float().item() == 0.0
    expected = scales.double() * SCALE_BF16_FACTOR
    assert torch.equal(_scale_bf16(codes).double(), expected)
    assert torch.equal(decode_scales(codes).view(torch.uint8), b)


def test_scale_codes_refuse_what_they_cannot_encode():
    with pytest.raises(TypeError, match="scales"):
        encode_scales(torch.ones(3))
    with pytest.raises(ValueError, match="scales: expected finite e4m3 block scales >= 0"):
        encode_scales(torch.tensor([0x38, 0xB8], dtype=torch.uint8).view(FP8_DTYPE))  # 1.0, -1.0
    with pytest.raises(ValueError, match="scales: expected finite e4m3 block scales >= 0"):
        encode_scales(torch.tensor([0x7F], dtype=torch.uint8).view(FP8_DTYPE))  # NaN
    with pytest.raises(TypeError, match="codes"):
        decode_scales(torch.zeros(3, dtype=torch.int32))


def test_negative_scales_fold_into_the_codes(nvfp4):
    """Negative block scales (engines' dummy weights) keep their values: the block's codes flip sign."""
    neg = nvfp4.w2_scale.view(torch.uint8).clone()
    neg[0, :5, 1] |= 0x80
    neg[1, 3, 0] = 0x80  # -0
    neg = neg.view(FP8_DTYPE)
    packed, magnitude = fold_scale_signs("w2_scale", nvfp4.w2, neg)
    assert not bool((magnitude.view(torch.uint8) & 0x80).any())
    assert torch.equal(
        dequantize_nvfp4(packed, magnitude, nvfp4.w2_scale_2), dequantize_nvfp4(nvfp4.w2, neg, nvfp4.w2_scale_2)
    )
    changed = (packed != nvfp4.w2).nonzero()[:, :2].unique(dim=0).tolist()
    assert changed == [[0, r] for r in range(5)] + [[1, 3]]
    nan = neg.view(torch.uint8).clone()
    nan[2, 7, 1] = 0xFF
    with pytest.raises(ValueError, match=r"w2_scale: expected finite block scales, got NaN at index \[2, 7, 1\]"):
        fold_scale_signs("w2_scale", nvfp4.w2, nan.view(FP8_DTYPE))


def test_errors_name_the_argument(nvfp4):
    with pytest.raises(TypeError, match="packed"):
        pack_kernel_words(nvfp4.w13.to(torch.int16))
    with pytest.raises(ValueError, match="packed"):
        pack_kernel_words(nvfp4.w13[..., :3])
    with pytest.raises(TypeError, match="words"):
        unpack_kernel_words(nvfp4.w13)
    with pytest.raises(TypeError, match="weights"):
        nvfp4_to_kernel_layout(nvfp4.w13)
    with pytest.raises(TypeError, match="kernel_weights"):
        nvfp4_from_kernel_layout(nvfp4)
    k = nvfp4_to_kernel_layout(nvfp4)
    args = (k.w13, k.w13_scale, k.w13_scale_2, k.w2, k.w2_scale, k.w2_scale_2)
    with pytest.raises(ValueError, match="w13_scale_2"):
        NVFP4KernelWeights(*args[:2], k.w13_scale_2[:, :1], *args[3:], k.inter, k.hidden)
    with pytest.raises(ValueError, match="w13"):
        NVFP4KernelWeights(*args, 272, k.hidden)  # 2Ip = 1024 rows, not 512
    with pytest.raises(ValueError, match="w2"):
        NVFP4KernelWeights(*args, k.inter, 96)  # three 32-row blocks, not two
    with pytest.raises(ValueError, match="hidden/inter"):
        NVFP4KernelWeights(*args, k.inter, 72)
    w13_rows, s13_rows = rows_of_blocks(k.w13, k.w13_scale, 512)
    with pytest.raises(ValueError, match="w13"):
        NVFP4KernelWeights(w13_rows, s13_rows, *args[2:], k.inter, k.hidden)


def _element_offsets(strides, e: int, n: int, g: int, width: int) -> torch.Tensor:
    """``[e, n, g, width]`` element offsets from a geometry's (expert, block, row, group) strides."""
    se, sb, sr, sg = strides
    ee, nn, gg, ww = torch.meshgrid(
        torch.arange(e), torch.arange(n), torch.arange(g), torch.arange(width), indexing="ij"
    )
    return ee * se + (nn // ROW_BLOCK) * sb + (nn % ROW_BLOCK) * sr + gg * sg + ww


def test_row_blocked_holds_each_row_group_where_its_geometry_says():
    """Both forms' geometries address the same word and scale code of every (expert, row, group,
    position); a row-blocked group of 32 rows is one contiguous piece; rows_of_blocks inverts."""
    words = torch.randint(-(2**31), 2**31 - 1, (2, 96, 3 * 32), dtype=torch.int32)
    scales = torch.randint(0, 256, (2, 96, 3 * 16), dtype=torch.uint8)
    bw, bs = row_blocked(words, scales)
    assert bw.shape == (2, 3, 3, ROW_BLOCK, 32) and bs.shape == (2, 3, 3, ROW_BLOCK, 16) and bw.is_contiguous()
    rows, blocked = weight_geometry(words, scales), weight_geometry(bw, bs)
    assert (rows.experts, rows.rows, rows.groups) == (blocked.experts, blocked.rows, blocked.groups) == (2, 96, 3)
    for src, dst, which, width in ((words, bw, "words", 32), (scales, bs, "scales", 16)):
        want = src.flatten()[_element_offsets(getattr(rows, which), 2, 96, 3, width)]
        assert torch.equal(dst.flatten()[_element_offsets(getattr(blocked, which), 2, 96, 3, width)], want)
    assert blocked.words[3] == ROW_BLOCK * 32 and blocked.scales[3] == ROW_BLOCK * 16
    assert all(torch.equal(a, b) for a, b in zip(rows_of_blocks(bw, bs, 96), (words, scales), strict=True))
    # 40 rows: two blocks, the last 24 rows zero codes and zero scales
    pw, ps = row_blocked(words[:, :40], scales[:, :40])
    assert pw.shape == (2, 2, 3, ROW_BLOCK, 32) and pw[:, 1, :, 8:].eq(0).all()
    assert ps[:, 1, :, 8:].eq(ZERO_SCALE_CODE).all() and torch.equal(rows_of_blocks(pw, ps, 40)[0], words[:, :40])


def test_row_blocked_and_geometry_errors_name_the_arguments():
    with pytest.raises(ValueError, match="words/scales: expected"):
        row_blocked(torch.zeros(1, 48, 32, dtype=torch.int32), torch.zeros(1, 48, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="words/scales: expected"):
        weight_geometry(torch.zeros(1, 32, 32, dtype=torch.int32), torch.zeros(1, 1, 1, 32, 16, dtype=torch.uint8))
