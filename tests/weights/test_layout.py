"""Weight layout transforms: each one against an explicit definition, its inverse, and argument errors."""

import pytest
import torch

from moe_backend.expert_weights import NVFP4Weights
from moe_backend.weights.layout import deinterleave_gated_rows, interleave_gated_rows, swap_gate_up

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
        assert torch.equal(v[:, rows], w[:, blk * group : (blk + 1) * group])
        rows = slice((2 * blk + 1) * group, (2 * blk + 2) * group)
        assert torch.equal(v[:, rows], w[:, I + blk * group : I + (blk + 1) * group])
    assert torch.equal(deinterleave_gated_rows(v, group), w)


def test_interleave_other_dim():
    x = torch.randn(4, 6)
    assert torch.equal(interleave_gated_rows(x, dim=-1), interleave_gated_rows(x.T.contiguous()).T)
    assert torch.equal(deinterleave_gated_rows(interleave_gated_rows(x, dim=0), dim=0), x)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="w:"):
        swap_gate_up(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="dim"):
        swap_gate_up(torch.zeros(4, 4), dim=2)
    with pytest.raises(ValueError, match="group"):
        interleave_gated_rows(torch.zeros(12, 2), group=0)
    with pytest.raises(ValueError, match="w:"):
        interleave_gated_rows(torch.zeros(12, 2), group=4)
