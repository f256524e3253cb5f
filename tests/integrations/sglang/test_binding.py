"""FP8 per-tensor experts with gate and up scales apart are requantized to one scale per expert, in place."""

import torch

from moe_backend.quant.fp8 import dequantize_fp8_per_tensor, quantize_fp8_per_tensor


def test_w13_scales_merge_to_the_larger_keeping_that_half_exact():
    from moe_backend.integrations.sglang.binding import _one_w13_scale

    torch.manual_seed(0)
    e, i, h = 3, 4, 8
    gate_q, gate_s = quantize_fp8_per_tensor(torch.randn(e, i, h))
    up_q, up_s = quantize_fp8_per_tensor(torch.randn(e, i, h) * torch.tensor([3.0, 0.25, 1.0])[:, None, None])
    original = torch.cat([gate_q, up_q], 1)
    scales = torch.stack([gate_s, up_s], 1)
    w13 = original.clone()
    merged = _one_w13_scale(w13, scales)
    assert torch.equal(merged, torch.maximum(gate_s, up_s))
    assert (scales[:, 0] > scales[:, 1]).any() and (scales[:, 0] < scales[:, 1]).any()
    for x in range(e):
        for half in range(2):
            rows = slice(half * i, (half + 1) * i)
            if scales[x, half] == merged[x]:
                assert torch.equal(w13[x, rows].view(torch.uint8), original[x, rows].view(torch.uint8))
                continue
            before = dequantize_fp8_per_tensor(original[x, rows], scales[x, half])
            after = dequantize_fp8_per_tensor(w13[x, rows], merged[x])
            # e4m3 keeps 3 mantissa bits: half a step is 1/16 of the value, or of the subnormal step.
            assert ((after - before).abs() <= before.abs() / 16 + merged[x] * 2.0**-10).all()
    assert _one_w13_scale(w13, merged) is merged  # one scale per expert already: left as it is
