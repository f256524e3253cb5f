"""Weight layout transforms: each one against an explicit definition, its inverse, and argument errors."""

import pytest
import torch

from moe_backend.expert_weights import NVFP4Weights
from moe_backend.quant.nvfp4 import dequantize_nvfp4, unpack_e2m1
from moe_backend.weights.layout import (
    WORD_PERM,
    NVFP4KernelWeights,
    deinterleave_gated_rows,
    interleave_gated_rows,
    nvfp4_from_kernel_layout,
    nvfp4_to_kernel_layout,
    pack_kernel_words,
    swap_gate_up,
    unpack_kernel_words,
)

E, H, I = 3, 64, 32


@pytest.fixture
def nvfp4():
    g = torch.Generator().manual_seed(0)
    return NVFP4Weights.quantize(torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g))


def test_swap_gate_up_is_its_own_inverse(nvfp4):
    w = nvfp4.w13
    s = swap_gate_up(w)
    assert torch.equal(s[:, :I], w[:, I:]) and torch.equal(s[:, I:], w[:, :I])
    assert torch.equal(swap_gate_up(s), w)
    g = swap_gate_up(nvfp4.w13_scale_2, dim=-1)
    assert torch.equal(g, nvfp4.w13_scale_2.flip(-1)) and torch.equal(swap_gate_up(g, dim=-1), nvfp4.w13_scale_2)


def test_interleave_matches_flashinfer_reorder_rows():
    """group=1 is FlashInfer's reorder_rows_for_gated_act_gemm: out[2i] = x[i], out[2i+1] = x[M/2 + i]."""
    x = torch.arange(2 * 12 * 4).reshape(2, 12, 4)
    idx = torch.empty(12, dtype=torch.long)
    idx[0::2], idx[1::2] = torch.arange(6), torch.arange(6, 12)
    assert torch.equal(interleave_gated_rows(x), x[:, idx])


@pytest.mark.parametrize("group", [1, 2, 8])
def test_interleave_groups_and_inverse(group, nvfp4):
    w = nvfp4.w13_scale.view(torch.uint8)
    v = interleave_gated_rows(w, group)
    for blk in range(I // group):
        rows = slice(2 * blk * group, (2 * blk + 1) * group)
        assert torch.equal(v[:, rows], w[:, blk * group:(blk + 1) * group])
        rows = slice((2 * blk + 1) * group, (2 * blk + 2) * group)
        assert torch.equal(v[:, rows], w[:, I + blk * group:I + (blk + 1) * group])
    assert torch.equal(deinterleave_gated_rows(v, group), w)


def test_interleave_other_dim():
    x = torch.randn(4, 6)
    assert torch.equal(interleave_gated_rows(x, dim=-1), interleave_gated_rows(x.T.contiguous()).T)
    assert torch.equal(deinterleave_gated_rows(interleave_gated_rows(x, dim=0), dim=0), x)


def test_kernel_words_layout(nvfp4):
    words = pack_kernel_words(nvfp4.w13)
    assert words.dtype == torch.int32 and words.shape == (E, 2 * I, H // 8)
    codes = unpack_e2m1(nvfp4.w13)
    w = words.view(torch.uint8).reshape(E, 2 * I, H // 8, 4).long()
    word_vals = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)
    for p in range(8):
        nib = (word_vals >> (4 * p)) & 0xF
        assert torch.equal(nib, codes[..., WORD_PERM[p]::8].long())
    assert torch.equal(unpack_kernel_words(words), nvfp4.w13)


def test_kernel_layout_round_trip_and_size(nvfp4):
    k = nvfp4_to_kernel_layout(nvfp4)
    assert isinstance(k, NVFP4KernelWeights) and k.nbytes() == nvfp4.nbytes()
    assert k.nbytes() / (3 * E * H * I) <= 0.57
    back = nvfp4_from_kernel_layout(k)
    for name, t in nvfp4.tensors().items():
        assert torch.equal(getattr(back, name).view(torch.uint8) if t.dtype != torch.float32
                           else getattr(back, name), t.view(torch.uint8) if t.dtype != torch.float32 else t)
    # Dequantization through the round trip is unchanged.
    assert torch.equal(dequantize_nvfp4(back.w2, back.w2_scale, back.w2_scale_2),
                       dequantize_nvfp4(nvfp4.w2, nvfp4.w2_scale, nvfp4.w2_scale_2))


def test_errors_name_the_argument(nvfp4):
    with pytest.raises(TypeError, match="packed"):
        pack_kernel_words(nvfp4.w13.to(torch.int16))
    with pytest.raises(ValueError, match="packed"):
        pack_kernel_words(nvfp4.w13[..., :3])
    with pytest.raises(TypeError, match="words"):
        unpack_kernel_words(nvfp4.w13)
    with pytest.raises(ValueError, match="w:"):
        swap_gate_up(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="dim"):
        swap_gate_up(torch.zeros(4, 4), dim=2)
    with pytest.raises(ValueError, match="group"):
        interleave_gated_rows(torch.zeros(12, 2), group=0)
    with pytest.raises(ValueError, match="w:"):
        interleave_gated_rows(torch.zeros(12, 2), group=4)
    with pytest.raises(TypeError, match="weights"):
        nvfp4_to_kernel_layout(nvfp4.w13)
    with pytest.raises(TypeError, match="kernel_weights"):
        nvfp4_from_kernel_layout(nvfp4)
    k = nvfp4_to_kernel_layout(nvfp4)
    with pytest.raises(ValueError, match="w13_scale_2"):
        NVFP4KernelWeights(k.w13, k.w13_scale, k.w13_scale_2[:, :1], k.w2, k.w2_scale, k.w2_scale_2)
