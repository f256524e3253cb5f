"""Packed top-k codec: bit layout, round trip, -1 ids, range checks."""

import pytest
import torch

from moe_backend.routing import pack_topk, unpack_topk


def test_bit_layout_id_high_bf16_low():
    ids = torch.tensor([[5, 32767]], dtype=torch.int32)
    w = torch.tensor([[1.0, -0.5]])
    packed = pack_topk(ids, w)
    for j in range(2):
        v = packed[0, j].item() & 0xFFFFFFFF
        assert v >> 16 == ids[0, j].item()
        bf16_bits = w[0, j : j + 1].to(torch.bfloat16).view(torch.int16).item() & 0xFFFF
        assert v & 0xFFFF == bf16_bits
    # little-endian struct {bf16 score; int16 idx}, as FlashInfer reads it
    as_pairs = packed.view(torch.int16).view(1, 2, 2)
    assert as_pairs[0, :, 1].tolist() == [5, 32767]
    assert as_pairs[0, :, 0].view(torch.bfloat16).float().tolist() == [1.0, -0.5]


def test_round_trip_random_and_minus_one():
    ids = torch.randint(-1, 32768, (64, 8), dtype=torch.int32)
    w = torch.randn(64, 8)
    back_ids, back_w = unpack_topk(pack_topk(ids, w))
    assert torch.equal(back_ids, ids)
    assert torch.equal(back_w, w.to(torch.bfloat16).float())
    assert back_w.dtype == torch.float32


def test_bf16_weights_accepted_and_empty():
    ids = torch.zeros(0, 4, dtype=torch.int32)
    packed = pack_topk(ids, torch.zeros(0, 4, dtype=torch.bfloat16))
    assert packed.shape == (0, 4) and packed.dtype == torch.int32


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: pack_topk(torch.tensor([[32768]], dtype=torch.int32), torch.ones(1, 1)),
            r"ids: expected expert ids in \[-1, 32768\)",
        ),
        (lambda: pack_topk(torch.tensor([[-2]], dtype=torch.int32), torch.ones(1, 1)), r"got values in \[-2, -2\]"),
        (
            lambda: pack_topk(torch.tensor([[1]], dtype=torch.int64), torch.ones(1, 1)),
            "ids: expected dtype torch.int32",
        ),
        (lambda: pack_topk(torch.ones(2, 2, dtype=torch.int32), torch.ones(2, 3)), r"weights: expected shape \(2, 2\)"),
        (lambda: pack_topk(torch.ones(2, 2, dtype=torch.int32), torch.ones(2, 2).half()), "weights: expected dtype"),
        (lambda: unpack_topk(torch.ones(2, 2)), "topk: expected dtype torch.int32"),
        (lambda: unpack_topk(torch.ones(4, dtype=torch.int32)), "topk: expected a 2-D tensor"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize(
    "ids, match",
    [
        ([[40008]], r"ids: expected expert ids in \[-1, 32768\), got values in \[40008, 40008\]"),
        ([[3, -2]], r"ids: expected expert ids in \[-1, 32768\), got values in \[-2, 3\]"),
        ([[-40000, 1]], r"got values in \[-40000, 1\]"),
    ],
)
def test_ids_outside_the_packed_range_are_refused(ids, match):
    ids = torch.tensor(ids, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        pack_topk(ids, torch.ones(ids.shape))


def test_empty_round_trip():
    ids, w = unpack_topk(pack_topk(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 4)))
    assert ids.shape == w.shape == (0, 4)
